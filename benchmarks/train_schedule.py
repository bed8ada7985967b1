"""Training-schedule sweep: how many epochs the default models need, and at what lr.

Trains one model (SASRec, or the teacher over a saved SASRec's item vectors) on the default
store's sequences under several learning rates, each to `--max-epochs` or `--patience`, and
records after every epoch the validation NDCG@10 and every test user's NDCG@10. From those
curves it replays early stopping at each patience in `--replay` (the epoch the real loop would
stop at and the best epoch it would keep), so the epochs saved by a shorter patience or a
higher lr are read off one run each, together with the test NDCG@10 they cost: each replayed
schedule against the reference (the first lr, the longest patience) paired over the same test
users with a bootstrap 95% CI.

    .venv/bin/python benchmarks/train_schedule.py --data /tmp/recsae-now2/data --model sasrec \\
        --lrs 1e-3 2e-3 --batch-sizes 128 64 --max-epochs 60 --patience 10 --replay 3 5 6 10
    .venv/bin/python benchmarks/train_schedule.py --data /tmp/recsae-now2/data --model sasrec \\
        --negatives 0 256 --max-epochs 60 --patience 10 --replay 6 10 \\
        --out benchmarks/results/train_schedule_sasrec_sampled.json
    .venv/bin/python benchmarks/train_schedule.py --data /tmp/recsae-now2/data --model teacher \\
        --max-epochs 12 --patience 4 --replay 2 3 4

`--data` is the data/ directory of a store the default run built (the teacher reads its
SASRec). `--negatives`: the sampled softmax (`NextItemLoss`) against the full one.

Result: benchmarks/results/train_schedule_<model>.json and a printed table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recsae_pipeline.data.sequences import read_sequences  # noqa: E402
from recsae_pipeline.models.artifacts import load_recommender  # noqa: E402
from recsae_pipeline.models.metrics import per_user_ndcg  # noqa: E402
from recsae_pipeline.models.recommender import Recommender, RecommenderConfig  # noqa: E402
from recsae_pipeline.models.training import (  # noqa: E402
    LLAMA_TRAINING,
    SASREC_TRAINING,
    EpochReport,
    train_recommender,
    user_ranks,
)
from recsae_pipeline.report.stats import compare  # noqa: E402
from recsae_pipeline.storage.atomic import write_json  # noqa: E402
from recsae_pipeline.storage.registry import ArtifactPaths  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def build(model: str, paths: ArtifactPaths, num_items: int) -> Recommender:
    """A fresh model at the pipeline's default sizes (seed 0); the teacher over the store's
    SASRec item vectors."""
    torch.manual_seed(0)
    if model == "sasrec":
        return Recommender(RecommenderConfig.sasrec(num_items))
    sasrec = load_recommender(paths.model_dir("sasrec"), torch.device("cpu"))
    item_table = sasrec.item_vectors
    config = RecommenderConfig.teacher(num_items, d_item=item_table.shape[1])
    return Recommender(config, item_table=item_table.detach())


def curve(
    model: str,
    data: Path,
    lr: float,
    batch_size: int | None,
    negatives: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One training run: per epoch, seconds, valid NDCG@10 and each test user's NDCG@10."""
    paths = ArtifactPaths(data)
    sequences, num_items = read_sequences(paths.sequences)
    net = build(model, paths, num_items)
    base = SASREC_TRAINING if model == "sasrec" else LLAMA_TRAINING
    config = dataclasses.replace(
        base,
        lr=lr,
        batch_size=batch_size or base.batch_size,
        negatives=negatives,
        max_epochs=args.max_epochs or base.max_epochs,
        patience=args.patience or base.patience,
        progress_bar=False,
    )
    epochs: list[dict[str, Any]] = []

    def record(report: EpochReport) -> None:
        start = time.perf_counter()
        ranks, _ = user_ranks(net, sequences, "test", torch.device("cpu"))
        epochs.append(
            {
                "epoch": report.epoch,
                "seconds": report.seconds,
                "valid_ndcg@10": report.valid["ndcg@10"],
                "test_ndcg@10_users": per_user_ndcg(ranks, 10).tolist(),
                "test_seconds": time.perf_counter() - start,
            }
        )
        print(f"{model} lr={lr:g} batch={config.batch_size} negatives={negatives} epoch {report.epoch}: valid {report.valid['ndcg@10']:.4f} "
              f"test {np.mean(epochs[-1]['test_ndcg@10_users']):.4f} ({report.seconds:.1f}s)",
              flush=True)  # fmt: skip

    train_recommender(net, sequences, num_items, config, torch.device("cpu"), on_epoch=record)
    return {
        "lr": lr,
        "batch_size": config.batch_size,
        "negatives": negatives,
        "config": config.__dict__,
        "epochs": epochs,
    }


def replay(epochs: list[dict[str, Any]], patience: int) -> tuple[int, int]:
    """(epochs run, best epoch) of early stopping at `patience` on this validation curve:
    `train_recommender`'s rule (stop once `patience` epochs passed without a better one)."""
    best, best_epoch = -float("inf"), 0
    for row in epochs:
        if row["valid_ndcg@10"] > best:
            best, best_epoch = row["valid_ndcg@10"], row["epoch"]
        if row["epoch"] - best_epoch >= patience:
            return row["epoch"], best_epoch
    return epochs[-1]["epoch"], best_epoch


def summarise(runs: list[dict[str, Any]], patiences: list[int]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        for patience in patiences:
            run_epochs, best = replay(run["epochs"], patience)
            kept = run["epochs"][best - 1]
            seconds = sum(e["seconds"] for e in run["epochs"][:run_epochs])
            rows.append(
                {
                    "lr": run["lr"],
                    "batch_size": run["batch_size"],
                    "negatives": run["negatives"],
                    "patience": patience,
                    "epochs_run": run_epochs,
                    "best_epoch": best,
                    "train_seconds": seconds,
                    "valid_ndcg@10": kept["valid_ndcg@10"],
                    "test_ndcg@10": float(np.mean(kept["test_ndcg@10_users"])),
                    "_users": kept["test_ndcg@10_users"],
                }
            )
    reference = rows[len(patiences) - 1]  # the first run, longest patience (sorted)
    for row in rows:
        users = row.pop("_users") if row is not reference else reference["_users"]
        c = compare(f"lr {row['lr']:g}, batch {row['batch_size']}, negatives "
                    f"{row['negatives']}, patience {row['patience']}"
                    " vs the reference",
                    "test NDCG@10", "this schedule", users, "reference", reference["_users"],
                    unit="users")  # fmt: skip
        row["test_diff_vs_reference"] = {"mean": c.difference, "low": c.ci95[0],
                                         "high": c.ci95[1], "verdict": c.verdict}  # fmt: skip
    reference.pop("_users", None)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a default store's data/")
    parser.add_argument("--model", choices=("sasrec", "teacher"), default="sasrec")
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=None, help="default: the model's own"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[None],
                        help="default: the model's own")  # fmt: skip
    parser.add_argument("--negatives", type=int, nargs="+", default=[0],
                        help="sampled-softmax negatives (0: full softmax)")  # fmt: skip
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None, help="the runs' own patience")
    parser.add_argument("--replay", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    patiences = sorted(args.replay)
    runs = [
        curve(args.model, args.data, lr, b, n, args)
        for n in args.negatives
        for b in args.batch_sizes
        for lr in args.lrs or [(SASREC_TRAINING if args.model == "sasrec" else LLAMA_TRAINING).lr]
    ]
    rows = summarise(runs, patiences)
    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    result = {
        "benchmark": "benchmarks/train_schedule.py",
        "command": " ".join(["benchmarks/train_schedule.py", *sys.argv[1:]]),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "threads": args.threads,
        "load_average_at_end": list(os.getloadavg()),
        "model": args.model,
        "schedules": rows,
        "curves": [
            {
                "lr": r["lr"],
                "batch_size": r["batch_size"],
                "negatives": r["negatives"],
                "valid_ndcg@10": [e["valid_ndcg@10"] for e in r["epochs"]],
                "test_ndcg@10": [float(np.mean(e["test_ndcg@10_users"])) for e in r["epochs"]],
                "seconds": [e["seconds"] for e in r["epochs"]],
            }
            for r in runs
        ],  # fmt: skip
    }
    out = args.out or RESULTS / f"train_schedule_{args.model}.json"
    write_json(result, out)
    print(
        f"{'lr':>7} {'batch':>5} {'pat':>4} {'run':>4} {'best':>4} {'seconds':>8} {'test':>7}  diff [95% CI]"
    )
    for row in rows:
        d = row["test_diff_vs_reference"]
        print(f"{row['lr']:7g} {row['batch_size']:5d} {row['negatives']:5d} {row['patience']:4d} {row['epochs_run']:4d} {row['best_epoch']:4d} "
              f"{row['train_seconds']:8.1f} {row['test_ndcg@10']:7.4f}  {d['mean']:+.4f} "
              f"[{d['low']:+.4f}, {d['high']:+.4f}]")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
