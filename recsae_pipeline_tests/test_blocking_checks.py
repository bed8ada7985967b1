"""Every blocking asset check, seen failing for a real reason on a copy of the tiny store:
the run records the failed evaluation with a description that says what is wrong, the run
fails, and Dagster does not execute the assets downstream of it in that run (the activations
share no run with their downstream assets: there the failed run is what stops the rest)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from recsae_pipeline.defs.assets.sae import SaeAssetConfig
from recsae_pipeline.defs.definitions import defs
from recsae_pipeline.defs.resources import DataQuality
from recsae_pipeline.defs.versioning import FORCE_TAG
from recsae_pipeline.models.artifacts import save_recommender
from recsae_pipeline_tests import support
from recsae_pipeline_tests.support import (
    KEY,
    LOOSE_SAE_BOUNDS,
    MODELS_CONFIG,
    SAE,
    TinyStore,
    activations_asset,
    check_evaluations,
    materialized,
    ops_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TESTED = {
    "raw_interactions_expectations": "test_duplicate_rows_fail_the_raw_suite",
    "item_catalog_expectations": "test_an_item_missing_from_the_catalog_fails_the_catalog_suite",
    "sequences_expectations": "test_sequences_shorter_than_the_quality_bound_fail_the_sequence_suite",
    "beats_popularity": "test_an_untrained_model_fails_beats_popularity",
    "finite_weights": "test_a_nan_weight_fails_finite_weights",
    "complete_and_finite": "test_a_nan_in_the_model_fails_complete_and_finite",
    "reconstruction_and_sparsity": "test_an_undertrained_sae_fails_the_reconstruction_bounds",
    "spliced_quality_recovered": "test_a_weak_sae_fails_the_spliced_quality_bound",
    "every_row_encoded": "test_an_infinite_code_fails_every_row_encoded",
}


def test_every_blocking_check_has_a_failing_test_here() -> None:
    graph = defs.resolve_asset_graph()
    blocking = {s.name for a in graph.assets_defs for s in a.check_specs if s.blocking}
    assert blocking == set(TESTED)
    assert all(name in globals() for name in TESTED.values())


def materialize(
    root: Path, selection: object, *args: object, **kwargs: object
) -> dg.ExecuteInProcessResult:
    """`support.materialize`, recomputing even where recorded versions say nothing changed
    (these tests change artifacts behind the versions' back)."""
    return support.materialize(root, selection, *args, tags={FORCE_TAG: "true"}, **kwargs)


def not_executed(result: dg.ExecuteInProcessResult) -> set[str]:
    """Steps of the run's plan that never started (Dagster abandons the steps downstream of a
    failed one)."""
    started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    return set(result.dagster_run.step_keys_to_execute or ()) - started


def failed_check(result: dg.ExecuteInProcessResult, asset: str, name: str) -> str:
    """The description of the failed evaluation of `asset`'s check `name`; the run failed."""
    assert not result.success
    evaluation = check_evaluations(result)[(asset, name)]
    assert not evaluation.passed, evaluation.description
    others = [
        k for k, e in check_evaluations(result).items() if not e.passed and k != (asset, name)
    ]
    assert not others, f"more checks failed than the one under test: {others}"
    return evaluation.description


def assert_blocked(result: dg.ExecuteInProcessResult, *downstream: str) -> None:
    assert set(downstream) <= not_executed(result), not_executed(result)
    assert not set(downstream) & materialized(result)


def poison(path: Path, tensor: str, value: float) -> None:
    """Set the first element of `tensor` in the safetensors file `path` to `value`."""
    state = load_file(path)
    state[tensor].view(-1)[0] = value
    save_file(state, path)


def test_duplicate_rows_fail_the_raw_suite(tiny_store: TinyStore, tmp_path: Path) -> None:
    root = tiny_store.copy_to(tmp_path / "store")
    sequences_before = (root / "sequences" / "sequences.parquet").read_bytes()
    raw_before = (root / "raw" / "interactions.parquet").read_bytes()
    log = tmp_path / "dup.parquet"
    row = {"user_id": ["u1"], "item_id": ["a"], "timestamp": [1_700_000_000], "rating": [4.0]}
    pq.write_table(pa.table({k: v * 2 for k, v in row.items()}), log)
    source = {"source": "tabular", "tabular": {"path": str(log)}}
    result = materialize(
        root,
        ["raw_interactions", "item_catalog", "sequences"],
        {"ops": {"raw_interactions": {"config": source}}},
    )
    description = failed_check(result, "raw_interactions", "raw_interactions_expectations")
    assert "failed: expect_compound_columns_to_be_unique" in description
    assert materialized(result) == set()  # refused before it was published
    assert_blocked(result, "item_catalog", "sequences")
    assert (root / "sequences" / "sequences.parquet").read_bytes() == sequences_before
    assert (root / "raw" / "interactions.parquet").read_bytes() == raw_before


def test_an_item_missing_from_the_catalog_fails_the_catalog_suite(
    tiny_store: TinyStore, tmp_path: Path
) -> None:
    root = tiny_store.copy_to(tmp_path / "store")
    log, items = tmp_path / "log.parquet", tmp_path / "items.parquet"
    users = [f"u{u}" for u in range(4) for _ in range(4)]
    pq.write_table(
        pa.table(
            {
                "user_id": users,
                "item_id": [f"i{i}" for _ in range(4) for i in range(4)],
                "timestamp": [1_700_000_000 + t for t in range(16)],
            }
        ),
        log,
    )
    # The catalog file knows i0-i2 only: i3 is interacted with but has no catalog row.
    pq.write_table(pa.table({"item_id": ["i0", "i1", "i2"], "title": ["A", "B", "C"]}), items)
    tabular = {"path": str(log), "items_path": str(items), "rating_column": None}
    result = materialize(
        root,
        ["raw_interactions", "item_catalog", "sequences"],
        {"ops": {"raw_interactions": {"config": {"source": "tabular", "tabular": tabular}}}},
    )
    description = failed_check(result, "item_catalog", "item_catalog_expectations")
    assert "failed: expect_column_values_to_be_in_set(column=in_catalog)" in description
    assert_blocked(result, "sequences")


def test_sequences_shorter_than_the_quality_bound_fail_the_sequence_suite(
    tiny_store: TinyStore, tmp_path: Path
) -> None:
    # The k-core filter keeps users with 3 interactions; the quality bound asks for 10.
    root = tiny_store.copy_to(tmp_path / "store")
    config = ops_config(MODELS_CONFIG, "sequences", "sasrec")
    result = materialize(
        root, ["sequences", "sasrec"], config, quality=DataQuality(min_sequence_length=10)
    )
    description = failed_check(result, "sequences", "sequences_expectations")
    assert "failed: expect_column_values_to_be_between(column=n_items, min_value=10" in description
    assert_blocked(result, "sasrec")


def test_an_untrained_model_fails_beats_popularity(tiny_store: TinyStore, tmp_path: Path) -> None:
    root = tiny_store.copy_to(tmp_path / "store")
    untrained = ops_config(
        MODELS_CONFIG, "sasrec", "teacher", sasrec={"lr": 1e-9, "max_epochs": 1, "patience": 1}
    )
    result = materialize(root, ["sasrec", "teacher"], untrained)
    description = failed_check(result, "sasrec", "beats_popularity")
    meta = check_evaluations(result)[("sasrec", "beats_popularity")].metadata
    ours, popular = (meta[k].value for k in ("model_valid_ndcg@10", "popularity_valid_ndcg@10"))
    assert ours < popular and f"valid NDCG@10 {ours:.4f} vs popularity {popular:.4f}" == description
    assert_blocked(result, "teacher")


def test_a_nan_weight_fails_finite_weights(
    tiny_store: TinyStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A corrupt saved model (the check re-reads the staged file), refused before the teacher
    # reuses it: the published model stays the previous one.
    root = tiny_store.copy_to(tmp_path / "store")
    weights = root / "models" / "sasrec" / "model.safetensors"
    before = weights.read_bytes()

    def save_corrupt(*args: object, **kwargs: object) -> Path:
        path = save_recommender(*args, **kwargs)
        poison(path / "model.safetensors", "item_emb.weight", float("nan"))
        return path

    monkeypatch.setattr("recsae_pipeline.defs.assets.models.save_recommender", save_corrupt)
    config = ops_config(MODELS_CONFIG, "sasrec", "teacher")
    result = materialize(root, ["sasrec", "teacher"], config)
    description = failed_check(result, "sasrec", "finite_weights")
    assert weights.read_bytes() == before
    assert "non-finite" in description and "item_emb.weight" in description
    assert_blocked(result, "teacher")


def test_a_nan_in_the_model_fails_complete_and_finite(
    tiny_store: TinyStore, tmp_path: Path
) -> None:
    # A non-finite weight in the second block: every layer-2 hidden state is NaN. Each model's
    # activations have their own partitions, so no run holds them and the SAE together: the
    # next run's `sae` reads the failed check from the activations' version record and refuses.
    root = tiny_store.copy_to(tmp_path / "store")
    model = root / "models" / "sasrec" / "model.safetensors"
    poison(model, "backbone.h.1.mlp.c_proj.bias", float("nan"))
    asset = activations_asset(KEY)
    result = materialize(root, [asset], partition_key=KEY)
    description = failed_check(result, asset, "complete_and_finite")
    rows = check_evaluations(result)[(asset, "complete_and_finite")].metadata["rows"].value
    assert f"{rows} rows with NaN/Inf" in description

    sae_dir = root / "sae" / "model=sasrec" / "layer=2"
    before = {p.name: p.read_bytes() for p in sae_dir.iterdir() if p.is_file()}
    config = {"ops": {"sae": {"config": {**SAE, **LOOSE_SAE_BOUNDS}}}}
    downstream = materialize(root, ["sae", "feature_activations"], config, partition_key=KEY)
    assert not downstream.success
    assert materialized(downstream) == set()
    (failure,) = [e for e in downstream.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert f"upstream {asset}[{KEY}] failed its blocking check `complete_and_finite`" in message
    assert f"rematerialize {asset} first" in message
    assert {p.name: p.read_bytes() for p in sae_dir.iterdir() if p.is_file()} == before


def test_an_undertrained_sae_fails_the_reconstruction_bounds(
    tiny_store: TinyStore, tmp_path: Path
) -> None:
    # The store's SAE (30k rows) against the default FVU and dead-fraction bounds.
    root = tiny_store.copy_to(tmp_path / "store")
    config = {
        "ops": {"sae": {"config": {**SAE, "min_recovered": LOOSE_SAE_BOUNDS["min_recovered"]}}}
    }
    result = materialize(root, ["sae", "feature_activations"], config, partition_key=KEY)
    description = failed_check(result, "sae", "reconstruction_and_sparsity")
    meta = check_evaluations(result)[("sae", "reconstruction_and_sparsity")].metadata
    bounds = SaeAssetConfig()
    assert (
        meta["fvu"].value > bounds.max_fvu or meta["dead_fraction"].value > bounds.max_dead_fraction
    )
    fvu = meta["fvu"].value
    op = "<=" if fvu <= bounds.max_fvu else ">"
    assert f"held-out FVU {fvu:.4f} ({op} {bounds.max_fvu})" in description
    assert_blocked(result, "feature_activations")


def test_a_weak_sae_fails_the_spliced_quality_bound(tiny_store: TinyStore, tmp_path: Path) -> None:
    # Reconstruction bounds loose, the splice bound at its default; one latent per row, trained
    # for a few batches at a learning rate that overshoots, cannot carry the layer.
    root = tiny_store.copy_to(tmp_path / "store")
    loose = {k: v for k, v in LOOSE_SAE_BOUNDS.items() if k != "min_recovered"}
    weak = {**SAE, "k": 1, "rows_seen": 1024, "lr": 3.0}
    config = {"ops": {"sae": {"config": {**weak, **loose, "max_fvu": 1e9}}}}
    result = materialize(root, ["sae", "feature_activations"], config, partition_key=KEY)
    description = failed_check(result, "sae", "spliced_quality_recovered")
    recovered = (
        check_evaluations(result)[("sae", "spliced_quality_recovered")]
        .metadata["fraction_recovered"]
        .value
    )
    meta = check_evaluations(result)[("sae", "spliced_quality_recovered")].metadata
    high = meta["fraction_recovered_ci95_high"].value
    bound = SaeAssetConfig().min_recovered
    assert recovered <= high < bound  # the whole CI over users below the bound
    assert f"{recovered:.1%} of NDCG@10 recovered, 95% CI over users" in description
    assert f"(bound {bound:.0%}: below the bound: the whole CI)" in description
    assert_blocked(result, "feature_activations")


def test_an_infinite_code_fails_every_row_encoded(tiny_store: TinyStore, tmp_path: Path) -> None:
    # An infinite encoder bias: latent 0 fires at +inf on every row.
    root = tiny_store.copy_to(tmp_path / "store")
    poison(root / "sae" / "model=sasrec" / "layer=2" / "sae.safetensors", "encoder.bias", torch.inf)
    result = materialize(root, ["feature_activations", "feature_stats"], partition_key=KEY)
    description = failed_check(result, "feature_activations", "every_row_encoded")
    rows = check_evaluations(result)[("feature_activations", "every_row_encoded")].metadata
    assert f"{rows['rows'].value} entries not finite or <= 0" in description
    assert_blocked(result, "feature_stats")
