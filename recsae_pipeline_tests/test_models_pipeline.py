"""The model assets end to end through Dagster on a tiny synthetic log: every asset and check runs."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsae_pipeline import cli
from recsae_pipeline.activations.shards import expected_rows
from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.defs.assets import activations, data, models
from recsae_pipeline.defs.assets import sae as sae_assets
from recsae_pipeline.defs.resources import DataQuality, StorageRoot, TorchDevice
from recsae_pipeline.models.artifacts import load_recommender
from recsae_pipeline.models.training import evaluate
from recsae_pipeline.sae.model import TopKSae
from recsae_pipeline.storage.registry import parse_partition_key

FAST = {"max_epochs": 6, "patience": 6, "batch_size": 64, "lr": 5e-3, "progress_bar": False}
CONFIG = {
    "ops": {
        "sequences": {"config": {"user_core": 3, "item_core": 3}},
        "sasrec": {"config": {**FAST, "hidden": 16, "max_len": 20}},
        "teacher": {"config": {**FAST, "hidden": 16, "layers": 4, "heads": 2, "max_len": 20}},
        "student": {"config": {**FAST, "layers": 2}},
        "student_ce": {"config": {**FAST, "layers": 2}},
        "layer_probe": {"config": {"probe_epochs": 1}},
    }
}


def write_cyclic_log(path: Path, users: int = 200, items: int = 40) -> None:
    """Users walk the catalogue in order (i, i+1, i+2, ...): learnable in a few epochs, while
    popularity is flat, so `beats_popularity` has a clear answer even for tiny models."""
    rng = np.random.default_rng(0)
    rows = {"user_id": [], "item_id": [], "timestamp": []}
    for u in range(users):
        start, length = rng.integers(items), rng.integers(5, 15)
        for t in range(length):
            rows["user_id"].append(f"u{u}")
            rows["item_id"].append(f"i{(start + t) % items}")
            rows["timestamp"].append(1_700_000_000 + t)
    pq.write_table(pa.table(rows), path)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dg.ExecuteInProcessResult, Path]:
    root = tmp_path_factory.mktemp("store")
    write_cyclic_log(root / "log.parquet")
    CONFIG["ops"]["raw_interactions"] = {
        "config": {
            "source": "tabular",
            "tabular": {"path": str(root / "log.parquet"), "rating_column": None},
        }
    }
    result = dg.materialize(
        [
            *dg.load_assets_from_modules([data, models]),
            *dg.load_asset_checks_from_modules([data, models]),
        ],
        resources={
            "storage": StorageRoot(path=str(root)),
            "quality": DataQuality(),
            "device": TorchDevice(device="cpu"),
        },
        run_config=CONFIG,
        raise_on_error=False,
    )
    return result, root


def test_every_model_asset_and_check_runs(run: tuple[dg.ExecuteInProcessResult, Path]) -> None:
    result, root = run
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {
        "sasrec",
        "teacher",
        "student",
        "student_ce",
        "layer_probe",
        "recommender_eval",
    } <= materialized
    checks = {
        (e.asset_key.to_user_string(), e.check_name): e
        for e in result.get_asset_check_evaluations()
    }
    for model in models.MODELS:
        assert checks[(model, "finite_weights")].passed
        assert checks[(model, "beats_popularity")].passed, checks[
            (model, "beats_popularity")
        ].description
    assert ("student", "student_close_to_teacher") in checks
    for name in models.MODELS:
        assert {p.name for p in (root / "models" / name).iterdir()} == {
            "config.json",
            "model.safetensors",
            "metrics.json",
        }


def test_saved_model_reproduces_its_metrics(run: tuple[dg.ExecuteInProcessResult, Path]) -> None:
    _, root = run
    seqs, num_items = read_sequences(root / "sequences" / "sequences.parquet")
    for name in ("sasrec", "student"):
        saved = json.loads((root / "models" / name / "metrics.json").read_text())
        model = load_recommender(root / "models" / name, torch.device("cpu"))
        assert evaluate(model, seqs, num_items, "test", torch.device("cpu")) == saved["test"]


def test_eval_table_and_probe(run: tuple[dg.ExecuteInProcessResult, Path]) -> None:
    _, root = run
    table = pq.read_table(root / "models" / "recommender_eval.parquet").to_pylist()
    assert [r["model"] for r in table] == [
        "popularity",
        "sasrec",
        "teacher",
        "student",
        "student_ce",
    ]
    by = {r["model"]: r for r in table}
    assert by["student"]["params"] < by["teacher"]["params"]
    assert all(r["ms_per_1000_users"] > 0 for r in table)
    probe = pq.read_table(root / "models" / "layer_probe.parquet").to_pylist()
    assert [r["layer"] for r in probe] == [1, 2, 3, 4]
    assert all(0 <= r["probe_ndcg@10"] <= 1 for r in probe)
    for png in (
        "recommender_eval.png",
        "layer_probe.png",
        "training_sasrec.png",
        "training_student.png",
    ):
        assert (root / "reports" / png).stat().st_size > 1000


@pytest.mark.parametrize("key", ["sasrec.layer2", "student.layer1"])
def test_activation_partition_materializes_and_is_queryable(
    run: tuple[dg.ExecuteInProcessResult, Path], key: str, capsys: pytest.CaptureFixture
) -> None:
    _, root = run
    result = dg.materialize(
        [activations.activations],
        resources={"storage": StorageRoot(path=str(root)), "device": TorchDevice(device="cpu")},
        partition_key=key,
    )
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.check_name == "complete_and_finite"
    seqs, _ = read_sequences(root / "sequences" / "sequences.parquet")
    model, layer = parse_partition_key(key)
    assert check.metadata["rows"].value == expected_rows(seqs, 20)
    assert cli.main(["--data-dir", str(root), "sql", "--format", "csv",
                     f"SELECT count(*) FROM activations WHERE model = '{model}' AND layer = {layer}"]) == 0  # fmt: skip
    assert int(capsys.readouterr().out.splitlines()[1]) == expected_rows(seqs, 20)


def test_sae_partition_trains_splices_and_saves(
    run: tuple[dg.ExecuteInProcessResult, Path],
) -> None:
    _, root = run
    resources = {"storage": StorageRoot(path=str(root)), "device": TorchDevice(device="cpu")}
    assert dg.materialize(
        [activations.activations], resources=resources, partition_key="sasrec.layer2"
    ).success
    config = {
        "expansion": 4,
        "k": 4,
        "rows_seen": 20_000,
        "batch_size": 256,
        "max_fvu": 1.0,
        "max_dead_fraction": 1.0,
        "min_recovered": -10.0,
    }
    result = dg.materialize(
        [sae_assets.sae],
        resources=resources,
        partition_key="sasrec.layer2",
        run_config={"ops": {"sae": {"config": config}}},
    )
    assert result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(checks) == {"reconstruction_and_sparsity", "spliced_quality_recovered"}
    meta = checks["spliced_quality_recovered"].metadata
    original, spliced, ablated = (meta[k].value for k in ("original", "spliced", "zero_ablated"))
    assert original != ablated  # zero-ablating the layer really changes the recommendations
    assert meta["fraction_recovered"].value == pytest.approx(
        (spliced - ablated) / (original - ablated)
    )
    out = root / "sae" / "model=sasrec" / "layer=2"
    assert {p.name for p in out.iterdir()} >= {"sae.safetensors", "config.json", "metrics.json"}
    loaded = TopKSae.load(out, torch.device("cpu"))
    assert loaded.config.n_latents == 4 * 16 and loaded.config.k == 4
    assert 0 < checks["reconstruction_and_sparsity"].metadata["fvu"].value < 1.0
