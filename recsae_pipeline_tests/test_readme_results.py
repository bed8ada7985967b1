"""No figure in the README is typed: its results section is what the renderer makes of the
committed result files, and every comparison in it has both sides and a CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsae_pipeline.report.readme import BEGIN, END, render, replace_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def test_the_readme_results_section_is_rendered_from_the_committed_files() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    assert replace_section(readme, render(RESULTS)) == readme, (
        "README.md's results section is stale: run `.venv/bin/python scripts/render_results.py`"
    )


def test_a_changed_result_file_changes_the_rendered_section(tmp_path: Path) -> None:
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        pytest.skip("no result files committed")
    for f in files:
        (tmp_path / f.name).write_text(f.read_text())
    before = render(tmp_path)
    victim = next(f for f in files if "comparisons" in f.read_text())
    data = json.loads(victim.read_text())
    rows = data.get("comparisons")
    if rows is None:
        rows = next(iter(data["datasets"].values()))["comparisons"]
    rows[0]["difference"] += 0.5
    (tmp_path / victim.name).write_text(json.dumps(data))
    assert render(tmp_path) != before
