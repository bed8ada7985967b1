"""Scale benchmark: the default pipeline at 1x, 10x and 100x the default synthetic log, each
stage's wall time and peak RSS.

1x is configs/default.yaml's synthetic source (3,000 users, 1,500 items, 60 franchises, mean
sequence length 33); scale s multiplies the users by s and the items and franchises by
sqrt(s) (100x: 300,000 users, about 10M interactions, 15,000 items), the way larger
real logs grow (MovieLens-1M -> 20M: users x23, items x7). Every other knob is the default.

Each (scale, stage) runs in a fresh process (`--worker`), so its peak RSS is that stage's
alone: `ru_maxrss` of the stage process (getrusage RUSAGE_SELF, its children added when
there are any), which includes the interpreter, torch and Dagster (`rss_at_start_mb` is what
the process held before the stage began). The parent takes `/tmp/recsae-bench.lock` (flock)
around each timed stage and releases it between stages; torch and OMP run at 2 threads.

Stages, each through the real path: the Dagster assets via `dg.materialize` on a storage
root per scale (`raw_interactions` with its blocking GX check, `item_catalog`, `sequences`,
`sasrec_activations` and `sae`/`feature_activations`/`feature_stats` on partition
sasrec.layer1). SASRec: the asset itself at 1x (early stopping); above 1x a fixed number of
optimiser steps of the same training loop (`models.training`: `train_examples`, the model,
AdamW, `NextItemLoss`, clipping), one validation pass, the asset's test pass and its
popularity check, then extrapolated to the 1x run's epoch count:
    seconds = setup + epochs_1x x (steps_per_epoch x s_per_step + valid_pass) + test + check
(flagged `extrapolated`); the partly trained model is saved so the later stages run on it.
`sasrec_sampled` (not a default stage, `--stages sasrec_sampled`) times the same training
with the sampled softmax (`--negatives`, default 256): at 1x to its own early stop (patience
`SAMPLED_PATIENCE`; its test NDCG@10 beside the full softmax's), above 1x by the same
steps-and-extrapolate method.

    .venv/bin/python benchmarks/scale.py                     # 1x, 10x, 100x, every stage
    .venv/bin/python benchmarks/scale.py --scales 1 10 --stages raw_interactions sequences
    .venv/bin/python benchmarks/scale.py --plot-only         # redraw scale.png from scale.json

Results: benchmarks/results/scale.json (merged: a rerun replaces only the (scale, stage)
entries it ran) and benchmarks/results/scale.png; the work roots are under --work-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results"
LOCK = Path("/tmp/recsae-bench.lock")
PARTITION = "sasrec.layer1"
STAGES = (
    "raw_interactions",
    "item_catalog",
    "sequences",
    "sasrec",
    "sasrec_activations",
    "sae",
    "feature_activations",
    "feature_stats",
)
CALIBRATION = "sasrec_steps"
"""Not a pipeline stage: the steps-and-extrapolate method at a scale where the asset ran."""
SAMPLED = "sasrec_sampled"
"""Not the default pipeline: SASRec with the sampled softmax (`negatives`, `--negatives`):
at 1x trained to its own early stop (nothing saved), above 1x steps extrapolated to that
epoch count, as `sasrec`."""
SAMPLED_PATIENCE = 15
"""The sampled loss leaves the popularity plateau of the first epochs later than the full
softmax (epoch ~12 against ~7 on the default data: benchmarks/train_schedule.py
--negatives), past the default patience of 6."""
EVAL_USERS = 30_000
BASE = {"n_users": 3000, "n_items": 1500, "n_franchises": 60}
MEMORY_TARGET_GIB = 8.0


def synthetic_options(scale: int) -> dict[str, Any]:
    """configs/default.yaml's synthetic source at `scale`: users x scale, items and
    franchises x sqrt(scale)."""
    config = _default_ops()["raw_interactions"]["config"]["synthetic"].copy()
    root = math.sqrt(scale)
    config["n_users"] = BASE["n_users"] * scale
    config["n_items"] = round(BASE["n_items"] * root)
    config["n_franchises"] = round(BASE["n_franchises"] * root)
    return config


def _default_ops() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((REPO / "configs" / "default.yaml").read_text())["ops"]


# ----------------------------------------------------------------------------- worker


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def _materialize(root: Path, asset: Any, config: dict | None, partition: str | None) -> Any:
    import dagster as dg

    from recsae_pipeline.defs.resources import DataQuality, StorageRoot, TorchDevice

    run_config = {"ops": {asset.op.name: {"config": config}}} if config is not None else None
    result = dg.materialize(
        [asset],
        resources={
            "storage": StorageRoot(path=str(root)),
            "quality": DataQuality(),
            "device": TorchDevice(device="cpu"),
        },
        run_config=run_config,
        partition_key=partition,
        tags={"recsae/force": "true"},  # a rerun recomputes, never skips
    )
    if not result.success:
        raise RuntimeError(f"{asset.key.to_user_string()} failed")
    return result


def _check_seconds(result: Any) -> float:
    """Seconds the GX suites of the step's blocking checks took (their `gx_seconds`)."""
    total = 0.0
    for evaluation in result.get_asset_check_evaluations():
        value = evaluation.metadata.get("gx_seconds")
        if value is not None:
            total += float(value.value)
    return total


def run_stage(
    scale: int, stage: str, root: Path, steps: int, epochs_1x: int | None, negatives: int = 0
) -> dict:
    """One stage at one scale, in this process; returns its figures."""
    import torch

    from recsae_pipeline.defs.assets import data, features, sae
    from recsae_pipeline.defs.assets.activations import sasrec_activations
    from recsae_pipeline.defs.assets.models import sasrec

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    ops = _default_ops()
    rss_start = _rss_mb()
    started = time.perf_counter()
    out: dict[str, Any] = {}
    if stage == "raw_interactions":
        config = {"source": "synthetic", "synthetic": synthetic_options(scale)}
        out["gx_seconds"] = _check_seconds(_materialize(root, data.raw_interactions, config, None))
    elif stage == "item_catalog":
        out["gx_seconds"] = _check_seconds(_materialize(root, data.item_catalog, None, None))
    elif stage == "sequences":
        config = ops["sequences"]["config"]
        out["gx_seconds"] = _check_seconds(_materialize(root, data.sequences, config, None))
    elif stage == "sasrec" and steps == 0:
        config = ops["sasrec"]["config"] | {"progress_bar": False}
        _materialize(root, sasrec, config, None)
        metrics = json.loads((root / "models" / "sasrec" / "metrics.json").read_text())
        out |= {
            "epochs_run": metrics["epochs_run"],
            "best_epoch": metrics["best_epoch"],
            "train_seconds": metrics["train_seconds"],
            "mode": "asset",
        }
    elif stage == "sasrec":
        out |= _sasrec_steps(root, ops["sasrec"]["config"], steps, epochs_1x, save=True)
    elif stage == CALIBRATION:
        out |= _sasrec_steps(root, ops["sasrec"]["config"], steps, epochs_1x, save=False)
    elif stage == SAMPLED and steps == 0:
        out |= _sasrec_sampled_asset(root, ops["sasrec"]["config"], negatives)
    elif stage == SAMPLED:
        options = ops["sasrec"]["config"]
        out |= _sasrec_steps(root, options, steps, epochs_1x, save=False, negatives=negatives)
        out["negatives"] = negatives
    elif stage == "sasrec_activations":
        _materialize(root, sasrec_activations, None, PARTITION)
    elif stage == "sae" and users_per_pass(root) == 1:
        _materialize(root, sae.sae, ops["sae"]["config"], PARTITION)
    elif stage == "sae":
        out |= _sae_sampled_splice(root, ops["sae"]["config"])
    elif stage == "feature_activations":
        _materialize(root, features.feature_activations, None, PARTITION)
    elif stage == "feature_stats":
        _materialize(root, features.feature_stats, None, PARTITION)
    else:
        raise SystemExit(f"unknown stage {stage!r}; pick from {STAGES}")
    measured = time.perf_counter() - started
    out.setdefault("seconds", measured)
    out.setdefault("measured_seconds", measured)
    out.setdefault("extrapolated", False)
    return out | {"rss_at_start_mb": rss_start, "peak_rss_mb": _peak_rss_mb()}


def _sasrec_model(options: dict, num_items: int) -> Any:
    """A fresh SASRec at the `sasrec` asset's sizes (its config in configs/default.yaml)."""
    from recsae_pipeline.models.recommender import Recommender, RecommenderConfig

    sizes = ("hidden_size", "num_layers", "num_heads", "dropout", "max_len")
    return Recommender(RecommenderConfig.sasrec(num_items, **{k: options[k] for k in sizes}))


def _sasrec_sampled_asset(root: Path, options: dict, negatives: int) -> dict:
    """What the `sasrec` asset's training does with `negatives` (the same model, data and
    schedule, early stopping on validation), timed, with its test NDCG@10 beside the saved
    full-softmax model's; nothing is written."""
    import torch

    from recsae_pipeline.data.sequences import read_sequences
    from recsae_pipeline.models.training import SASREC_TRAINING, evaluate, train_recommender
    from recsae_pipeline.storage.registry import ArtifactPaths

    paths = ArtifactPaths(root)
    sequences, num_items = read_sequences(paths.sequences)
    train = dataclasses.replace(
        SASREC_TRAINING, negatives=negatives, patience=SAMPLED_PATIENCE, progress_bar=False
    )
    torch.manual_seed(train.seed)
    model = _sasrec_model(options, num_items)
    result = train_recommender(model, sequences, num_items, train, torch.device("cpu"))
    test = evaluate(model, sequences, num_items, "test", torch.device("cpu"), sampled=False)
    full = paths.model_dir("sasrec") / "metrics.json"
    full_test = json.loads(full.read_text())["test"]["ndcg@10"] if full.exists() else None
    return {
        "mode": "training loop (nothing saved)",
        "negatives": negatives,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "train_seconds": result.train_seconds,
        "test_ndcg@10": test["ndcg@10"],
        "full_softmax_test_ndcg@10": full_test,
    }


def _sasrec_steps(
    root: Path, options: dict, steps: int, epochs_1x: int | None, save: bool, negatives: int = 0
) -> dict:
    """`steps` optimiser steps of `train_recommender`'s loop, one validation pass, the
    asset's test pass and popularity check; the asset's time extrapolated from them. Above
    `EVAL_USERS` users the three passes run on every n-th user and their time is scaled by
    n (each is a loop over batches of users). With `save`, the model is saved as `sasrec`
    for the stages after it; without, nothing is written (the 1x check of the method)."""
    import torch

    from recsae_pipeline.data.sequences import read_sequences
    from recsae_pipeline.models.artifacts import save_recommender
    from recsae_pipeline.models.training import (
        SASREC_TRAINING,
        NextItemLoss,
        _optimizer,
        evaluate,
        item_frequencies,
        train_examples,
    )
    from recsae_pipeline.models.validation import beats_popularity
    from recsae_pipeline.storage.registry import ArtifactPaths

    if not epochs_1x:
        raise SystemExit("the 1x sasrec stage must run first: its epoch count is extrapolated to")
    paths = ArtifactPaths(root)
    device = torch.device("cpu")
    train = SASREC_TRAINING
    t0 = time.perf_counter()
    sequences, num_items = read_sequences(paths.sequences)
    torch.manual_seed(train.seed)
    model = _sasrec_model(options, num_items).to(device)
    inputs, targets = train_examples(sequences, model.config.max_len)
    lengths = (inputs > 0).sum(1)
    # the loss `train_recommender` builds: negatives drawn by training frequency
    counts = item_frequencies(sequences, num_items) if negatives else None
    loss_fn = NextItemLoss(negatives, train.seed, counts)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, train)
    shuffle = torch.Generator().manual_seed(train.seed)
    batches = torch.randperm(len(inputs), generator=shuffle).split(train.batch_size)
    setup = time.perf_counter() - t0

    model.train()
    t0 = time.perf_counter()
    for index in batches[:steps]:
        width = int(lengths[index].max())
        terms = loss_fn(model, inputs[index, :width], targets[index, :width], index)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        optimizer.step()
    ran = min(steps, len(batches))
    per_step = (time.perf_counter() - t0) / ran

    _say(f"{ran} steps, {per_step:.3f} s/step; evaluating")
    stride = max(1, math.ceil(len(sequences) / EVAL_USERS))
    users = sequences[::stride]
    t0 = time.perf_counter()
    valid = evaluate(model, users, num_items, "valid", device, sampled=False)
    valid_pass = (time.perf_counter() - t0) * stride
    t0 = time.perf_counter()
    test = evaluate(model, users, num_items, "test", device)
    metrics = {"valid": valid, "test": test, "best_epoch": 1, "epochs_run": 1, "steps": ran}
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        target = paths.model_dir("sasrec") if save else Path(scratch) / "sasrec"
        model_dir = save_recommender(model, target, metrics)
        test_pass = (time.perf_counter() - t0) * stride
        t0 = time.perf_counter()
        beats_popularity(model_dir, users, num_items, device)
        check = (time.perf_counter() - t0) * stride
    epoch = len(batches) * per_step + valid_pass
    return {
        "mode": "steps",
        "steps_run": ran,
        "steps_per_epoch": len(batches),
        "seconds_per_step": per_step,
        "valid_pass_seconds": valid_pass,
        "test_pass_seconds": test_pass,
        "check_seconds": check,
        "eval_user_stride": stride,
        "setup_seconds": setup,
        "training_windows": len(inputs),
        "epochs_extrapolated_to": epochs_1x,
        "seconds": setup + epochs_1x * epoch + test_pass + check,
        "extrapolated": True,
        "extrapolation": f"setup + {epochs_1x} epochs (the 1x run's) x ({len(batches)} steps x "
        f"{per_step:.4f} s measured over {ran} steps + one {valid_pass:.1f} s validation "
        f"pass) + test pass + popularity check"
        + ("" if stride == 1 else f"; the passes timed on every {stride}th user, x{stride}"),
    }


def users_per_pass(root: Path) -> int:
    """The stride of the user sample the evaluation passes of an extrapolated stage time:
    1 (every user) up to `EVAL_USERS` users."""
    import pyarrow.parquet as pq

    from recsae_pipeline.storage.registry import ArtifactPaths

    users = pq.ParquetFile(ArtifactPaths(root).sequences).metadata.num_rows
    return max(1, math.ceil(users / EVAL_USERS))


def _sae_sampled_splice(root: Path, options: dict) -> dict:
    """The `sae` asset's body with its splice evaluation (three full-ranking test passes
    over every user) timed on every n-th user and scaled by n; the training (fixed rows),
    the held-out evaluation, the saves and the bootstrap CI over all users run in full."""
    import numpy as np
    import torch

    from recsae_pipeline.data.sequences import read_sequences
    from recsae_pipeline.defs.assets.sae import SaeAssetConfig
    from recsae_pipeline.defs.config import to_domain
    from recsae_pipeline.models.artifacts import load_recommender
    from recsae_pipeline.sae.evaluation import SpliceQuality, recovered_ci, splice_quality
    from recsae_pipeline.sae.export import export_saelens, saelens_hook_name
    from recsae_pipeline.sae.model import SaeConfig
    from recsae_pipeline.sae.training import SaeTrainConfig, train_sae
    from recsae_pipeline.storage.atomic import write_json
    from recsae_pipeline.storage.registry import ArtifactPaths, parse_partition_key

    config = SaeAssetConfig(**options)
    part = ArtifactPaths(root).partition(*parse_partition_key(PARTITION))
    device = torch.device("cpu")
    t0 = time.perf_counter()
    model = load_recommender(ArtifactPaths(root).model_dir(part.model), device)
    sae_config = to_domain(config, SaeConfig, d_in=model.config.hidden_size)
    result = train_sae(
        part.activations, to_domain(config, SaeTrainConfig), sae_config, device,
        heldout_users_modulo=config.heldout_users_modulo,
    )  # fmt: skip
    result.sae.save(part.sae)
    hook = saelens_hook_name(part.model, part.layer)
    export_saelens(result.sae, part.sae_saelens, hook, model=part.model, layer=part.layer)
    sequences, _ = read_sequences(ArtifactPaths(root).sequences)
    measured = time.perf_counter() - t0
    _say(f"SAE trained in {result.seconds:.0f} s; splice passes on a user sample")
    stride = users_per_pass(root)
    t0 = time.perf_counter()
    quality = splice_quality(model, part.layer, result.sae, sequences[::stride], device)
    splice = (time.perf_counter() - t0) * stride
    t0 = time.perf_counter()  # the check's bootstrap over as many users as the store has
    full = SpliceQuality({k: np.resize(v, len(sequences)) for k, v in quality.per_user.items()})
    recovered_ci(full)
    ci = time.perf_counter() - t0
    write_json({"heldout": result.heldout, "rows_seen": result.rows_seen}, part.sae_metrics)
    return {
        "mode": "sampled splice",
        "train_seconds": result.seconds,
        "splice_seconds": splice,
        "bootstrap_seconds": ci,
        "eval_user_stride": stride,
        "seconds": measured + splice + ci,
        "extrapolated": True,
        "extrapolation": f"training ({result.rows_seen:,} rows, measured), saves and the "
        f"bootstrap CI over all {len(sequences):,} users measured; the three splice "
        f"test passes timed on every {stride}th user, x{stride}",
    }


# ----------------------------------------------------------------------------- parent


class _TreeSampler:
    """Peak summed RSS of a process and its descendants, sampled every `interval` s, and
    the time the process spent stopped (SIGSTOP from outside: such time is no stage's)."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval, self.peak, self.stopped = pid, interval, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        last = time.perf_counter()
        while not self._stop.is_set():
            try:
                procs = [proc, *proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
                now = time.perf_counter()
                if proc.status() == psutil.STATUS_STOPPED:
                    self.stopped += now - last
                last = now
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> tuple[float, float]:
        """(peak RSS MiB, seconds stopped)."""
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20, self.stopped


def _steps(args: argparse.Namespace, scale: int) -> int:
    """Optimiser steps of the SASRec stage at `scale` (`--sasrec-steps` SCALE=STEPS...)."""
    table = dict(item.split("=") for item in args.sasrec_steps)
    return int(table.get(str(scale), table.get("default", 200)))


def _spawn(args: argparse.Namespace, scale: int, stage: str, epochs_1x: int | None) -> dict:
    locked = stage not in args.unlocked
    threads = args.threads if locked else 1
    env = os.environ | {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "RECSAE_LOCK_TIMEOUT": "0",
        "DAGSTER_HOME": str(args.work_dir / "dagster_home"),
    }
    (args.work_dir / "dagster_home").mkdir(parents=True, exist_ok=True)
    steps = {
        "sasrec": 0 if scale == 1 else _steps(args, scale),
        SAMPLED: 0 if scale == 1 else _steps(args, scale),
        CALIBRATION: _steps(args, scale),
    }
    steps = steps.get(stage, 0)
    cmd = [
        sys.executable, __file__, "--worker", "--scale", str(scale), "--stage", stage,
        "--work-dir", str(args.work_dir), "--steps", str(steps),
        "--epochs-1x", str(epochs_1x or 0), "--negatives", str(args.negatives),
    ]  # fmt: skip
    log = args.work_dir / f"{scale}x-{stage}.log"
    with open(LOCK, "a") as lock, open(log, "w") as log_file:
        if locked:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            load_before = os.getloadavg()
            started = time.perf_counter()
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=log_file, text=True
            )
            sampler = _TreeSampler(proc.pid)
            stdout, _ = proc.communicate()
            tree_peak, stopped = sampler.stop()
            wall = time.perf_counter() - started
            load_after = os.getloadavg()
        finally:
            if locked:
                fcntl.flock(lock, fcntl.LOCK_UN)
    if proc.returncode != 0:
        raise SystemExit(f"{scale}x {stage} failed (exit {proc.returncode}); see {log}")
    result = json.loads(stdout.strip().splitlines()[-1])
    if stopped > 1.0:  # paused from outside: that time is left out of the measured seconds
        result |= {
            "stopped_seconds": stopped,
            "seconds_including_stopped": result["seconds"],
            "seconds": result["seconds"] - stopped,
            "measured_seconds": result["measured_seconds"] - stopped,
        }
    return result | {
        "process_wall_seconds": wall,
        "sampled_tree_peak_rss_mb": tree_peak,
        "threads": threads,
        "locked": locked,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }


def _scale_facts(root: Path) -> dict[str, int]:
    """Users, items and interactions of a scale's raw log and sequences, from the files."""
    import duckdb

    from recsae_pipeline.storage.registry import ArtifactPaths
    from recsae_pipeline.storage.sql import read_parquet

    paths = ArtifactPaths(root)
    facts: dict[str, int] = {}
    con = duckdb.connect()
    try:
        if paths.raw_interactions.exists():
            users, items, rows = con.execute(
                f"SELECT count(DISTINCT user_id), count(DISTINCT item_id), count(*) "
                f"FROM {read_parquet(paths.raw_interactions)}"
            ).fetchone()  # type: ignore[misc]
            facts |= {"users": users, "items": items, "interactions": rows}
        if paths.sequences.exists():
            (kept,) = con.execute(
                f"SELECT sum(n_items) FROM {read_parquet(paths.sequences)}"
            ).fetchone()  # type: ignore[misc]
            facts["sequence_interactions"] = int(kept)
        shards = paths.partition("sasrec", 1).activation_shards
        if list(paths.partition("sasrec", 1).activations.glob("*.parquet")):
            (rows,) = con.execute(f"SELECT count(*) FROM {read_parquet(shards)}").fetchone()  # type: ignore[misc]
            facts["activation_rows"] = rows
    finally:
        con.close()
    return facts


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"scales": {}}


def plot(results: dict, path: Path) -> None:
    """Time and peak RSS of every stage against interactions, log-log, the 8 GiB line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted(results["scales"].values(), key=lambda s: s["scale"])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = plt.get_cmap("tab10")
    for i, stage in enumerate((*STAGES, SAMPLED)):
        pts = [
            (s["interactions"], s["stages"][stage]) for s in scales if stage in s.get("stages", {})
        ]
        if not pts:
            continue
        x = [p[0] for p in pts]
        for ax, key in ((ax_t, "seconds"), (ax_m, "peak_rss_mb")):
            ax.plot(x, [p[1][key] for p in pts], "-", color=colors(i), label=stage, lw=1.4)
            for xi, (_, st) in zip(x, pts, strict=True):
                hollow = key == "seconds" and st.get("extrapolated")
                ax.plot(
                    xi, st[key], "o", color=colors(i), mfc="white" if hollow else colors(i), ms=5
                )
    if scales:
        x0 = scales[0]["interactions"]
        xs = [s["interactions"] for s in scales]
        first = scales[0]["stages"]
        t0 = sum(first[n]["seconds"] for n in STAGES if n in first) / len(STAGES)
        ax_t.plot(xs, [t0 * x / x0 for x in xs], ":", color="grey", label="linear")
    ax_m.axhline(MEMORY_TARGET_GIB * 1024, color="crimson", ls="--", lw=1, label="8 GiB")
    for ax, label in ((ax_t, "wall seconds"), (ax_m, "peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("raw interactions")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.25)
    ax_t.set_title("time per stage (hollow: extrapolated)")
    ax_m.set_title("peak RSS per stage process")
    ax_m.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument(
        "--stages", nargs="+", default=list(STAGES), choices=[*STAGES, CALIBRATION, SAMPLED]
    )
    parser.add_argument(
        "--negatives", type=int, default=256, help=f"the {SAMPLED} stage's sampled negatives"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/recsae-scale"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--sasrec-steps",
        nargs="+",
        default=["default=200", "100=50"],
        help="SASRec optimiser steps per scale above 1x (then extrapolated), SCALE=STEPS",
    )
    parser.add_argument(
        "--unlocked", nargs="*", default=[], help="stages run at 1 thread without the lock"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--epochs-1x", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))

    if args.worker:
        root = args.work_dir / f"{args.scale}x"
        root.mkdir(parents=True, exist_ok=True)
        result = run_stage(args.scale, args.stage, root, args.steps, args.epochs_1x, args.negatives)
        print(json.dumps(result))
        return 0

    results = _load(args.out)
    if args.plot_only:
        plot(results, args.out.with_suffix(".png"))
        return 0
    command = "benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = _git_commit()
    results.setdefault("commands", []).append({"command": command, "commit": commit})
    results |= {
        "command": command,
        "commit": commit,
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "rss_method": "ru_maxrss of each stage's own process (getrusage RUSAGE_SELF; its "
        "children's added), interpreter and imports included; sampled_tree_peak_rss_mb: "
        "psutil every 0.25 s over the process tree",
        "items_scaling": "users x scale, items and franchises x sqrt(scale)",
        "memory_target_gib": MEMORY_TARGET_GIB,
    }
    for scale in sorted(args.scales):
        entry = results["scales"].setdefault(str(scale), {"scale": scale, "stages": {}})
        entry["synthetic"] = synthetic_options(scale)
        for stage in args.stages:
            trained = SAMPLED if stage == SAMPLED else "sasrec"
            epochs_1x = (
                results["scales"].get("1", {}).get("stages", {}).get(trained, {}).get("epochs_run")
            )
            print(f"== {scale}x {stage} ...", flush=True)
            figures = _spawn(args, scale, stage, epochs_1x)
            figures |= {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit}
            entry["stages"][stage] = figures
            print(
                f"   {figures['seconds']:.1f} s{' (extrapolated)' if figures['extrapolated'] else ''}, "
                f"peak RSS {figures['peak_rss_mb']:.0f} MiB, load {figures['loadavg_before'][0]}",
                flush=True,
            )
            entry |= _scale_facts(args.work_dir / f"{scale}x")
            pipeline = [s for name, s in entry["stages"].items() if name in STAGES]
            entry["seconds"] = sum(s["seconds"] for s in pipeline)
            entry["peak_rss_mb"] = max(s["peak_rss_mb"] for s in pipeline)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps({k: v.get("seconds") for k, v in results["scales"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
