"""Each (model, layer) partition depends on its own model only: retraining the student leaves
the SASRec partitions fresh in Dagster's eyes and skipped by the content-versioned provenance,
while the student's partitions are stale and recompute."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from recsae_pipeline.defs.definitions import ASSET_MODULES, defs
from recsae_pipeline.defs.versioning import SKIPPED_TAG
from recsae_pipeline_tests.support import (
    FEATURES_CONFIG,
    KEY,
    MODELS_CONFIG,
    STUDENT_KEY,
    TinyStore,
    ops_config,
    resources,
)

ASSETS = dg.load_assets_from_modules(ASSET_MODULES)
MODELS = ["raw_interactions", "item_catalog", "sequences", "sasrec", "teacher", "student"]


def _run(root: Path, instance: dg.DagsterInstance, selection: list[str], run_config: dict,
         partition_key: str | None = None) -> dict[str, dg.AssetMaterialization]:  # fmt: skip
    ops = {k: v for k, v in run_config["ops"].items() if k in selection}
    result = dg.materialize(
        ASSETS,  # without the model checks: a model trained for seconds need not beat popularity
        selection=dg.AssetSelection.assets(*selection),
        resources=resources(root),
        run_config={"ops": ops},
        partition_key=partition_key,
        instance=instance,
    )
    return {
        e.asset_key.to_user_string(): e.materialization
        for e in result.get_asset_materialization_events()
    }


def test_retraining_the_student_leaves_sasrec_partitions_fresh_and_skipped(
    tiny_store: TinyStore, tmp_path: Path
) -> None:
    # A copy of the shared store and a new instance: these runs replay the recorded versions
    # (nothing changed), which is all the instance needs to know every data version.
    root = tiny_store.copy_to(tmp_path / "store")
    instance = dg.DagsterInstance.ephemeral()
    _run(root, instance, MODELS, MODELS_CONFIG)
    _run(root, instance, ["sasrec_activations"], MODELS_CONFIG, KEY)
    _run(root, instance, ["student_activations"], MODELS_CONFIG, STUDENT_KEY)
    _run(root, instance, ["sae"], FEATURES_CONFIG, KEY)

    student_before = read_student_version(instance)
    _run(
        root,
        instance,
        ["student"],
        ops_config(MODELS_CONFIG, *MODELS_CONFIG["ops"], student={"lr": 1e-2}),
    )
    assert read_student_version(instance) != student_before  # a retrain with new weights

    def status(asset: str, partition: str) -> StaleStatus:
        resolver = CachingStaleStatusResolver(
            instance, defs.resolve_asset_graph(), LoadingContextForTest(instance)
        )
        return resolver.get_status(dg.AssetKey(asset), partition)

    assert status("sasrec_activations", KEY) == StaleStatus.FRESH
    assert status("sae", KEY) == StaleStatus.FRESH
    assert status("student_activations", STUDENT_KEY) == StaleStatus.STALE

    sasrec_side = {
        **_run(root, instance, ["sasrec_activations"], MODELS_CONFIG, KEY),
        **_run(root, instance, ["sae"], FEATURES_CONFIG, KEY),
    }
    assert {k: m.tags.get(SKIPPED_TAG) for k, m in sasrec_side.items()} == {
        "sasrec_activations": "true",
        "sae": "true",
    }
    student_side = _run(root, instance, ["student_activations"], MODELS_CONFIG, STUDENT_KEY)
    assert SKIPPED_TAG not in student_side["student_activations"].tags


def read_student_version(instance: dg.DagsterInstance) -> str:
    event = instance.get_latest_materialization_event(dg.AssetKey("student"))
    assert event is not None and event.asset_materialization is not None
    return event.asset_materialization.tags["dagster/data_version"]
