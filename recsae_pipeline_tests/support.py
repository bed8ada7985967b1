"""The tiny store the pipeline tests share, built once per session through the jobs that
`recsae materialize` runs, and helpers to read its runs or work on a copy of it."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from recsae_pipeline.defs.assets.activations import activation_assets
from recsae_pipeline.defs.definitions import ASSET_MODULES, defs
from recsae_pipeline.defs.jobs import partition_jobs
from recsae_pipeline.defs.resources import LLM, DataQuality, StorageRoot, TorchDevice
from recsae_pipeline.storage.registry import parse_partition_key
from recsae_pipeline_tests.torch_support import one_thread

KEY = "sasrec.layer2"
"""The partition the whole per-partition chain runs for (activations to the browser)."""
STUDENT_KEY = "student.layer1"
"""A student partition: only its activations are built."""

SYNTHETIC = {"n_users": 300, "n_items": 150, "mean_sequence_length": 15, "n_franchises": 15}
DATA_CONFIG = {
    "ops": {"raw_interactions": {"config": {"source": "synthetic", "synthetic": SYNTHETIC}}}
}
"""The data assets alone: what the data, versioning and storage tests materialize from scratch."""

# One padded pass per batch (length_groups 1): the tiny models some checks' tests rely on (a
# teacher just above popularity, a SASRec whose layer 2 carries the ranking) come out of it;
# test_models_training checks that sub-batches train the same model.
FAST = {
    "max_epochs": 4, "patience": 4, "batch_size": 64, "lr": 5e-3, "progress_bar": False,
    "length_groups": 1,
}  # fmt: skip
SASREC = {**FAST, "hidden_size": 16, "max_len": 20}
MODELS_CONFIG = {
    "ops": {
        **DATA_CONFIG["ops"],
        "sequences": {"config": {"user_core": 3, "item_core": 3}},
        "sasrec": {"config": SASREC},
        "teacher": {
            "config": {**FAST, "hidden_size": 16, "num_layers": 4, "num_heads": 2, "max_len": 20}
        },
        "student": {"config": {**FAST, "num_layers": 2}},
        "student_ce": {"config": {**FAST, "num_layers": 2}},
        "layer_probe": {"config": {"probe_epochs": 1}},
    }
}
SAE = {"expansion": 4, "k": 4, "rows_seen": 30_000, "batch_size": 256}
LOOSE_SAE_BOUNDS = {"max_fvu": 1.0, "max_dead_fraction": 1.0, "min_recovered": -10.0}
"""A 4-wide SAE on a model trained for seconds meets no real bound; the bounds' failures are
pinned in test_blocking_checks."""
FEATURES_CONFIG = {
    "ops": {
        "sae": {"config": {**SAE, **LOOSE_SAE_BOUNDS}},
        "feature_stats": {"config": {"top_n": 30, "min_support": 5, "min_positives": 5}},
        "steering_eval": {
            "config": {"max_users": 80, "min_top_items": 5, "alpha_scales": [1.0, 4.0]}
        },
        "explanations": {"config": {"n_frequent": 3, "n_concept": 2, "n_random": 1}},
        "explanation_scores": {"config": {"min_concept_auc": 0.6, "n_generated": 4}},
        "feature_browser": {"config": {"max_features": 12}},
    }
}


REPORT_CONFIG = {"ops": {"results": {"config": {"resamples": 200}}}}


def resources(root: Path, **overrides: Any) -> dict[str, Any]:
    """Every resource the assets use, on `root` and the CPU."""
    return {
        "storage": StorageRoot(path=str(root)),
        "quality": DataQuality(),
        "device": TorchDevice(device="cpu"),
        "llm": LLM(),
        **overrides,
    }


def asset_graph() -> tuple[list, list]:
    """Every asset and every check of the project's Definitions."""
    return dg.load_assets_from_modules(ASSET_MODULES), dg.load_asset_checks_from_modules(
        ASSET_MODULES
    )


def materialize(
    root: Path,
    selection: Iterable[str] | dg.AssetSelection,
    run_config: dict | None = None,
    partition_key: str | None = None,
    tags: dict[str, str] | None = None,
    **resource_overrides: Any,
) -> dg.ExecuteInProcessResult:
    """Materialize `selection` (asset names, or a selection) with its checks on `root`; a failure
    is in the result, not raised."""
    assets, checks = asset_graph()
    if not isinstance(selection, dg.AssetSelection):
        selection = dg.AssetSelection.assets(*selection)
    return dg.materialize(
        [*assets, *checks],
        selection=selection,
        resources=resources(root, **resource_overrides),
        run_config=run_config or {},
        partition_key=partition_key,
        tags=tags,
        raise_on_error=False,
    )


def materialized(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def check_evaluations(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], Any]:
    """(asset, check name) -> the check's evaluation in `result`."""
    return {
        (e.asset_key.to_user_string(), e.check_name): e
        for e in result.get_asset_check_evaluations()
    }


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    """The metadata values of `asset`'s materialization in `result`."""
    (event,) = (
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == asset
    )
    return {k: v.value for k, v in event.materialization.metadata.items()}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and p.name != "recsae.duckdb.wal"
    }


@dataclass
class TinyStore:
    """A store holding every asset of the graph (the per-partition chain for `KEY`, and the
    activations for `STUDENT_KEY`), and the runs that built it. Read it in place; change only a `copy_to` of it."""

    root: Path
    main: dg.ExecuteInProcessResult
    sasrec_activations: dg.ExecuteInProcessResult
    features: dg.ExecuteInProcessResult
    student_activations: dg.ExecuteInProcessResult
    report: dg.ExecuteInProcessResult

    def copy_to(self, path: Path, ignore: Any = None) -> Path:
        """A copy of the store at `path`, for a test that changes it."""
        return Path(shutil.copytree(self.root, path, ignore=ignore))

    @property
    def runs(self) -> tuple[dg.ExecuteInProcessResult, ...]:
        return (
            self.main, self.sasrec_activations, self.features, self.student_activations,
            self.report,
        )  # fmt: skip

    def run_of(self, asset: str) -> dg.ExecuteInProcessResult:
        """The run that built `asset`."""
        for run in self.runs:
            if asset in materialized(run):
                return run
        raise KeyError(f"{asset} is not in the tiny store")

    def check(self, asset: str, name: str) -> Any:
        return check_evaluations(self.run_of(asset))[(asset, name)]


def build_tiny_store(root: Path) -> TinyStore:
    """Every asset on a tiny synthetic log: the `main` job, then the jobs of partition `KEY`,
    and the activations of `STUDENT_KEY`; fails when a run does."""
    with one_thread():
        return _build(root)


def _build(root: Path) -> TinyStore:
    # The jobs `recsae materialize` runs: `main`, then each partition's activations job (each
    # model's activations have their own partitions) and `features`, then `report`.
    main = _execute("main", root, MODELS_CONFIG)
    activations_job, features_job = partition_jobs(KEY)
    activations = _execute(activations_job, root, partition_key=KEY)
    features = _execute(features_job, root, FEATURES_CONFIG, partition_key=KEY)
    student = _execute(partition_jobs(STUDENT_KEY)[0], root, partition_key=STUDENT_KEY)
    report = _execute("report", root, REPORT_CONFIG)
    return TinyStore(root, main, activations, features, student, report)


def _execute(
    job: str, root: Path, run_config: dict | None = None, partition_key: str | None = None
) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def(job).execute_in_process(
        run_config=run_config or {}, resources=resources(root), partition_key=partition_key,
        raise_on_error=False,
    )  # fmt: skip
    failed = [e for e in result.all_events if e.is_failure]
    assert result.success, "; ".join(f"{e.step_key}: {e.message}" for e in failed)
    return result


def activations_asset(key: str) -> str:
    """The name of the activations asset that holds partition `key`."""
    model, _ = parse_partition_key(key)
    return activation_assets[model].key.to_user_string()


def ops_config(base: dict, *ops: str, **updates: dict) -> dict:
    """The run config of `ops` (only those: Dagster refuses config for ops outside the run) as
    in `base`, with some ops' `config` updated."""
    config = {op: copy.deepcopy(base["ops"][op]) for op in ops if op in base["ops"]}
    for op, values in updates.items():
        config.setdefault(op, {}).setdefault("config", {}).update(values)
    return {"ops": config}


def guard_unchanged(store: TinyStore) -> Any:
    """A check to run after the session: the shared store is exactly as built."""
    before = _snapshot(store.root)

    def verify() -> None:
        after = _snapshot(store.root)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, (
            f"a test changed the shared tiny store ({', '.join(changed[:5])}); "
            "work on `tiny_store.copy_to(tmp_path / ...)` instead"
        )

    return verify
