"""`recsae` conventions a user pipes and types: CSV with Unix line ends, `--steer` in both
units, and run configs rejected before anything runs."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsae_pipeline import cli
from recsae_pipeline.serve import recommend as serve
from recsae_pipeline.serve.recommend import Steer, absolute_alphas
from recsae_pipeline.storage.registry import ArtifactPaths


def _sql(db: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "recsae_pipeline.cli", "sql", "--db", str(db), *args]
    return subprocess.run(command, capture_output=True, check=True)


def test_sql_csv_lines_end_with_a_bare_newline(tmp_path: Path) -> None:
    db = tmp_path / "x.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(
            "CREATE TABLE users AS SELECT * FROM (VALUES ('u000000'), ('u000001')) t(user_id)"
        )
    query = "SELECT user_id FROM users ORDER BY 1"
    out = _sql(db, "--format", "csv", query)
    assert out.stdout == b"user_id\nu000000\nu000001\n"  # `| tail -1` gives u000001, no \r
    assert out.stderr == b""
    # Cut short: the data stays clean on stdout, the note goes to stderr.
    out = _sql(db, "--format", "csv", "--max-rows", "1", query)
    assert out.stdout == b"user_id\nu000000\n" and b"raise --max-rows" in out.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("858=2", Steer(858, 2.0, relative=False)),
        ("858=-1.5", Steer(858, -1.5, relative=False)),
        ("858=2x", Steer(858, 2.0, relative=True)),
        ("858=0.5X", Steer(858, 0.5, relative=True)),
    ],
)
def test_steer_parses_absolute_and_relative_alphas(text: str, expected: Steer) -> None:
    assert cli._steer_spec(text) == expected


@pytest.mark.parametrize("text", ["oops", "858", "858=x", "858=2xx", "a=2"])
def test_steer_rejects_malformed_specs_with_both_forms(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"FEATURE=ALPHA.*FEATURE=SCALEx"):
        cli._steer_spec(text)


def _feature_stats(root: Path, max_activation: dict[int, float]) -> ArtifactPaths:
    paths = ArtifactPaths(root)
    path = paths.partition_dir("feature_stats", "sasrec", 2) / "features.parquet"
    path.parent.mkdir(parents=True)
    rows = [
        {"feature": f, "max_activation": m, "best_attribute": "genre:Horror", "top_titles": ["A"]}
        for f, m in max_activation.items()
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return paths


def test_relative_alpha_is_a_multiple_of_the_max_activation(tmp_path: Path) -> None:
    paths = _feature_stats(tmp_path, {858: 2.5, 7: 0.4})
    resolved = absolute_alphas(paths, "sasrec.layer2", [Steer(858, 2.0, True), Steer(7, 2.0)])
    assert [(f, a) for f, a, _ in resolved] == [(858, 5.0), (7, 2.0)]
    with pytest.raises(ValueError, match=r"feature 9 has no max activation.*9=2"):
        absolute_alphas(paths, "sasrec.layer2", [Steer(9, 2.0, True)])


@pytest.mark.parametrize(
    ("spec", "alpha", "said"),
    [("858=2x", 5.0, "= 2x its max activation 2.5 (relative"), ("858=2", 2.0, "(absolute;")],
)
def test_recommend_steers_with_the_resolved_alpha_and_says_which(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    spec: str,
    alpha: float,
    said: str,
) -> None:
    _feature_stats(tmp_path, {858: 2.5})
    seen: dict = {}

    def fake_recommend(paths, user_id, **kwargs) -> serve.SteeredRecommendations:
        seen.update(kwargs)
        return serve.SteeredRecommendations(user_id, 0, [], [], [], [])

    monkeypatch.setattr(serve, "recommend", fake_recommend)
    argv = ["--data-dir", str(tmp_path), "recommend", "--user", "u1", "--steer", spec]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    assert seen["steer"] == [(858, alpha)]
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"steering feature 858: alpha {alpha:g}") and said in first


@pytest.mark.parametrize(
    ("preset", "named", "workers"),
    [
        # Two workers check the config in the first worker up (the CLI never imports the
        # definitions itself): one case covers that path, the others check in-process.
        (
            "ops:\n  steering_evall:\n    config: {max_users: 10}\n",
            "'steering_evall' (no such op)",
            "2",
        ),  # noqa: E501
        (
            "ops:\n  recommender_eval:\n    config: {k: 1}\n",
            "'recommender_eval' (takes no config)",
            "1",
        ),  # noqa: E501
        ("ops:\n  sae:\n    config: {kk: 16}\n", 'unexpected config entry "kk"', "1"),
        ("opz: {}\n", "unknown top-level key 'opz'", "1"),
    ],
)
def test_materialize_rejects_an_unknown_op_or_key_before_running(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    preset: str,
    named: str,
    workers: str,
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    data = tmp_path / "data"
    monkeypatch.setenv("RECSAE_DATA_DIR", str(data))
    config = tmp_path / "preset.yaml"
    config.write_text(preset)
    assert cli.main(["materialize", "-c", str(config), "--workers", workers]) == 2
    err = capsys.readouterr().err
    assert f"{config}: " in err and named in err
    if "(no such op)" in named or "(takes no config)" in named:
        assert "take config for: " in err and "steering_eval" in err  # the valid ones
    assert not data.exists()  # nothing ran
