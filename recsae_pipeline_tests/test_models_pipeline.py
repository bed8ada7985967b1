"""The model assets end to end through Dagster, read from the tiny store: every model asset
and check ran, saved models reproduce their metrics, the evaluation table and the probe, and
the activations and SAE of a partition."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from recsae_pipeline import cli
from recsae_pipeline.activations.shards import expected_rows
from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.defs.assets import models
from recsae_pipeline.models.artifacts import (
    load_initialisation,
    load_recommender,
    read_metrics,
    read_test_ranks,
    state_sha256,
)
from recsae_pipeline.models.recommender import student_from_teacher
from recsae_pipeline.models.training import evaluate, evaluate_with_ranks
from recsae_pipeline.sae.model import TopKSae
from recsae_pipeline.storage.registry import parse_partition_key
from recsae_pipeline_tests.support import (
    KEY,
    MODELS_CONFIG,
    SAE,
    SASREC,
    STUDENT_KEY,
    TinyStore,
    activations_asset,
    check_evaluations,
    materialized,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # the store's models were trained on one


def test_every_model_asset_and_check_runs(tiny_store: TinyStore) -> None:
    assert {*models.MODELS, "layer_probe", "recommender_eval"} <= materialized(tiny_store.main)
    checks = check_evaluations(tiny_store.main)
    for model in models.MODELS:
        assert checks[(model, "finite_weights")].passed
        assert checks[(model, "beats_popularity")].passed, checks[(model, "beats_popularity")]
    assert ("student", "student_close_to_teacher") in checks
    for name in models.MODELS:
        # test_ranks: each test user's rank, which recommender_eval reads instead of rescoring
        files = {"config.json", "model.safetensors", "metrics.json", "test_ranks.safetensors"}
        # The teacher keeps its untrained initialisation: where both students start.
        files |= {"init.safetensors"} if name == "teacher" else set()
        assert {p.name for p in (tiny_store.root / "models" / name).iterdir()} == files


def test_both_students_start_from_the_teachers_untrained_initialisation(
    tiny_store: TinyStore,
) -> None:
    """Not from the trained teacher's layers: that made the CE-only ablation equal to the
    distilled student by construction."""
    root = tiny_store.root / "models"
    cpu = torch.device("cpu")
    initial = load_initialisation(root / "teacher", cpu)
    trained = load_recommender(root / "teacher", cpu)
    layers = MODELS_CONFIG["ops"]["student"]["config"]["num_layers"]
    expected = state_sha256(student_from_teacher(initial, num_layers=layers))
    assert read_metrics(root / "student")["init_sha256"] == expected
    assert read_metrics(root / "student_ce")["init_sha256"] == expected
    assert expected != state_sha256(student_from_teacher(trained, num_layers=layers))


def test_saved_model_reproduces_its_metrics_and_test_ranks(tiny_store: TinyStore) -> None:
    """A reload scores exactly as the saved model did: the same test metrics, and the same
    per-user ranks as the saved `test_ranks.safetensors` that `recommender_eval` reads."""
    root = tiny_store.root
    seqs, num_items = read_sequences(root / "sequences" / "sequences.parquet")
    for name in models.MODELS:
        saved = json.loads((root / "models" / name / "metrics.json").read_text())
        model = load_recommender(root / "models" / name, torch.device("cpu"))
        test, ranks = evaluate_with_ranks(model, seqs, num_items, "test", torch.device("cpu"))
        assert test == saved["test"]
        saved_ranks = read_test_ranks(root / "models" / name)
        assert saved_ranks is not None and torch.equal(saved_ranks, ranks), name
        assert evaluate(model, seqs, num_items, "test", torch.device("cpu")) == test


def test_eval_table_and_probe(tiny_store: TinyStore) -> None:
    root = tiny_store.root
    table = pq.read_table(root / "models" / "recommender_eval.parquet").to_pylist()
    assert [r["model"] for r in table] == ["popularity", *models.MODELS]
    by = {r["model"]: r for r in table}
    assert by["student"]["params"] < by["teacher"]["params"]
    assert all(r["ms_per_1000_users"] > 0 for r in table)
    # Each test user's NDCG@10 per model: their mean is the table's figure, to the last digit.
    users = pq.read_table(root / "models" / "recommender_eval_users.parquet").to_pandas()
    n_users = pq.read_metadata(root / "sequences" / "sequences.parquet").num_rows
    assert users.groupby("model").size().to_dict() == {r["model"]: n_users for r in table}
    for model, group in users.groupby("model"):
        assert group["ndcg@10"].mean() == pytest.approx(by[model]["ndcg@10"], abs=1e-12)
        assert sorted(group["user"]) == list(range(n_users))
    probe = pq.read_table(root / "models" / "layer_probe.parquet").to_pylist()
    teacher_layers = MODELS_CONFIG["ops"]["teacher"]["config"]["num_layers"]
    assert [r["layer"] for r in probe] == list(range(1, teacher_layers + 1))
    assert all(0 <= r["probe_ndcg@10"] <= 1 for r in probe)
    for png in (
        "recommender_eval.png",
        "layer_probe.png",
        "training_sasrec.png",
        "training_student.png",
    ):
        assert (root / "reports" / png).stat().st_size > 1000


@pytest.mark.parametrize("key", [KEY, STUDENT_KEY])
def test_activation_partition_materializes_and_is_queryable(
    tiny_store: TinyStore, key: str, capsys: pytest.CaptureFixture
) -> None:
    run = tiny_store.sasrec_activations if key == KEY else tiny_store.student_activations
    check = check_evaluations(run)[(activations_asset(key), "complete_and_finite")]
    assert check.passed
    root = tiny_store.root
    seqs, _ = read_sequences(root / "sequences" / "sequences.parquet")
    model, layer = parse_partition_key(key)
    want = expected_rows(seqs, SASREC["max_len"])  # the student inherits the teacher's max_len
    assert check.metadata["rows"].value == want
    assert cli.main(["--data-dir", str(root), "sql", "--format", "csv",
                     f"SELECT count(*) FROM activations WHERE model = '{model}' AND layer = {layer}"]) == 0  # fmt: skip
    assert int(capsys.readouterr().out.splitlines()[1]) == want


def test_sae_partition_trains_splices_and_saves(tiny_store: TinyStore) -> None:
    checks = {
        name: e for (asset, name), e in check_evaluations(tiny_store.features).items()
        if asset == "sae"
    }  # fmt: skip
    assert set(checks) == {"reconstruction_and_sparsity", "spliced_quality_recovered"}
    meta = checks["spliced_quality_recovered"].metadata
    original, spliced, ablated = (meta[k].value for k in ("original", "spliced", "zero_ablated"))
    assert original != ablated  # zero-ablating the layer really changes the recommendations
    assert meta["fraction_recovered"].value == pytest.approx(
        (spliced - ablated) / (original - ablated)
    )
    out = tiny_store.root / "sae" / "model=sasrec" / "layer=2"
    assert {p.name for p in out.iterdir()} >= {"sae.safetensors", "config.json", "metrics.json"}
    loaded = TopKSae.load(out, torch.device("cpu"))
    hidden = SASREC["hidden_size"]
    assert loaded.config.n_latents == SAE["expansion"] * hidden and loaded.config.k == SAE["k"]
    assert 0 < checks["reconstruction_and_sparsity"].metadata["fvu"].value < 1.0
    # the SAELens export beside it loads in SAELens and reconstructs as ours does
    from sae_lens import SAE as SaeLens

    exported = SaeLens.load_from_disk(str(out / "saelens"), device="cpu")
    assert exported.cfg.metadata.hook_name == "recsae.sasrec.layer2"
    rows = torch.randn(64, hidden)
    with torch.no_grad():
        theirs = exported.decode(exported.encode(rows))
        torch.testing.assert_close(theirs, loaded.reconstruct(rows), atol=1e-4, rtol=1e-4)
