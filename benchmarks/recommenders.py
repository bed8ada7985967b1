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
the results. `--recbole` also runs RecBole 1.2.1's SASRec on the same sequences in its own
venv (`bash benchmarks/recbole/setup_env.sh` once) against ours trained afresh, both scored
RecBole's way, written beside --out as recbole.json with a plot of both validation curves
(recbole_curves.png); `--head-to-head-only` skips the four models over seeds:

    # RecBole to its own early stopping (about an hour), then ours on the same sequences
    flock /tmp/recsae-bench.lock nice -n 10 .venv/bin/python benchmarks/recommenders.py \
        --datasets ml-100k --head-to-head-only --recbole-converge --threads 1 \
        --sasrec-config configs/movielens-100k.yaml

`--recbole-json FILE` reuses a finished `run_sasrec.py` result (checked to be on the same
exported sequences) instead of running RecBole again.
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
import yaml

from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.defs.assets import data, models
from recsae_pipeline.defs.resources import DataQuality, StorageRoot, TorchDevice
from recsae_pipeline.models.artifacts import read_metrics
from recsae_pipeline.models.metrics import ndcg_at_k, per_user_ndcg
from recsae_pipeline.models.recommender import Recommender, RecommenderConfig
from recsae_pipeline.models.training import EpochReport, evaluate, train_recommender, user_ranks
from recsae_pipeline.report.plots import new_figure, save_figure
from recsae_pipeline.report.stats import Comparison, bootstrap_ci, compare, format_ci, spread
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


# RecBole's SASRec head-to-head (--recbole): the same sequences, split and ranking protocol.

SASREC_ARCHITECTURE = {"hidden_size", "num_layers", "num_heads", "dropout", "max_len"}
"""The `sasrec` asset's config fields that build the model (the rest configure training)."""


def export_atomic(root: Path, out_dir: Path, name: str) -> Path:
    """Our sequences as `<name>.inter` with timestamps = positions (strictly increasing per user),
    so RecBole's time-ordered leave-one-out reproduces our split. Users are tokens 1..n in
    `sequences` order, items keep their indices; RecBole filters nothing (run_sasrec.py)."""
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


def reuse_recbole(path: Path, inter_file: Path) -> dict[str, Any]:
    """A finished run_sasrec.py result, refused unless it trained on exactly `inter_file`."""
    result = json.loads(path.read_text())
    if result.get("status") != "done" or not result.get("test_ranks"):
        raise SystemExit(f"{path} is not a finished run_sasrec.py result with per-user test ranks")
    if result.get("data_sha256") != sha256(inter_file):
        raise SystemExit(f"{path} was trained on other data than {inter_file} (sha256 differs)")
    return result


def ndcg_per_user(ranks: list[int] | np.ndarray) -> np.ndarray:
    """NDCG@10 of each 0-based target rank."""
    return per_user_ndcg(torch.as_tensor(np.asarray(ranks)), 10).numpy()


def ours_head_to_head(
    root: Path, overrides: dict[str, Any], seed: int, device: torch.device
) -> dict[str, Any]:
    """Our SASRec trained as the `sasrec` asset trains it in process (its config's defaults,
    `overrides` on top), tested RecBole's way: each target ranked against every item, seen
    ones included. Per epoch: its seconds (training plus the validation that early stopping
    reads, seen items filtered, as in the pipeline) and validation NDCG@10 both ways; the
    unfiltered one is computed after the epoch's clock stops, so it costs no timed seconds."""
    sequences, num_items = read_sequences(ArtifactPaths(root).sequences)
    config = models.SasrecConfig(**{"progress_bar": False, **overrides, "seed": seed})
    torch.manual_seed(config.seed)  # as the asset does, before building the model
    model = Recommender(
        RecommenderConfig.sasrec(num_items, **config.model_dump(include=SASREC_ARCHITECTURE))
    )
    curve: list[dict[str, Any]] = []
    extra, extra_cpu = 0.0, 0.0

    def on_epoch(report: EpochReport) -> None:
        nonlocal extra, extra_cpu
        start, start_cpu = time.perf_counter(), time.process_time()
        cpu = start_cpu - cpu_start - extra_cpu
        valid = evaluate(
            model, sequences, num_items, "valid", device, sampled=False, filter_seen_items=False
        )
        extra += time.perf_counter() - start
        extra_cpu += time.process_time() - start_cpu
        elapsed = report.seconds + (curve[-1]["elapsed_seconds"] if curve else 0.0)
        curve.append({
            "epoch": report.epoch, "seconds": report.seconds, "elapsed_seconds": elapsed,
            "cpu_seconds": cpu,
            "train_loss": report.train_loss, "valid_ndcg_at_10": valid["ndcg@10"],
            "valid_hit_at_10": valid["hr@10"], "valid_ndcg_at_10_seen_filtered":
            report.valid["ndcg@10"], "load_average": os.getloadavg(),
        })  # fmt: skip
        print(
            f"ours epoch {report.epoch:3d}  {report.seconds:5.2f}s  loss {report.train_loss:.4f}  "
            f"valid NDCG@10 {valid['ndcg@10']:.4f} (seen filtered "
            f"{report.valid['ndcg@10']:.4f})",
            flush=True,
        )

    cpu_start = time.process_time()
    trained = train_recommender(
        model, sequences, num_items, config.train_config(), device, on_epoch=on_epoch
    )
    ranks = user_ranks(model, sequences, "test", device, filter_seen_items=False)[0]
    best = curve[trained.best_epoch - 1]
    return {
        "implementation": "recsae",
        "config": config.model_dump(),
        "n_users": len(sequences),
        "n_items": num_items,
        "epochs": curve,
        "epochs_run": trained.epochs_run,
        "best_epoch": trained.best_epoch,
        "best_valid_ndcg_at_10": best["valid_ndcg_at_10"],
        "best_valid_ndcg_at_10_seen_filtered": trained.best_valid["ndcg@10"],
        "test_ndcg_at_10": ndcg_at_k(ranks, 10),
        "seconds_to_best_epoch": best["elapsed_seconds"],
        "cpu_seconds_to_best_epoch": best["cpu_seconds"],
        "mean_epoch_seconds": float(np.mean([e["seconds"] for e in curve])),
        "train_seconds": trained.train_seconds - extra,
        "unfiltered_curve_seconds": extra,
        "test_users": list(range(1, len(sequences) + 1)),
        "test_ranks": ranks.tolist(),
    }


CLOCKS = (
    ("elapsed_seconds", "wall seconds into training (log)"),
    ("cpu_seconds", "CPU seconds of the training process (log)"),
)
"""The plot's x axes: wall time, and CPU time, which a shared machine's load (or a process
stopped a while by another's timing run) does not stretch."""


def plot_curves(entries: dict[str, dict[str, Any]], path: Path) -> None:
    """Validation NDCG@10 (RecBole's protocol) against wall and CPU seconds into training, both
    sides, the best epoch of each marked; two panels per dataset, side by side."""
    fig, axes = new_figure(width=12.0 * len(entries), height=4.0, ncols=2 * len(entries))
    axes = np.asarray(axes).reshape(len(entries), 2)
    for row, (dataset, entry) in zip(axes, entries.items(), strict=True):
        for ax, (clock, xlabel) in zip(row, CLOCKS, strict=True):
            for side, label, colour in (("ours", "ours (recsae)", "C0"), ("recbole", "RecBole 1.2.1", "C1")):  # fmt: skip
                run = entry[side]
                x = [e[clock] for e in run["epochs"]]
                y = [e["valid_ndcg_at_10"] for e in run["epochs"]]
                ax.plot(x, y, ".-", color=colour, ms=3, lw=1, label=label)
                best = next(e for e in run["epochs"] if e["epoch"] == run["best_epoch"])
                ax.plot([best[clock]], [best["valid_ndcg_at_10"]], "o", color=colour, mfc="none",
                        ms=9, label=f"best epoch: {best[clock]:.0f} s")  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("valid NDCG@10 (all items, history unmasked)")
            ax.set_title(f"SASRec, {dataset}: {entry['n_users']} users x {entry['n_items']} items")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    save_figure(fig, path)


def recbole_head_to_head(
    root: Path, dataset: str, work: Path, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """RecBole's SASRec and ours on the sequences at `root`: test NDCG@10 of each with its
    bootstrap CI, the paired difference over test users, seconds to the best epoch."""
    name = dataset.replace("-", "")
    atomic = export_atomic(root, work / "atomic" / name, name)
    inter_file = atomic / f"{name}.inter"
    budget = None if args.recbole_converge else args.budget_seconds
    if args.recbole_json is not None:
        recbole = reuse_recbole(args.recbole_json, inter_file)
        budget = recbole["budget_seconds"]
    else:
        recbole = run_recbole(atomic, name, budget, args.threads, work / f"recbole_{name}.json")
    ours = ours_head_to_head(root, args.sasrec_overrides, args.seeds[0], device)
    if recbole["n_items"] != ours["n_items"] or recbole["n_test_users"] != ours["n_users"]:
        raise SystemExit(
            f"RecBole saw {recbole['n_test_users']} test users x {recbole['n_items']} items, "
            f"ours {ours['n_users']} x {ours['n_items']}: not the same data"
        )
    rb_ranks = np.full(ours["n_users"], -1)
    rb_ranks[np.asarray(recbole["test_users"]) - 1] = recbole["test_ranks"]
    a, b = ndcg_per_user(ours["test_ranks"]), ndcg_per_user(rb_ranks)
    comparison = compare(
        "ours - recbole", METRIC, "ours", a, "recbole", b, "users", resamples=RESAMPLES, seed=0,
        protocol="all items ranked, history unmasked (RecBole's full sort for sequential models)",
    )  # fmt: skip
    ratio = ours["seconds_to_best_epoch"] / recbole["seconds_to_best_epoch"]
    cpu_ratio = ours["cpu_seconds_to_best_epoch"] / recbole["cpu_seconds_to_best_epoch"]
    entry = {
        "sequences_sha256": sha256(ArtifactPaths(root).sequences),
        "inter_sha256": sha256(inter_file),
        "n_users": ours["n_users"],
        "n_items": ours["n_items"],
        "budget_seconds": budget,
        "ours": ours,
        "recbole": recbole,
        "test_ndcg_at_10_ci95": {
            "ours": bootstrap_ci(a, RESAMPLES, 0),
            "recbole": bootstrap_ci(b, RESAMPLES, 0),
        },
        "comparison": comparison.as_dict(),
        "seconds_to_best_epoch_ratio": ratio,
        "cpu_seconds_to_best_epoch_ratio": cpu_ratio,
        "goal": {
            "ndcg_not_below_recbole": comparison.verdict != "recbole higher",
            "at_most_a_tenth_of_the_time": ratio <= 0.1,
            "at_most_a_tenth_of_the_cpu_time": cpu_ratio <= 0.1,
        },
    }
    print(
        f"SASRec, RecBole's protocol, {ours['n_users']} test users: ours NDCG@10 "
        f"{comparison.a.value:.4f}, RecBole 1.2.1 {comparison.b.value:.4f}, ours - RecBole "
        f"{format_ci(comparison)} ({comparison.verdict}); s to best epoch "
        f"{ours['seconds_to_best_epoch']:.0f} (epoch {ours['best_epoch']}) vs "
        f"{recbole['seconds_to_best_epoch']:.0f} (RecBole's 0-based epoch "
        f"{recbole['best_epoch']}), ratio {ratio:.3f} (CPU seconds {cpu_ratio:.3f}); "
        f"RecBole stopped by "
        f"{recbole['stop_reason']}",
        flush=True,
    )
    return entry


def sasrec_overrides(config_file: Path | None, pairs: list[str]) -> dict[str, Any]:
    """Ours' SASRec config for the head-to-head: `ops.sasrec.config` of a run config (such as
    configs/movielens-100k.yaml), then each KEY=VALUE (a YAML scalar) on top."""
    overrides: dict[str, Any] = {}
    if config_file is not None:
        run_config = yaml.safe_load(config_file.read_text()) or {}
        overrides |= run_config.get("ops", {}).get("sasrec", {}).get("config", {})
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--sasrec takes KEY=VALUE, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    unknown = set(overrides) - set(models.SasrecConfig.model_fields)
    if unknown:
        raise SystemExit(f"not fields of the sasrec config: {sorted(unknown)}")
    return overrides


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


def head_to_head(
    base: Path,
    dataset: str,
    work: Path,
    args: argparse.Namespace,
    device: TorchDevice,
    recbole_report: dict[str, Any],
    out: Path,
) -> None:
    """recbole_head_to_head on the store at `base`; recbole.json and its plot beside `out`."""
    start_load = os.getloadavg()
    entry = recbole_head_to_head(base, dataset, work, args, device.torch_device)
    entry["load_average"] = {"start": start_load, "end": os.getloadavg()}
    recbole_report["datasets"][dataset] = entry
    write_json({**provenance(args, device.torch_device), **recbole_report},
               out.with_name("recbole.json"))  # fmt: skip
    plot_curves(recbole_report["datasets"], out.with_name("recbole_curves.png"))
    print(f"wrote {out.with_name('recbole.json')} and {out.with_name('recbole_curves.png')}")


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
    parser.add_argument(
        "--head-to-head-only", action="store_true",
        help="only SASRec vs RecBole (implies --recbole; recommenders.json is left alone)",
    )  # fmt: skip
    parser.add_argument(
        "--recbole-json", type=Path, help="a finished run_sasrec.py result to use, not rerun"
    )
    parser.add_argument(
        "--sasrec-config", type=Path, help="run config whose ops.sasrec.config ours uses"
    )
    parser.add_argument(
        "--sasrec", nargs="+", default=[], metavar="KEY=VALUE", help="ours' SASRec overrides"
    )
    args = parser.parse_args()
    args.recbole = args.recbole or args.head_to_head_only
    args.sasrec_overrides = {
        **(QUICK_MODELS["sasrec"] if args.quick else {}),
        **sasrec_overrides(args.sasrec_config, args.sasrec),
    }
    if args.recbole_json is not None and len(args.datasets) != 1:
        parser.error("--recbole-json is one dataset's result: pass one --datasets")
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
        if args.head_to_head_only:
            head_to_head(base, dataset, work, args, device, recbole_report, out)
            continue
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
            head_to_head(base, dataset, work, args, device, recbole_report, out)
    if not args.head_to_head_only:
        print(f"\nwrote {out} ({report['wall_seconds'] / 60:.1f} min)")
    if args.work_dir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
