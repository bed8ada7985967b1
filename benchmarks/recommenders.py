"""Recommenders benchmark: SASRec, teacher, SLMRec student and its CE-only ablation, over seeds.

For each dataset (the default synthetic log, `recsae materialize`'s default source, and
MovieLens-100k from the `recbole` wheel's atomic files) the data assets are materialized once
through Dagster. Each seed then trains the four models on a copy of that store (its own
storage root, so every seed sees the same sequences and test split, byte for byte), with the
same `seed` for all four, and `recommender_eval` scores them and popularity.

Reported per model: mean and spread over seeds of test NDCG@10 and HR@10 (full ranking over
all items, each user's seen items filtered), training time and inference cost. Reported per
pair (student - CE-only student, student - teacher, teacher - SASRec, SASRec - popularity):
the NDCG@10 difference with a paired 95% CI twice, over seeds (Student's t on the per-seed
means) and over test users (each user's NDCG@10 averaged over seeds, paired bootstrap);
and, per seed, the same over users.

    nice -n 10 .venv/bin/python benchmarks/recommenders.py     # --seeds 0 1 2 --threads 2
    .venv/bin/python benchmarks/recommenders.py --quick         # smoke test at tiny sizes

Results: benchmarks/results/recommenders.json (a --quick run writes to the temp directory
unless --out says otherwise). `--max-epochs N` caps every model's epochs and is recorded in
the results. `--recbole` also runs RecBole 1.2.1's SASRec on the first seed's sequences in
its own venv (`bash benchmarks/recbole/setup_env.sh` once), written beside --out as
recbole.json.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import torch

from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.defs.assets import data, models
from recsae_pipeline.defs.resources import DataQuality, StorageRoot, TorchDevice
from recsae_pipeline.models.artifacts import load_recommender, read_metrics
from recsae_pipeline.models.training import evaluate
from recsae_pipeline.report.stats import Comparison, compare, format_ci, spread
from recsae_pipeline.storage.atomic import write_json
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline_tests.network import recbole_wheel_ml100k

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results" / "recommenders.json"
RECBOLE_PYTHON = ROOT / "recbole" / ".venv" / "bin" / "python"
DATASETS = ("synthetic", "ml-100k")
DATA_ASSETS = ("raw_interactions", "item_catalog", "sequences")
EVALUATED = ("popularity", *models.MODELS)
"""The rows of `recommender_eval`: popularity and the four trained models."""
PAIRS = (
    ("student", "student_ce"),
    ("student", "teacher"),
    ("teacher", "sasrec"),
    ("sasrec", "popularity"),
)
"""Each comparison is a - b on test NDCG@10."""
SPECS = {spec.name: spec for spec in models.MODEL_SPECS}
METRIC = "ndcg@10"
RESAMPLES = 2000
PER_SEED = ("ndcg@10", "hr@10", "train_seconds", "ms_per_1000_users", "best_epoch")

QUICK_TRAINING = {"max_epochs": 8, "patience": 3, "batch_size": 64, "lr": 5e-3}
QUICK_MODELS = {
    "sasrec": {**QUICK_TRAINING, "hidden_size": 16, "max_len": 20},
    "teacher": {**QUICK_TRAINING, "hidden_size": 16, "num_layers": 4, "num_heads": 2, "max_len": 20},
    "student": {**QUICK_TRAINING, "num_layers": 2},
    "student_ce": {**QUICK_TRAINING, "num_layers": 2},
}  # fmt: skip
QUICK_SYNTHETIC = {"n_users": 1200, "n_items": 300, "mean_sequence_length": 25, "n_franchises": 12}
"""--quick: the tests' tiny models (recsae_pipeline_tests/support.py) for up to 8 epochs, on
configs/small.yaml's synthetic log: enough to beat popularity, so the blocking checks pass."""


class SeedRun(NamedTuple):
    """One seed's four models on one dataset, as `recommender_eval` scored them."""

    seed: int
    rows: dict[str, dict[str, Any]]
    """recommender_eval's row per model (popularity included)."""
    users: dict[str, np.ndarray]
    """Each test user's NDCG@10 per model, indexed by the user's position in `sequences`."""
    wall_seconds: dict[str, float]
    """Wall time of each asset's materialization (training, test evaluation, checks)."""


def materialize(
    root: Path, selection: list[str], ops: dict[str, Any], device: TorchDevice
) -> float:
    """Materialize `selection` (with their checks) on the store at `root`; wall seconds.
    Exits naming the failed step or check when the run does not succeed."""
    start = time.perf_counter()
    result = dg.materialize(
        [
            *dg.load_assets_from_modules([data, models]),
            *dg.load_asset_checks_from_modules([data, models]),
        ],
        selection=selection,
        resources={
            "storage": StorageRoot(path=str(root)),
            "quality": DataQuality(),
            "device": device,
        },
        run_config={"ops": ops, "loggers": {"console": {"config": {"log_level": "INFO"}}}},
        raise_on_error=False,
    )
    if not result.success:
        failed = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
        steps = [e.step_key for e in result.get_step_failure_events()]
        raise SystemExit(f"{selection} on {root} failed: steps {steps}, failed checks {failed}")
    return time.perf_counter() - start


def dataset_ops(dataset: str, quick: bool, cache: Path) -> dict[str, Any]:
    """The data assets' run config for `dataset` (defaults, or tiny ones under --quick)."""
    if dataset == "ml-100k":
        source = {"source": "recbole", "recbole": {"path": str(recbole_wheel_ml100k(cache))}}
        return {"raw_interactions": {"config": source}}
    ops: dict[str, Any] = {"raw_interactions": {"config": {"source": "synthetic"}}}
    if quick:
        ops["raw_interactions"]["config"]["synthetic"] = QUICK_SYNTHETIC
        ops["sequences"] = {"config": {"user_core": 3, "item_core": 3}}
    return ops


def model_configs(quick: bool, max_epochs: int | None) -> dict[str, dict[str, Any]]:
    """Each model's config apart from the seed: the asset defaults (no progress bar), the tiny
    ones under --quick, max_epochs capped by --max-epochs."""
    configs: dict[str, dict[str, Any]] = {}
    for name in models.MODELS:
        config = {**(QUICK_MODELS[name] if quick else {}), "progress_bar": False}
        if max_epochs is not None:
            default = SPECS[name].config().max_epochs
            config["max_epochs"] = min(config.get("max_epochs", default), max_epochs)
        configs[name] = config
    return configs


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_seed(
    root: Path, seed: int, configs: dict[str, dict[str, Any]], device: TorchDevice, label: str
) -> SeedRun:
    """The four models (each with `seed`) and recommender_eval on the store at `root`."""
    paths = ArtifactPaths(root)
    wall: dict[str, float] = {}
    for name in models.MODELS:
        print(f"-- {label} seed {seed}: training {name} ...", flush=True)
        ops = {name: {"config": {**configs[name], "seed": seed}}}
        wall[name] = materialize(root, [name], ops, device)
        saved = read_metrics(paths.model_dir(name))
        print(
            f"-- {label} seed {seed}: {name} done in {wall[name]:.0f} s (best epoch "
            f"{saved['best_epoch']} of {saved['epochs_run']}, test NDCG@10 "
            f"{saved['test']['ndcg@10']:.4f})",
            flush=True,
        )
    wall["recommender_eval"] = materialize(root, ["recommender_eval"], {}, device)
    rows = {r["model"]: r for r in pq.read_table(paths.recommender_eval).to_pylist()}
    table = pq.read_table(paths.recommender_eval_users).to_pandas()
    users: dict[str, np.ndarray] = {}
    for name, group in table.groupby("model"):
        group = group.sort_values("user")
        if not np.array_equal(group["user"].to_numpy(), np.arange(len(group))):
            raise SystemExit(f"{paths.recommender_eval_users}: {name}'s users are not 0..n-1")
        users[str(name)] = group[METRIC].to_numpy(dtype=np.float64)
    missing = set(EVALUATED) - set(rows) | set(EVALUATED) - set(users)
    if missing:
        raise SystemExit(f"recommender_eval on {root} lacks {sorted(missing)}")
    print(f"-- {label} seed {seed}: evaluated in {wall['recommender_eval']:.0f} s", flush=True)
    return SeedRun(seed, rows, users, wall)


def summarize(runs: list[SeedRun]) -> dict[str, Any]:
    """Per model: spread over seeds; per pair: the comparisons over seeds and over users."""
    seeds = [r.seed for r in runs]
    n_users = {len(u) for r in runs for u in r.users.values()}
    if len(n_users) != 1:
        raise SystemExit(f"test users differ across models or seeds: {sorted(n_users)}")
    table_gap = max(
        abs(float(r.users[m].mean()) - r.rows[m][METRIC]) for r in runs for m in EVALUATED
    )
    if table_gap > 1e-6:
        print(f"warning: per-user NDCG@10 means differ from the table by {table_gap:.2e}")
    entry_models: dict[str, Any] = {}
    for name in EVALUATED:
        per_seed = {k: [float(r.rows[name][k]) for r in runs] for k in PER_SEED}
        if name in models.MODELS:
            per_seed["wall_seconds"] = [r.wall_seconds[name] for r in runs]
        params = {int(r.rows[name]["params"]) for r in runs}
        if len(params) != 1:
            raise SystemExit(f"{name}'s parameter count differs across seeds: {sorted(params)}")
        entry_models[name] = {
            **{k: spread(per_seed[k]) for k in ("ndcg@10", "hr@10")},
            "train_seconds": spread(per_seed["train_seconds"]),
            "ms_per_1000_users": spread(per_seed["ms_per_1000_users"]),
            "per_seed": per_seed,
            "params": params.pop(),
        }
    comparisons, per_seed_comparisons = [], []
    for a, b in PAIRS:
        name = f"{a} - {b}"
        over_seeds = compare(
            name, METRIC, a, [r.rows[a][METRIC] for r in runs], b,
            [r.rows[b][METRIC] for r in runs], "seeds", seeds=seeds,
        )  # fmt: skip
        mean_a = np.mean([r.users[a] for r in runs], axis=0)
        mean_b = np.mean([r.users[b] for r in runs], axis=0)
        over_users = compare(
            name, METRIC, a, mean_a, b, mean_b, "users", resamples=RESAMPLES, seed=0,
            seeds=seeds, per_user="NDCG@10 averaged over seeds",
        )  # fmt: skip
        comparisons += [over_seeds.as_dict(), over_users.as_dict()]
        for r in runs:
            one = compare(
                name, METRIC, a, r.users[a], b, r.users[b], "users", resamples=RESAMPLES,
                seed=0, seeds=[r.seed],
            )  # fmt: skip
            per_seed_comparisons.append(one.as_dict())
    return {
        "users": n_users.pop(),
        "seeds": seeds,
        "models": entry_models,
        "comparisons": comparisons,
        "per_seed_comparisons": per_seed_comparisons,
        "users_vs_table_max_abs_diff": table_gap,
    }


def print_dataset(dataset: str, entry: dict[str, Any]) -> None:
    seeds = entry["seeds"]
    print(f"\n### {dataset}: {entry['users']} test users, seeds {seeds}")
    print("| model | NDCG@10 mean ± std [min, max] | HR@10 mean ± std | params | train s | ms / 1k users |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, m in entry["models"].items():
        n, h = m["ndcg@10"], m["hr@10"]
        print(
            f"| {name} | {n['mean']:.4f} ± {n['std']:.4f} [{n['min']:.4f}, {n['max']:.4f}] | "
            f"{h['mean']:.4f} ± {h['std']:.4f} | {m['params']:,} | "
            f"{m['train_seconds']['mean']:.0f} | {m['ms_per_1000_users']['mean']:.0f} |"
        )
    print("\n| a - b (test NDCG@10) | over | n | a | b | difference [95% CI] | verdict |")
    print("|---|---|---|---|---|---|---|")
    for row in entry["comparisons"]:
        c = Comparison.from_dict(row)
        print(
            f"| {c.name} | {c.unit} | {c.n} | {c.a.value:.4f} | {c.b.value:.4f} | "
            f"{format_ci(c)} | {c.verdict} |"
        )


# RecBole's SASRec head-to-head (--recbole), on the first seed's sequences.


def export_atomic(root: Path, out_dir: Path, name: str) -> Path:
    """Our sequences as `<name>.inter` with timestamps = positions (strictly increasing per user),
    so RecBole's time-ordered leave-one-out reproduces our split."""
    sequences, _ = read_sequences(ArtifactPaths(root).sequences)
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


def ours_unfiltered(root: Path) -> dict[str, float]:
    """Our SASRec scored RecBole's way: targets ranked against every item, seen ones included."""
    paths = ArtifactPaths(root)
    saved = read_metrics(paths.model_dir("sasrec"))
    sequences, num_items = read_sequences(paths.sequences)
    model = load_recommender(paths.model_dir("sasrec"), torch.device("cpu"))
    test = evaluate(
        model, sequences, num_items, "test", torch.device("cpu"), sampled=False,
        filter_seen_items=False,
    )  # fmt: skip
    history, best = saved["history"], saved["best_epoch"]
    return {
        "test_ndcg@10": test["ndcg@10"],
        "test_hr@10": test["hr@10"],
        "best_epoch": best,
        "seconds_to_best_epoch": sum(h["seconds"] for h in history[:best]),
        "mean_epoch_seconds": sum(h["seconds"] for h in history) / len(history),
        "train_seconds": saved["train_seconds"],
    }


def recbole_head_to_head(
    root: Path, dataset: str, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    name = dataset.replace("-", "")
    atomic = export_atomic(root, work / "atomic" / name, name)
    budget = None if args.recbole_converge else args.budget_seconds
    recbole = run_recbole(atomic, name, budget, args.threads, work / f"recbole_{name}.json")
    entry = {"ours": ours_unfiltered(root), "recbole": recbole, "budget_seconds": budget}
    o, r = entry["ours"], recbole
    print(f"SASRec, RecBole's protocol: ours NDCG@10 {o['test_ndcg@10']:.4f}, RecBole 1.2.1 "
          f"{r['test_ndcg_at_10']:.4f}; s to best epoch {o['seconds_to_best_epoch']:.0f} vs "
          f"{r['seconds_to_best_epoch']:.0f}; RecBole budget exhausted: {r['budget_exhausted']}")  # fmt: skip
    return entry


def provenance(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Commit, time, the command line and the machine of this run."""

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    python = Path(sys.executable)
    python_arg = str(python.relative_to(REPO)) if python.is_relative_to(REPO) else str(python)
    niceness = os.nice(0)
    command = shlex.join([python_arg, *sys.argv])
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_at_start": git(
            "status", "--porcelain", "--", "recsae_pipeline", "benchmarks/recommenders.py"
        ).splitlines(),
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": f"nice -n {niceness} {command}" if niceness else command,
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads on {device}",
        # Timings are only as quiet as the machine: a shared one's load is recorded with them.
        "load_average": [{"after": "start", "1/5/15 min": os.getloadavg()}],
        "quick": args.quick,
        "max_epochs_cap": args.max_epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument(
        "--out", type=Path, help=f"default {RESULTS.relative_to(REPO)} (--quick: the temp dir)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument(
        "--max-epochs", type=int, help="cap every model's max_epochs (recorded in the results)"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="keep the per-seed stores here (default: a temp dir, removed)"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("RECSAE_TEST_CACHE", Path.home() / ".cache" / "recsae-tests")),
        help="where the recbole wheel (MovieLens-100k) is downloaded once",
    )
    parser.add_argument("--recbole", action="store_true", help="also run RecBole's SASRec")
    parser.add_argument("--budget-seconds", type=float, default=600.0, help="RecBole's budget")
    parser.add_argument(
        "--recbole-converge", action="store_true", help="let RecBole run to its own early stopping"
    )
    args = parser.parse_args()
    out = args.out or (Path(tempfile.gettempdir()) / RESULTS.name if args.quick else RESULTS)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")

    device = TorchDevice(device=args.device, threads=args.threads)
    report = {**provenance(args, device.torch_device), "datasets": {}}
    recbole_report: dict[str, Any] = {"datasets": {}}
    configs = model_configs(args.quick, args.max_epochs)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="recsae-recbench-"))
    start = time.perf_counter()
    print(f"{report['machine']}; stores under {work}; results to {out}", flush=True)
    for dataset in args.datasets:
        base = work / dataset / "data"
        ops = dataset_ops(dataset, args.quick, args.cache)
        print(f"== {dataset}: materializing the data assets ...", flush=True)
        data_seconds = materialize(base, list(DATA_ASSETS), ops, device)
        runs = []
        for seed in args.seeds:
            root = work / dataset / f"seed={seed}"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(base, root)
            runs.append(train_seed(root, seed, configs, device, dataset))
            print(f"-- {dataset} seed {seed}: {sum(runs[-1].wall_seconds.values()):.0f} s in all")
        entry = {
            **summarize(runs),
            "sequences_sha256": sha256(ArtifactPaths(base).sequences),
            "data_config": ops,
            "model_configs": configs,
            "data_seconds": data_seconds,
        }
        report["datasets"][dataset] = entry
        report["wall_seconds"] = time.perf_counter() - start
        report["load_average"].append({"after": dataset, "1/5/15 min": os.getloadavg()})
        write_json(report, out)
        print_dataset(dataset, entry)
        if args.recbole:
            root = work / dataset / f"seed={args.seeds[0]}"
            recbole_report["datasets"][dataset] = recbole_head_to_head(root, dataset, work, args)
            write_json({**provenance(args, device.torch_device), **recbole_report},
                       out.with_name("recbole.json"))  # fmt: skip
    print(f"\nwrote {out} ({report['wall_seconds'] / 60:.1f} min)")
    if args.work_dir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
