"""Train an SAE (TopK, BatchTopK or L1 ReLU) on one activation partition, streaming;
evaluate it on held-out users.

Every row of a user with user_idx % heldout_users_modulo == 0 is held out: never trained on,
never used for the b_dec and whitening init, and the only rows `evaluate_sae` reads.
Under torchrun (DDP) every rank reads the same batches and trains on its shard of each.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from recsae_pipeline.activations.shards import iter_activation_batches
from recsae_pipeline.distributed import ddp
from recsae_pipeline.sae.model import SaeConfig, TopKSae, intra_op_threads


@dataclass(frozen=True)
class SaeTrainConfig:
    """Optimisation knobs; the sparse coder's own knobs live in `SaeConfig`."""

    lr: float | None = None
    """Adam learning rate; None = 2e-4 / sqrt(n_latents / 2**14), as in sparsify."""
    batch_size: int = 4096
    rows_seen: int = 500_000
    """Training rows in total; the partition is passed over as many times as needed."""
    seed: int = 0
    """Seeds the SAE init and the shuffle (epoch e reads with seed + e)."""
    shuffle_buffer_rows: int = 262_144
    log_every: int = 100
    """Steps between points of the training curve (and `on_progress` calls)."""

    def __post_init__(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr}; pass a positive rate or None for the default")
        for name in ("batch_size", "rows_seen", "shuffle_buffer_rows", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 1")


class CurvePoint(NamedTuple):
    rows_seen: int
    """Training rows consumed up to this point."""
    fvu: float
    """Mean training-batch FVU over the steps since the previous point."""
    auxk_loss: float
    """Mean AuxK loss over those steps (0 while no latent is dead)."""
    l0: float
    """Mean nonzero latents per row over those steps."""
    dead_fraction: float
    """Share of latents that have not fired in the last `dead_after_rows` training rows."""
    l1_loss: float = 0.0
    """Mean L1 penalty term over those steps (`SaeOutput.l1_loss`; 0 for TopK/BatchTopK)."""


class SaeTrainResult(NamedTuple):
    sae: TopKSae
    """The trained SAE, in eval mode, on the training device."""
    curve: list[CurvePoint]
    """One point every `log_every` steps, plus one after the last step."""
    heldout: dict[str, float]
    """`evaluate_sae` on every row of the held-out users: rows, fvu, l0, dead_fraction."""
    rows_seen: int
    """Training rows consumed (= config.rows_seen)."""
    steps: int
    """Optimizer steps taken."""
    epochs: int
    """Passes over the partition started."""
    lr: float
    """Learning rate used."""
    seconds: float
    """Wall time of the training loop (reading included, held-out evaluation excluded)."""
    rows_per_second: float
    """Training throughput: rows_seen / seconds."""
    cpu_seconds: float = 0.0
    """CPU time of this process (every thread) over the training loop: on a shared machine,
    how much work the rows took, apart from waiting for a core."""


def default_lr(n_latents: int) -> float:
    """sparsify's rule: 2e-4 at 2**14 latents, scaled by 1 / sqrt(n_latents / 2**14)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def is_heldout(user_idx: Tensor, heldout_users_modulo: int) -> Tensor:
    """Rows whose user is held out: user_idx % heldout_users_modulo == 0 (bool [B])."""
    return user_idx % heldout_users_modulo == 0


def _training_batches(
    partition_dir: Path, config: SaeTrainConfig, heldout_users_modulo: int
) -> Iterator[tuple[int, Tensor]]:
    """(epoch, activations [batch_size, d]) of non-held-out rows until `rows_seen` rows;
    only the last batch may be smaller. Leftovers of an epoch open the next one's first batch."""
    remaining = config.rows_seen
    pending: list[Tensor] = []
    pending_rows = 0
    for epoch in itertools.count():
        epoch_rows = 0
        for batch in iter_activation_batches(
            partition_dir,
            config.batch_size,
            seed=config.seed + epoch,
            shuffle_buffer_rows=config.shuffle_buffer_rows,
            columns=("activation", "user_idx"),
        ):
            rows = batch["activation"][~is_heldout(batch["user_idx"], heldout_users_modulo)]
            epoch_rows += len(rows)
            pending.append(rows)
            pending_rows += len(rows)
            while pending_rows >= (size := min(config.batch_size, remaining)):
                pooled = torch.cat(pending)
                yield epoch, pooled[:size]
                remaining -= size
                if remaining == 0:
                    return
                pending, pending_rows = [pooled[size:]], len(pooled) - size
        if epoch_rows == 0:
            raise ValueError(
                f"{partition_dir} has no training rows: every user_idx is divisible by "
                f"heldout_users_modulo={heldout_users_modulo}; raise the modulo or add users"
            )


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """`items` in order, produced up to `depth` ahead by a background thread (on one torch
    thread), so reading overlaps training; the producer's exception is raised here, and
    closing this generator stops the producer."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry: tuple) -> bool:
        """Queue `entry` unless the consumer has stopped; whether it went in."""
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        torch.set_num_threads(1)
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as err:  # raised in the consumer
            offer((done, err))

    producer = threading.Thread(target=produce, name="recsae-sae-reader", daemon=True)
    producer.start()
    try:
        while True:
            item, err = ready.get()
            if item is done:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        producer.join()


def train_sae(
    partition_dir: Path,
    config: SaeTrainConfig,
    sae_config: SaeConfig,
    device: torch.device | str,
    heldout_users_modulo: int = 10,
    on_progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> SaeTrainResult:
    """Train an SAE (`sae_config.kind`) with Adam on the partition's non-held-out rows, then
    evaluate it on the held-out users' rows. `on_progress(rows_seen, total_rows, metrics)`
    runs at each curve point with that point's fields. Under a process group (torchrun)
    `batch_size` is the global batch, each rank trains on its shard, and rank 0 evaluates."""
    if heldout_users_modulo < 2:
        raise ValueError(
            f"heldout_users_modulo={heldout_users_modulo}; use >= 2 (10 holds out every tenth "
            "user), since 1 would hold out every row"
        )
    device = torch.device(device)
    batches = _training_batches(Path(partition_dir), config, heldout_users_modulo)
    first = next(batches)
    if first[1].shape[1] != sae_config.d_in:
        raise ValueError(
            f"{partition_dir} holds activations of width {first[1].shape[1]}, "
            f"sae_config.d_in={sae_config.d_in}; set d_in to the partition's width"
        )
    sae = TopKSae(sae_config, device, sample=first[1], seed=config.seed).train()
    # CPU: the loop's many small steps (the sparse passes, the loss, Adam) on one thread, the
    # encoder product and the top-k split between all of them (`TopKSae.dense_threads`), the
    # reading on a thread of its own (`prefetched`). On a shared machine every parallel region
    # waits for its slowest thread: ~100 regions a step cost far more than they gain.
    threads = torch.get_num_threads()
    loop_threads = 1 if device.type == "cpu" else None
    sae.dense_threads = threads if loop_threads is not None else None
    model = ddp.wrap(sae, device)
    lr = config.lr if config.lr is not None else default_lr(sae_config.n_latents)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    rows_since_fired = torch.zeros(sae_config.n_latents, dtype=torch.long, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # fvu, auxk, l0, l1: no sync
    curve: list[CurvePoint] = []
    steps = rows = epochs = 0
    since_point = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    reader = prefetched(itertools.chain([first], batches))
    with contextlib.closing(reader), intra_op_threads(loop_threads):
        for epoch, x in reader:
            x = x.to(device)
            dead_mask = rows_since_fired >= sae_config.dead_after_rows
            out = model(ddp.shard(x), dead_mask)
            out.loss.backward()
            sae.remove_parallel_grads()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sae.normalize_decoder()
            with torch.no_grad():
                rows_since_fired += len(x)
                rows_since_fired[out.latent_indices[out.latent_values > 0]] = 0
                ddp.all_reduce_min(rows_since_fired)  # fired on any rank = alive
                sums += torch.stack([out.fvu, out.auxk_loss, out.l0, out.l1_loss]).double()
            steps, rows, epochs, since_point = steps + 1, rows + len(x), epoch + 1, since_point + 1
            if steps % config.log_every == 0 or rows == config.rows_seen:
                fvu, auxk, l0, l1 = (ddp.all_reduce_mean(sums) / since_point).tolist()
                if not math.isfinite(fvu + auxk + l1):
                    raise FloatingPointError(
                        f"training fvu={fvu}, auxk_loss={auxk}, l1_loss={l1} at rows_seen={rows}; "
                        f"lower lr (now {lr:g}) or check {partition_dir} for non-finite activations"
                    )
                dead = float((rows_since_fired >= sae_config.dead_after_rows).float().mean())
                point = CurvePoint(rows, fvu, auxk, l0, dead, l1)
                curve.append(point)
                sums.zero_()
                since_point = 0
                if on_progress is not None:
                    on_progress(rows, config.rows_seen, point._asdict())
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    sae.eval()
    heldout = ddp.broadcast_object(
        evaluate_sae(sae, partition_dir, device, heldout_users_modulo, config.batch_size)
        if ddp.is_main()
        else None
    )
    return SaeTrainResult(
        sae=sae,
        curve=curve,
        heldout=heldout,
        rows_seen=rows,
        steps=steps,
        epochs=epochs,
        lr=lr,
        seconds=seconds,
        rows_per_second=rows / seconds,
        cpu_seconds=cpu_seconds,
    )


@torch.no_grad()
def evaluate_sae(
    sae: TopKSae,
    partition_dir: Path,
    device: torch.device | str,
    heldout_users_modulo: int = 10,
    batch_size: int = 4096,
    split: str | None = None,
) -> dict[str, float]:
    """The SAE (in eval mode) on the held-out users' rows (1 = every row), or only their
    rows of `split` ("test" = the position that scores the test item). Returns rows; fvu =
    total squared error / total variance around the mean of those rows; l0 = mean nonzero
    latents per row; dead_fraction = share of latents never nonzero on those rows."""
    if heldout_users_modulo < 1:
        raise ValueError(f"heldout_users_modulo={heldout_users_modulo}; must be >= 1")
    device = torch.device(device)
    was_training = sae.training
    sae.eval()
    n_latents = sae.config.n_latents
    rows, nonzeros = 0, 0
    squared_error = torch.zeros((), dtype=torch.float64, device=device)
    sum_x = torch.zeros(sae.config.d_in, dtype=torch.float64, device=device)
    sum_sq = torch.zeros((), dtype=torch.float64, device=device)
    fired = torch.zeros(n_latents, dtype=torch.bool, device=device)
    try:
        for batch in iter_activation_batches(
            partition_dir,
            batch_size,
            shuffle_buffer_rows=batch_size,
            columns=("activation", "user_idx"),
            split=split,
        ):
            x = batch["activation"][is_heldout(batch["user_idx"], heldout_users_modulo)]
            if not len(x):
                continue
            x = x.to(device)
            values, indices = sae.encode(x)
            squared_error += (x - sae.decode(values, indices)).double().pow(2).sum()
            sum_x += x.double().sum(0)
            sum_sq += x.double().pow(2).sum()
            active = values != 0
            nonzeros += int(active.sum())
            fired[indices[active]] = True
            rows += len(x)
    finally:
        sae.train(was_training)
    if rows == 0:
        where = "" if split is None else f" of split {split!r}"
        raise ValueError(
            f"{partition_dir} has no rows{where} of held-out users (user_idx % "
            f"{heldout_users_modulo} == 0); lower heldout_users_modulo or add users"
        )
    variance = sum_sq - sum_x.pow(2).sum() / rows
    return {
        "rows": rows,
        "fvu": float(squared_error / variance),
        "l0": nonzeros / rows,
        "dead_fraction": 1.0 - float(fired.float().mean()),
    }
