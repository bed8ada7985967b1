"""SAE benchmark: our TopK SAE vs EleutherAI sparsify's TopK SparseCoder on the same activations.

Both train on one partition's non-held-out rows with the same reader and seed, k, width,
batch, constant Adam lr, row count and torch threads: ours in this process (`train_sae`),
sparsify 1.3.3 in its own venv (benchmarks/sparsify/; run_sparsify.py says which parts of
sparsify's Trainer its loop mirrors), taking turns `--repeats` times. Both are scored on the
held-out users' rows (user_idx % 10 == 0) with `evaluate_sae`'s definitions.

    bash benchmarks/sparsify/setup_env.sh     # once: sparsify's own venv
    .venv/bin/python benchmarks/sae.py        # --model student --layer 1 --device cuda
    .venv/bin/python benchmarks/sae.py --quick    # a check: 65,536 rows, one run each

rows/s is the training loop's throughput as `train_sae` times it: reading inside the loop
included; the first batch, the init and the held-out evaluation excluded. The table gives
each side's best run, since other work on a shared machine only ever slows a run, and each
run's rows per CPU second of its process (all threads): the work, apart from the waits for a
core that load adds. `--threads` is what both get; sparsify runs every op on all of them,
`train_sae` only its encoder product and top-k (the rest of its loop on one, the reading on
its own thread), so the wall-clock ratio grows with the machine's load. Results:
benchmarks/results/sae.json (one entry per model/layer/device/threads, each with the command,
commit, machine and load averages) and a printed table; `--quick` writes to the temp directory
unless `--out` is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import torch

from recsae_pipeline.sae.model import SaeConfig
from recsae_pipeline.sae.training import SaeTrainConfig, default_lr, train_sae
from recsae_pipeline.storage.atomic import write_json
from recsae_pipeline.storage.registry import SHARD_GLOB, ArtifactPaths, default_data_dir

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results" / "sae.json"
QUICK_ROWS = 65_536
"""--quick: training rows per coder (16 batches of 4096), one run of each."""
SPARSIFY_PYTHON = ROOT / "sparsify" / ".venv" / "bin" / "python"
HELDOUT_USERS_MODULO = 10


def resolve_device(spec: str) -> torch.device:
    """`auto` = CUDA when present, else CPU; `cpu`, `cuda`, `cuda:N` as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {spec}: torch {torch.__version__} sees no CUDA device")
    return device


def activation_width(partition: Path) -> int:
    """d of the partition's activation column; exits with the fix if there is no partition."""
    shards = sorted(partition.glob(SHARD_GLOB))
    if not shards:
        model, layer = partition.parent.name.removeprefix("model="), partition.name
        raise SystemExit(
            f"{partition} holds no {SHARD_GLOB}: materialize the activations first with "
            f"`recsae materialize` (or the `features` job for partition "
            f"{model}.{layer.replace('=', '')}), or point --data-dir at a storage root that has them"
        )
    return pq.read_schema(shards[0]).field("activation").type.list_size


def run_ours(
    partition: Path, sae_config: SaeConfig, train_config: SaeTrainConfig, device: torch.device
) -> dict:
    result = train_sae(partition, train_config, sae_config, device, HELDOUT_USERS_MODULO)
    return {
        "implementation": "recsae",
        "rows_seen": result.rows_seen,
        "steps": result.steps,
        "epochs": result.epochs,
        "lr": result.lr,
        "seconds": result.seconds,
        "rows_per_second": result.rows_per_second,
        "cpu_seconds": result.cpu_seconds,
        "curve": [p._asdict() for p in result.curve],
        "heldout": result.heldout,
    }


def run_sparsify(
    partition: Path,
    sae_config: SaeConfig,
    train_config: SaeTrainConfig,
    device: torch.device,
    threads: int,
    out: Path,
    python: Path = SPARSIFY_PYTHON,
) -> dict:
    if not python.exists():
        raise SystemExit(f"{python} is missing: run `bash benchmarks/sparsify/setup_env.sh` first")
    cmd = [
        str(python), str(ROOT / "sparsify" / "run_sparsify.py"),
        "--partition", str(partition), "--out", str(out),
        "--rows", str(train_config.rows_seen), "--batch-size", str(train_config.batch_size),
        "--k", str(sae_config.k), "--expansion", str(sae_config.expansion),
        "--lr", repr(train_config.lr), "--seed", str(train_config.seed),
        "--auxk-alpha", repr(sae_config.aux_coefficient),
        "--dead-feature-threshold", str(sae_config.dead_after_rows),
        "--heldout-users-modulo", str(HELDOUT_USERS_MODULO),
        "--device", str(device), "--threads", str(threads),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def provenance(device: torch.device, threads: int) -> dict:
    """Commit, time, command line and machine of this run."""

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:  # a copy of the tree without .git (an accelerator machine)
            return os.environ.get("RECSAE_COMMIT", "unknown: no git here, set RECSAE_COMMIT")
        return done.stdout.strip()

    python = Path(sys.executable)
    python_arg = str(python.relative_to(REPO)) if python.is_relative_to(REPO) else str(python)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return {
        "command": shlex.join([python_arg, *sys.argv]),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_at_start": git(
            "status",
            "--porcelain",
            "--",
            "recsae_pipeline/sae",
            "benchmarks/sae.py",
            "benchmarks/sparsify",
        ).splitlines(),  # fmt: skip
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} ({cpu}), {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {threads} threads on {device}",
    }


def best_run(runs: list[dict]) -> dict:
    """The fastest run, with every run's rows/s, load average and held-out FVU beside it
    (seeded: on CPU the repeats differ only in speed; CUDA's atomic adds may move the FVU)."""
    best = max(runs, key=lambda r: r["rows_per_second"])
    return best | {
        "rows_per_second_runs": [r["rows_per_second"] for r in runs],
        # rows per CPU second of the process, every thread counted: the work, apart from the
        # waits for a core that a shared machine adds to the wall clock
        "rows_per_cpu_second_runs": [r["rows_seen"] / r["cpu_seconds"] for r in runs],
        "load_average_runs": [r["load_average_before"] for r in runs],
        "heldout_fvu_runs": [r["heldout"]["fvu"] for r in runs],
    }


def print_table(entry: dict) -> None:
    ours, theirs = entry["ours"], entry["sparsify"]
    c = entry["config"]
    print(
        f"\n### {entry['model']} layer {entry['layer']}: d_in {c['d_in']}, {c['n_latents']} "
        f"latents, k {c['k']}, batch {c['batch_size']}, lr {c['lr']:.3g}, {c['rows']:,} rows, "
        f"{entry['device']}, {entry['threads']} threads"
    )
    print(
        "| implementation | rows/s (best) | rows/s (all runs) | rows per CPU-s (all runs) "
        "| 1-min load before each run | held-out FVU | L0 | dead fraction |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in (("ours", ours), (theirs["implementation"], theirs)):
        h = r["heldout"]
        every = ", ".join(f"{v:,.0f}" for v in r["rows_per_second_runs"])
        cpu = ", ".join(f"{v:,.0f}" for v in r["rows_per_cpu_second_runs"])
        loads = ", ".join(f"{v:.1f}" for v in r["load_average_runs"])
        print(
            f"| {name} | {r['rows_per_second']:,.0f} | {every} | {cpu} | {loads} "
            f"| {h['fvu']:.4f} | {h['l0']:.1f} | {h['dead_fraction']:.3f} |"
        )
    ratios = entry["ratios"]
    print(
        f"ours/sparsify: rows/s {ratios['rows_per_second']:.2f}x, rows per CPU-s "
        f"{ratios['rows_per_cpu_second']:.2f}x, FVU {ratios['fvu']:.3f}x (< 1 = ours "
        "reconstructs better)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with --quick's defaults filled in."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="sasrec", help="activations' model=<m> partition")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument(
        "--rows", type=int, help=f"training rows per coder (500,000; --quick {QUICK_ROWS:,})"
    )
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument(
        "--lr", type=float, help="Adam lr for both (default: 2e-4 / sqrt(n_latents / 2**14))"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both")
    parser.add_argument(
        "--repeats", type=int, help="runs of each, alternating; rows/s = the best (3; --quick 1)"
    )
    parser.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    parser.add_argument(
        "--sparsify-python", type=Path, default=SPARSIFY_PYTHON,
        help="the interpreter that has eai-sparsify (default: setup_env.sh's venv)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, help=f"results JSON (default {RESULTS.relative_to(REPO)}; --quick: "
        "sae_quick.json in the temp directory)"
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help=f"a check: {QUICK_ROWS:,} rows, one run of each"
    )
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = QUICK_ROWS if args.quick else 500_000
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "sae_quick.json" if args.quick else RESULTS
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}; need >= 1")
    return args


def main() -> None:
    args = parse_args()
    partition = ArtifactPaths(Path(args.data_dir)).partition(args.model, args.layer).activations
    partition = partition.resolve()
    sae_config = SaeConfig(d_in=activation_width(partition), expansion=args.expansion, k=args.k)
    lr = args.lr if args.lr is not None else default_lr(sae_config.n_latents)
    train_config = SaeTrainConfig(
        lr=lr, batch_size=args.batch_size, rows_seen=args.rows, seed=args.seed
    )
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    key = f"{args.model}.layer{args.layer}.{device.type}.threads{args.threads}"
    started = provenance(device, args.threads) | {"load_average_at_start": os.getloadavg()}
    scratch = tempfile.TemporaryDirectory(prefix="sae-bench-")

    runs: dict[str, list[dict]] = {"ours": [], "sparsify": []}
    for repeat in range(args.repeats):
        # Alternate who goes first, so a burst of other work on the machine hits both
        for name in ("ours", "sparsify") if repeat % 2 == 0 else ("sparsify", "ours"):
            print(f"== {key}: {name}, run {repeat + 1}/{args.repeats} ...", flush=True)
            load = os.getloadavg()[0]
            if name == "ours":
                run = run_ours(partition, sae_config, train_config, device)
            else:
                out = Path(scratch.name) / f"sae_sparsify_{key}.json"
                run = run_sparsify(
                    partition, sae_config, train_config, device, args.threads, out,
                    args.sparsify_python,
                )  # fmt: skip
            runs[name].append(run | {"load_average_before": load})
    scratch.cleanup()
    ours, theirs = (best_run(runs[name]) for name in ("ours", "sparsify"))

    entry = started | {
        "load_average_at_end": os.getloadavg(),
        "quick": args.quick,
        "model": args.model,
        "layer": args.layer,
        "partition": str(partition),
        "device": str(device),
        "threads": args.threads,
        "config": {
            "d_in": sae_config.d_in,
            "n_latents": sae_config.n_latents,
            "expansion": sae_config.expansion,
            "k": sae_config.k,
            "aux_coefficient": sae_config.aux_coefficient,
            "dead_after_rows": sae_config.dead_after_rows,
            "lr": lr,
            "batch_size": args.batch_size,
            "rows": args.rows,
            "seed": args.seed,
        },
        "repeats": args.repeats,
        "ours": ours,
        "sparsify": theirs,
        "ratios": {
            "rows_per_second": ours["rows_per_second"] / theirs["rows_per_second"],
            "rows_per_cpu_second": max(ours["rows_per_cpu_second_runs"])
            / max(theirs["rows_per_cpu_second_runs"]),
            "fvu": ours["heldout"]["fvu"] / theirs["heldout"]["fvu"],
        },
    }
    results = args.out
    results.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(results.read_text()) if results.exists() else {}
    report[key] = entry
    write_json(report, results)
    print_table(entry)
    print(f"-> {results}")


if __name__ == "__main__":
    main()
