"""Recommenders benchmark: our SASRec vs RecBole 1.2.1's SASRec, and teacher/student/ablation.

For each dataset (MovieLens-100k from the `recbole` wheel's atomic files, and the default
synthetic log) it materializes the pipeline's data and model assets through Dagster, exports
the very same sequences as RecBole atomic files (timestamps rewritten as positions so RecBole's
time-ordered leave-one-out reproduces our split), runs RecBole's SASRec in its own venv
(benchmarks/recbole/) under the same wall-clock budget, and prints both, plus the
teacher/student/ablation table from `recommender_eval`.

    bash benchmarks/recbole/setup_env.sh          # once: RecBole's own venv
    .venv/bin/python benchmarks/recommenders.py   # --budget-seconds 600 --recbole-converge

Results land in benchmarks/results/recommenders.json (and the printed tables).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import torch

from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.defs.assets import data, models
from recsae_pipeline.defs.resources import DataQuality, StorageRoot, TorchDevice
from recsae_pipeline.models.artifacts import load_recommender
from recsae_pipeline.models.training import evaluate
from recsae_pipeline.storage.atomic import write_json
from recsae_pipeline_tests.network import recbole_wheel_ml100k

ROOT = Path(__file__).resolve().parent
RECBOLE_PYTHON = ROOT / "recbole" / ".venv" / "bin" / "python"


def materialize(root: Path, source_config: dict, threads: int | None) -> float:
    """Data + model assets with their checks; returns wall seconds."""
    start = time.perf_counter()
    no_bar = {"progress_bar": False}
    result = dg.materialize(
        [
            *dg.load_assets_from_modules([data, models]),
            *dg.load_asset_checks_from_modules([data, models]),
        ],
        resources={
            "storage": StorageRoot(path=str(root)),
            "quality": DataQuality(),
            "device": TorchDevice(threads=threads),
        },
        run_config={
            "ops": {
                "raw_interactions": {"config": source_config},
                **{m: {"config": no_bar} for m in models.MODELS},
            }
        },
        raise_on_error=False,
    )
    if not result.success:
        failed = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
        print(f"warning: run not fully successful; failed checks: {failed}", file=sys.stderr)
    return time.perf_counter() - start


def export_atomic(root: Path, out_dir: Path, name: str) -> Path:
    """Our sequences as `<name>.inter` with timestamps = positions (strictly increasing per user)."""
    sequences, _ = read_sequences(root / "sequences" / "sequences.parquet")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.inter"
    with path.open("w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user, items in enumerate(sequences, start=1):
            f.writelines(f"{user}\t{item}\t{pos}\n" for pos, item in enumerate(items))
    return out_dir


def run_recbole(atomic_dir: Path, name: str, budget: float | None, threads: int, out: Path) -> dict:
    if not RECBOLE_PYTHON.exists():
        raise SystemExit(
            f"{RECBOLE_PYTHON} is missing: run `bash benchmarks/recbole/setup_env.sh` first."
        )
    mode = ["--converge"] if budget is None else ["--budget-seconds", str(budget)]
    cmd = [str(RECBOLE_PYTHON), str(ROOT / "recbole" / "run_sasrec.py"), "--data-dir", str(atomic_dir), "--dataset", name,
           *mode, "--threads", str(threads), "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, env={**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    return json.loads(out.read_text())


def ours(root: Path) -> dict:
    saved = json.loads((root / "models" / "sasrec" / "metrics.json").read_text())
    # RecBole ranks sequential models' targets against every item, seen ones included; score
    # ours the same way for the head-to-head (the pipeline's own tables filter seen items).
    sequences, num_items = read_sequences(root / "sequences" / "sequences.parquet")
    model = load_recommender(root / "models" / "sasrec", torch.device("cpu"))
    unfiltered = evaluate(
        model,
        sequences,
        num_items,
        "test",
        torch.device("cpu"),
        sampled=False,
        filter_seen_items=False,
    )
    history = saved["history"]
    best = saved["best_epoch"]
    return {
        "test_ndcg@10": unfiltered["ndcg@10"],
        "test_hr@10": unfiltered["hr@10"],
        "test_ndcg@10_seen_filtered": saved["test"]["ndcg@10"],
        "test_hr@10_seen_filtered": saved["test"]["hr@10"],
        "best_epoch": best,
        "seconds_to_best_epoch": sum(h["seconds"] for h in history[:best]),
        "mean_epoch_seconds": sum(h["seconds"] for h in history) / len(history),
        "train_seconds": saved["train_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=600.0,
        help="RecBole's wall-clock training budget per dataset",
    )
    parser.add_argument(
        "--recbole-converge", action="store_true", help="let RecBole run to its own early stopping"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--datasets", nargs="+", default=["ml-100k", "synthetic"], choices=["ml-100k", "synthetic"]
    )
    parser.add_argument("--skip-recbole", action="store_true")
    parser.add_argument(
        "--report-only", action="store_true", help="re-score and print an earlier run's results"
    )
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    previous = args.out_dir / "recommenders.json"
    # Datasets not re-run this time (and RecBole results under --skip-recbole) are kept.
    report: dict = json.loads(previous.read_text()) if previous.exists() else {"datasets": {}}
    report["threads"] = args.threads
    if not (args.skip_recbole or args.report_only):
        report["budget_seconds"] = None if args.recbole_converge else args.budget_seconds
    for dataset in args.datasets:
        root = args.out_dir / dataset
        if args.report_only:
            entry = report["datasets"][dataset] | {"ours": ours(root)}
            report["datasets"][dataset] = entry
            print_dataset(dataset, entry)
            continue
        source = {"source": "synthetic"}
        if dataset == "ml-100k":
            source = {
                "source": "recbole",
                "recbole": {"path": str(recbole_wheel_ml100k(args.out_dir / "cache"))},
            }
        print(f"== {dataset}: materializing data and model assets ...", flush=True)
        pipeline_seconds = materialize(root, source, args.threads)
        entry = {"pipeline_seconds": pipeline_seconds, "ours": ours(root)}
        entry["eval"] = pq.read_table(root / "models" / "recommender_eval.parquet").to_pylist()
        if args.skip_recbole and "recbole" in report["datasets"].get(dataset, {}):
            entry["recbole"] = report["datasets"][dataset]["recbole"]
        elif not args.skip_recbole:
            name = dataset.replace("-", "")
            atomic = export_atomic(root, args.out_dir / "atomic" / name, name)
            budget = None if args.recbole_converge else args.budget_seconds
            entry["recbole"] = run_recbole(
                atomic, name, budget, args.threads, args.out_dir / f"recbole_{name}.json"
            )
        report["datasets"][dataset] = entry
        write_json(report, args.out_dir / "recommenders.json")
        print_dataset(dataset, entry)
    if args.report_only:
        write_json(report, args.out_dir / "recommenders.json")


def print_dataset(dataset: str, entry: dict) -> None:
    o = entry["ours"]
    print(f"\n### {dataset} (pipeline wall time {entry['pipeline_seconds']:.0f} s)")
    print(
        "SASRec head-to-head, RecBole's protocol (targets ranked against all items, seen included):"
    )
    print("| SASRec | test NDCG@10 | test HR@10 | best epoch | s to best epoch | s / epoch |")
    print("|---|---|---|---|---|---|")
    print(
        f"| ours | {o['test_ndcg@10']:.4f} | {o['test_hr@10']:.4f} | {o['best_epoch']} | {o['seconds_to_best_epoch']:.0f} | {o['mean_epoch_seconds']:.1f} |"
    )
    if "recbole" in entry:
        r = entry["recbole"]
        print(
            f"| RecBole 1.2.1 | {r['test_ndcg_at_10']:.4f} | {r['test_hit_at_10']:.4f} | {r['best_epoch']} | {r['seconds_to_best_epoch']:.0f} | {r['mean_epoch_seconds']:.1f} |"
        )
        print(f"ratios ours/RecBole: NDCG@10 {o['test_ndcg@10'] / max(r['test_ndcg_at_10'], 1e-12):.2f}x, "
              f"time to best epoch {o['seconds_to_best_epoch'] / max(r['seconds_to_best_epoch'], 1e-9):.3f}x, "
              f"time per epoch {o['mean_epoch_seconds'] / max(r['mean_epoch_seconds'], 1e-9):.3f}x; "
              f"RecBole budget exhausted: {r['budget_exhausted']}")  # fmt: skip
    print("\n| model | test NDCG@10 | HR@10 | sampled NDCG@10 | params | train s | ms / 1k users |")
    print("|---|---|---|---|---|---|---|")
    for row in entry["eval"]:
        print(
            f"| {row['model']} | {row['ndcg@10']:.4f} | {row['hr@10']:.4f} | {row['sampled_ndcg@10']:.4f} | {row['params']:,} | {row['train_seconds']:.0f} | {row['ms_per_1000_users']:.0f} |"
        )
    rows = {r["model"]: r for r in entry["eval"]}
    t, s, ce = rows["teacher"], rows["student"], rows["student_ce"]
    print(f"student vs teacher: {t['ms_per_1000_users'] / s['ms_per_1000_users']:.2f}x faster inference, "
          f"{1 - s['ndcg@10'] / t['ndcg@10']:+.1%} relative NDCG@10 loss; distilled - CE-only NDCG@10 = {s['ndcg@10'] - ce['ndcg@10']:+.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
