"""Train EleutherAI sparsify's TopK SparseCoder on one activation partition; write JSON.

Run with benchmarks/sparsify/.venv/bin/python (made by setup_env.sh); benchmarks/sae.py calls
it. It trains on exactly the batches `train_sae` trains on (the project's reader and seed:
non-held-out users, shuffled; the first batch is read before the clock starts, later reads
inside it, as in `train_sae`), then scores the coder on the held-out users' rows with
`evaluate_sae` itself (through `SparsifyCoder`).

sparsify's Trainer needs a Hugging Face model and a token dataset, so this loop mirrors what
`Trainer.fit` (sparsify 1.3.3; loss_fn="fvu", optimizer="adam", one coder, no accumulation)
does per batch:
- `torch.set_float32_matmul_precision("high")`, `torch.manual_seed(seed)`, then
  `SparseCoder(d_in, SparseCoderConfig(expansion_factor, k), device, dtype=torch.float32)`;
- `torch.optim.Adam` (the Trainer's fallback without bitsandbytes) at
  `lr or 2e-4 / sqrt(num_latents / 2**14)`;
- on the first batch b_dec = its mean; before every forward, decoder rows set to unit norm;
- dead_mask = rows since fired > dead_feature_threshold (if auxk_alpha > 0), where a latent
  fires when top-k picks it; loss = fvu + auxk_alpha * auxk_loss; backward,
  `remove_gradient_parallel_to_decoder_directions`, step, zero_grad.
Left out: hooks, DataLoader, wandb, checkpoints, the per-step float() of logged losses, and
the LR schedule (warmup over 1000 steps, then linear decay to 0): ours keeps lr constant and
500k rows are ~120 steps, so both get the same constant Adam lr. TrainConfig's own defaults
(optimizer="signum", auxk_alpha=0, dead_feature_threshold=10M) are replaced by ours.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import torch
from torch import Tensor

# The project's batches and evaluation, so both coders see the same rows in the same order and
# are scored alike; they need torch, pyarrow and transformers (all in this venv), not dagster.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from recsae_pipeline.sae.training import (  # noqa: E402
    SaeTrainConfig,
    _training_batches,
    evaluate_sae,
)
from recsae_pipeline.storage.atomic import write_json  # noqa: E402
from recsae_pipeline.storage.registry import SHARD_GLOB  # noqa: E402

LOG_EVERY = 100
"""Steps between training-curve points, as `SaeTrainConfig.log_every`."""


class SparsifyCoder:
    """sparsify's SparseCoder seen as `evaluate_sae` reads a coder (config.d_in,
    config.n_latents, encode -> (values, indices), decode, train/eval), encoding and decoding
    under the bf16 autocast that `SparseCoder.forward` runs them in on CUDA."""

    def __init__(self, coder: Any, d_in: int) -> None:
        self.coder = coder
        self.config = SimpleNamespace(d_in=d_in, n_latents=coder.num_latents)

    @property
    def training(self) -> bool:
        return self.coder.training

    def train(self, mode: bool = True) -> SparsifyCoder:
        self.coder.train(mode)
        return self

    def eval(self) -> SparsifyCoder:
        return self.train(False)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with _forward_autocast():
            out = self.coder.encode(x)
        return out.top_acts, out.top_indices

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        with _forward_autocast():
            return self.coder.decode(values, indices)


def _forward_autocast() -> torch.autocast:
    # The decorator on sparsify 1.3.3's SparseCoder.forward, which reconstructs in training.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported())


def activation_width(partition_dir: Path) -> int:
    """d of the partition's fixed_size_list<float32>[d] activation column."""
    shards = sorted(Path(partition_dir).glob(SHARD_GLOB))
    if not shards:
        raise FileNotFoundError(f"{partition_dir} holds no {SHARD_GLOB}")
    return pq.read_schema(shards[0]).field("activation").type.list_size


def train_sparsify(args: argparse.Namespace) -> dict:
    """Train sparsify's SparseCoder as its Trainer would (see the module docstring)."""
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.utils import decoder_impl

    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")
    d_in = activation_width(args.partition)
    train_config = SaeTrainConfig(batch_size=args.batch_size, rows_seen=args.rows, seed=args.seed)
    batches = _training_batches(args.partition, train_config, args.heldout_users_modulo)
    first = next(batches)

    torch.manual_seed(args.seed)
    cfg = SparseCoderConfig(expansion_factor=args.expansion, k=args.k)
    sae = SparseCoder(d_in, cfg, device, dtype=torch.float32)
    lr = args.lr or 2e-4 / (sae.num_latents / 2**14) ** 0.5
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    rows_since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # fvu, auxk
    curve: list[dict[str, float]] = []
    steps = rows = epochs = since_point = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for epoch, x in itertools.chain([first], batches):
        x = x.to(device)
        if steps == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = rows_since_fired > args.dead_feature_threshold if args.auxk_alpha > 0 else None
        out = sae(x, dead_mask=dead_mask)
        loss = out.fvu + args.auxk_alpha * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            rows_since_fired += len(x)
            rows_since_fired[out.latent_indices.flatten()] = 0
            sums += torch.stack([out.fvu.detach(), out.auxk_loss.detach()]).double()
        steps, rows, epochs, since_point = steps + 1, rows + len(x), epoch + 1, since_point + 1
        if steps % LOG_EVERY == 0 or rows == args.rows:
            fvu, auxk = (sums / since_point).tolist()
            dead = float((rows_since_fired > args.dead_feature_threshold).float().mean())
            curve.append({"rows_seen": rows, "fvu": fvu, "auxk_loss": auxk, "dead_fraction": dead})
            sums.zero_()
            since_point = 0
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if not math.isfinite(curve[-1]["fvu"]):
        raise FloatingPointError(f"sparsify's training fvu={curve[-1]['fvu']}; lower --lr ({lr:g})")

    heldout = evaluate_sae(
        SparsifyCoder(sae, d_in), args.partition, device, args.heldout_users_modulo, args.batch_size
    )
    return {
        "implementation": "eai-sparsify-" + importlib.metadata.version("eai-sparsify"),
        "versions": {
            "eai-sparsify": importlib.metadata.version("eai-sparsify"),
            "torch": torch.__version__,
        },
        "decoder": decoder_impl.__name__,
        "bf16_autocast": device.type == "cuda" and torch.cuda.is_bf16_supported(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "config": {
            "d_in": d_in,
            "n_latents": sae.num_latents,
            "k": args.k,
            "expansion": args.expansion,
            "lr": lr,
            "batch_size": args.batch_size,
            "rows": args.rows,
            "seed": args.seed,
            "auxk_alpha": args.auxk_alpha,
            "dead_feature_threshold": args.dead_feature_threshold,
            "optimizer": "torch.optim.Adam, constant lr",
        },
        "rows_seen": rows,
        "steps": steps,
        "epochs": epochs,
        "seconds": seconds,
        "rows_per_second": rows / seconds,
        "cpu_seconds": cpu_seconds,
        "curve": curve,
        "heldout": heldout,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partition", type=Path, required=True, help="model=<m>/layer=<l> dir")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    parser.add_argument("--rows", type=int, default=500_000, help="training rows in total")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, help="Adam lr (default: sparsify's rule)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--auxk-alpha", type=float, default=1 / 32)
    parser.add_argument("--dead-feature-threshold", type=int, default=100_000, help="rows")
    parser.add_argument("--heldout-users-modulo", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    write_json(train_sparsify(args), args.out)


if __name__ == "__main__":
    main()
