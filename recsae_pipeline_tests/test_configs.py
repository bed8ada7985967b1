"""Every run-config preset under configs/ is valid for the jobs `recsae materialize` runs."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from recsae_pipeline.defs.definitions import defs

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_presets_exist() -> None:
    assert {p.stem for p in PRESETS} >= {"default", "movielens-100k", "movielens-1m", "gpu-large"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
@pytest.mark.parametrize("job_name", ["main", "features"])
def test_preset_validates_against_the_job(preset: Path, job_name: str) -> None:
    job = defs.resolve_job_def(job_name)
    nodes = {n.name for n in job.graph.node_defs}
    ops = {k: v for k, v in yaml.safe_load(preset.read_text())["ops"].items() if k in nodes}
    if job_name == "main":
        assert "raw_interactions" in ops, f"{preset.name} does not pick a source"
    dg.validate_run_config(job, {"ops": ops})


def test_a_misspelt_knob_is_rejected() -> None:
    with pytest.raises(dg.DagsterInvalidConfigError, match="n_userz"):
        dg.validate_run_config(
            defs.resolve_job_def("main"),
            {"ops": {"raw_interactions": {"config": {"synthetic": {"n_userz": 5}}}}},
        )
