"""Feature assets end to end through Dagster, read from the tiny store (a synthetic log with
genres, franchises and planted ground truth): SAE -> feature_activations -> feature_stats ->
steering_eval -> explanations -> explanation_scores, the DuckDB views, the README's SQL
examples, `recsae recommend --steer` and `recsae explain`."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recsae_pipeline import cli
from recsae_pipeline.defs.resources import LLM
from recsae_pipeline.defs.versioning import FORCE_TAG
from recsae_pipeline_tests.support import (
    KEY,
    SAE,
    SASREC,
    TinyStore,
    materialize,
    materialized,
    metadata,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def _csv(capsys: pytest.CaptureFixture, root: Path, sql: str) -> list[list[str]]:
    assert (
        cli.main(["--data-dir", str(root), "sql", "--format", "csv", "--max-rows", "1000", sql])
        == 0
    )
    return [line.split(",") for line in capsys.readouterr().out.strip().splitlines()]


def test_feature_activations_hold_the_top_k_of_every_row(
    tiny_store: TinyStore, capsys: pytest.CaptureFixture
) -> None:
    root = tiny_store.root
    check = tiny_store.check("feature_activations", "every_row_encoded")
    assert check.passed, check.description
    (header, row) = _csv(
        capsys, root,
        "SELECT max(n), count(*) FROM (SELECT count(*) AS n FROM feature_activations "
        "WHERE model = 'sasrec' AND layer = 2 GROUP BY user_idx, position)",
    )  # fmt: skip
    assert int(row[0]) <= SAE["k"]
    assert int(row[1]) == check.metadata["rows_with_entries"].value


def test_feature_stats_compare_features_with_neurons_and_planted_concepts(
    tiny_store: TinyStore,
) -> None:
    root = tiny_store.root
    out = root / "feature_stats" / "model=sasrec" / "layer=2"
    stats = pq.read_table(out / "features.parquet").to_pylist()
    assert len(stats) == SAE["expansion"] * SASREC["hidden_size"]
    active = [r for r in stats if r["n_active"] > 0]
    assert active and all(0 < r["frequency"] <= 1 for r in active)
    assert all(r["max_activation"] >= r["mean_activation"] > 0 for r in active)
    scored = [r for r in active if r["monosemanticity"] is not None]
    assert scored and all(
        r["best_attribute"].split(":")[0] in ("genre", "decade", "popularity", "franchise")
        for r in scored
    )
    assert all(-1 <= r["monosemanticity"] <= 1 for r in scored)
    neurons = pq.read_table(out / "neurons.parquet").to_pylist()
    assert {(r["unit"], r["sign"]) for r in neurons} <= {
        (d, s) for d in range(SASREC["hidden_size"]) for s in "+-"
    }
    assert len(neurons) > SASREC["hidden_size"]  # both signs scored
    concepts = pq.read_table(out / "concepts.parquet").to_pylist()
    names = {c["concept"] for c in concepts}
    assert "popular" in names and any(n.startswith("genre_pref:") for n in names)
    assert all(0 <= c["feature_auc"] <= 1 and 0.5 <= c["neuron_auc"] <= 1 for c in concepts)
    # Even a tiny model has a feature that detects some planted concept well.
    assert max(c["feature_auc"] for c in concepts) > 0.75
    assert all((r["best_concept"] is None) == (r["n_active"] == 0) for r in stats)
    meta = metadata(tiny_store.features, "feature_stats")
    assert "data:image/png;base64," in meta["monosemanticity"]
    assert (root / "reports" / "monosemanticity_sasrec_layer2.png").exists()
    check = tiny_store.check("feature_stats", "sae_more_monosemantic_than_neurons")
    assert check.passed == (
        check.metadata["sae_median"].value > check.metadata["neuron_median"].value
    )


def test_steering_moves_genre_shares(tiny_store: TinyStore) -> None:
    root = tiny_store.root
    out = root / "steering" / "model=sasrec" / "layer=2"
    points = pq.read_table(out / "points.parquet").to_pylist()
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    genres = {p["genre"] for p in points}
    assert genres and {s["genre"] for s in summary} == genres
    for genre in genres:
        modes = [p["mode"] for p in points if p["genre"] == genre]
        assert modes == ["baseline", "add", "add", "clamp"]
    # Steering does something: the strongest alpha changes the share for most genres.
    strongest = {
        p["genre"]: p["share"] for p in points if p["mode"] == "add" and p["alpha_scale"] == 4.0
    }
    base = {p["genre"]: p["share"] for p in points if p["mode"] == "baseline"}
    # (The tiny model's SAE is too weak to promise gains; the default data's are measured.)
    assert sum(strongest[g] != base[g] for g in genres) > len(genres) / 2
    assert any(strongest[g] > base[g] for g in genres)
    assert (root / "reports" / "steering_sasrec_layer2.png").exists()
    check = tiny_store.check("steering_eval", "steering_triples_genre_share")
    assert check.metadata["genres"].value == len(genres)


def test_readme_sql_examples_run(tiny_store: TinyStore, capsys: pytest.CaptureFixture) -> None:
    root = tiny_store.root
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)
    feature_blocks = [b for b in blocks if "feature" in b]
    assert len(feature_blocks) >= 2, "README lost its feature SQL examples"
    for sql in feature_blocks:
        rows = _csv(
            capsys,
            root,
            sql.replace("feature = 42", "feature = (SELECT min(feature) FROM feature_activations)"),
        )
        assert len(rows) > 1, sql


def test_recommend_prints_top_10_before_and_after_steering(
    tiny_store: TinyStore, capsys: pytest.CaptureFixture
) -> None:
    root = tiny_store.root
    stats = pq.read_table(root / "feature_stats" / "model=sasrec" / "layer=2" / "features.parquet")
    feature = next(r["feature"] for r in stats.to_pylist() if r["n_active"] > 0)
    user = pq.read_table(root / "sequences" / "user_map.parquet")["user_id"][0].as_py()
    code = cli.main(["--data-dir", str(root), "recommend", "--user", user, "--steer", f"{feature}=50", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if re.match(r"\s+\d+  ", line)]
    assert len(lines) == 10 and "after steering" in out and f"feature {feature}" in out
    assert any("+" in line[58:] for line in lines)  # alpha 50 changes the list
    assert cli.main(["--data-dir", str(root), "recommend", "--user", "nobody"]) == 2
    assert "not in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--data-dir", str(root), "recommend", "--user", user, "--steer", "oops"])
    assert "FEATURE=ALPHA" in capsys.readouterr().err


def test_explanations_are_stored_with_transcripts_and_scored(
    tiny_store: TinyStore, capsys: pytest.CaptureFixture
) -> None:
    root = tiny_store.root
    out = root / "explanations" / "model=sasrec" / "layer=2"
    rows = pq.read_table(out / "explanations.parquet").to_pylist()
    assert {r["method"] for r in rows} == {"sage", "baseline"}
    assert len({r["feature"] for r in rows}) == 6
    for r in rows:
        assert r["label"] and "offline" in r["backend"]
        assert Path(r["transcript"]).exists()  # points at the final place, not the temp dir
    sage = [r for r in rows if r["method"] == "sage"]
    assert all(r["experiments"] >= 3 for r in sage)
    chosen = {r["feature"]: r["selection"] for r in rows}
    assert sorted(chosen.values()) == ["concept"] * 2 + ["frequent"] * 3 + ["random"]
    scores = pq.read_table(
        root / "explanation_scores" / "model=sasrec" / "layer=2" / "scores.parquet"
    ).to_pylist()
    assert len(scores) == len(rows)
    assert all(s["selection"] == chosen[s["feature"]] for s in scores)
    for s in scores:
        assert 0 <= s["generative_accuracy"] <= 1 and 0 <= s["generative_accuracy_description"] <= 1
    named = {(s["feature"], s["method"]): s["names_concept"] for s in scores}
    for feature in chosen:  # read for both methods, or for neither
        assert (named[feature, "sage"] is None) == (named[feature, "baseline"] is None)
    check = tiny_store.check("explanation_scores", "sage_beats_baseline")
    assert "sage" in check.description and "baseline" in check.description
    assert check.description.startswith("headline features") and "[" in check.description
    (gen, r) = check.metadata["comparisons"].value
    assert (gen["metric"], r["metric"], gen["unit"], gen["n"]) == (
        "generative_accuracy", "predictive_r", "features", 4
    )  # fmt: skip
    summary = _csv(
        capsys,
        root,
        "SELECT method, subset, n, n_nan_predictive_r, n_paired_predictive_r "
        "FROM explanation_summary ORDER BY method, subset",
    )
    assert [row[:3] for row in summary[1:]] == [
        ["baseline", "all", "6"], ["baseline", "concept", "2"], ["baseline", "headline", "4"],
        ["sage", "all", "6"], ["sage", "concept", "2"], ["sage", "headline", "4"],
    ]  # fmt: skip
    subsets = {"all": {"frequent", "random", "concept"}, "concept": {"concept"},
               "headline": {"frequent", "random"}}  # fmt: skip
    for method, subset, _, n_nan, _ in summary[1:]:  # NaN r counted, not dropped unseen
        assert int(n_nan) == sum(
            s["predictive_r"] != s["predictive_r"]
            for s in scores
            if s["method"] == method and s["selection"] in subsets[subset]
        )


def test_explain_cli_prints_the_transcript_summary(
    tiny_store: TinyStore, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tiny_store.copy_to(tmp_path / "store")  # `recsae explain` writes its transcripts
    rows = pq.read_table(
        root / "explanations" / "model=sasrec" / "layer=2" / "explanations.parquet"
    )
    feature = rows["feature"][0].as_py()
    assert cli.main(["--data-dir", str(root), "explain", str(feature), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert (
        f"feature {feature}, sage" in out and "H1 [positive]" in out and "scores: generative" in out
    )
    assert cli.main(["--data-dir", str(root), "explain", "999999", "--device", "cpu"]) == 2
    assert "feature 999999" in capsys.readouterr().err


def test_openai_backend_through_the_assets(
    tiny_store: TinyStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `llm` resource with backend openai, against the loopback stub: explanations and
    scores go through the real openai client, transcripts hold every prompt, the key none."""
    from recsae_pipeline_tests.openai_stub import OpenAIStub
    from recsae_pipeline_tests.test_llm_policy import responder

    root = tiny_store.copy_to(tmp_path / "store")
    monkeypatch.setenv("RECSAE_TEST_KEY", "sk-test-do-not-leak-0123456789")
    with OpenAIStub(responder) as stub:
        llm = LLM(backend="openai", base_url=stub.base_url, model="stub-model",
                  api_key_env="RECSAE_TEST_KEY", timeout_s=5.0)  # fmt: skip
        feature = pq.read_table(
            root / "explanations" / "model=sasrec" / "layer=2" / "explanations.parquet"
        )["feature"][0].as_py()
        config = {
            "explanations": {"config": {"features": [feature]}},
            "explanation_scores": {"config": {"n_generated": 3}},
        }
        result = materialize(root, list(config), {"ops": config}, partition_key=KEY, llm=llm)
        assert result.success
        assert stub.requests and all(r.authorized for r in stub.requests)
    rows = pq.read_table(
        root / "explanations" / "model=sasrec" / "layer=2" / "explanations.parquet"
    ).to_pylist()
    assert {r["backend"] for r in rows} == {"llm:openai:stub-model"}
    assert all(r["llm_calls"] > 0 and r["llm_prompt_tokens"] > 0 for r in rows)
    transcripts = [Path(r["transcript"]).read_text() for r in rows]
    assert all('"state": "llm_call"' in t for t in transcripts)
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in (".jsonl", ".parquet", ".json", ".md", ".txt"):
            assert b"sk-test-do-not-leak" not in path.read_bytes(), path


def test_without_ground_truth_the_stats_and_explanations_still_run(
    tiny_store: TinyStore, tmp_path: Path
) -> None:
    """Real logs (MovieLens, your own CSV) have no planted mechanisms: no concept table, no
    concept columns, and everything downstream still materializes."""
    root = tiny_store.copy_to(tmp_path / "store")
    (root / "raw" / "ground_truth.parquet").unlink()
    config = {
        "feature_stats": {"config": {"top_n": 30, "min_support": 5}},
        "explanations": {"config": {"n_frequent": 2, "n_concept": 2, "n_random": 1}},
        "feature_browser": {"config": {"max_features": 5}},
    }
    selection = [*config, "explanation_scores"]
    # Forced: the deleted file is behind the recorded versions of the assets' inputs.
    result = materialize(
        root, selection, {"ops": config}, partition_key=KEY, tags={FORCE_TAG: "true"}
    )
    assert result.success and materialized(result) == set(selection)
    out = root / "feature_stats" / "model=sasrec" / "layer=2"
    assert not (out / "concepts.parquet").exists()
    assert "best_concept" not in pq.read_schema(out / "features.parquet").names
    scores = pq.read_table(
        root / "explanation_scores" / "model=sasrec" / "layer=2" / "scores.parquet"
    ).to_pylist()
    assert len({s["feature"] for s in scores}) == 3 and all(
        s["names_concept"] is None for s in scores
    )
