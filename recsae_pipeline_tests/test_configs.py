"""Every run-config preset under configs/ is valid for the jobs `recsae materialize` runs,
checked as `recsae materialize -c` checks it (cli.job_run_configs), and typos are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recsae_pipeline.cli import job_run_configs, materialize_plan

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
JOBS = list(dict.fromkeys(job for job, _ in materialize_plan()))
"""Every job `recsae materialize` runs."""


def test_presets_exist() -> None:
    assert {p.stem for p in PRESETS} >= {
        "default",
        "movielens-100k",
        "movielens-1m",
        "gpu-large",
        "llm",
        "llm-gpu",
    }


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_against_the_jobs(preset: Path) -> None:
    run_config = yaml.safe_load(preset.read_text())
    configs = job_run_configs(run_config, JOBS)
    assert "raw_interactions" in configs["main"]["ops"], f"{preset.name} does not pick a source"
    # Every op the preset names reaches a job: nothing is dropped on the way.
    assert set(run_config["ops"]) == {op for c in configs.values() for op in c["ops"]}


def _preset_with(preset: Path, ops: dict) -> dict:
    run_config = yaml.safe_load(preset.read_text())
    run_config["ops"].update(ops)
    return run_config


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_a_misspelt_op_name_is_rejected(preset: Path) -> None:
    run_config = _preset_with(preset, {"steering_evals": {"config": {"max_users": 10}}})
    with pytest.raises(ValueError, match=r"'steering_evals' \(no such op\).*steering_eval"):
        job_run_configs(run_config, JOBS)


def test_config_for_an_op_without_config_is_rejected() -> None:
    run_config = _preset_with(PRESETS[0], {"recommender_eval": {"config": {"k": 5}}})
    with pytest.raises(ValueError, match=r"'recommender_eval' \(takes no config\)"):
        job_run_configs(run_config, JOBS)


@pytest.mark.parametrize(
    ("ops", "key"),
    [
        ({"raw_interactions": {"config": {"synthetic": {"n_userz": 5}}}}, "n_userz"),
        ({"sae": {"config": {"expansoin": 8}}}, "expansoin"),
    ],
)
def test_a_misspelt_knob_is_rejected(ops: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f'unexpected config entry "{key}"'):
        job_run_configs({"ops": ops}, JOBS)


def test_an_unknown_section_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown top-level key 'op'.*ops, resources"):
        job_run_configs({"op": {}}, JOBS)


def test_a_full_preset_is_accepted_with_skip_features(monkeypatch: pytest.MonkeyPatch) -> None:
    # `recsae materialize -c configs/small.yaml --skip-features` runs only `main`, but the
    # preset's per-partition ops are still valid: it must not be refused.
    import dagster as dg

    from recsae_pipeline import cli

    ran: list[str] = []
    monkeypatch.setattr(cli, "_run_plan", lambda plan, configs, instance, force: ran.extend(
        job for job, _ in plan) or iter(()))  # fmt: skip
    (small,) = [p for p in PRESETS if p.stem == "small"]
    run_config = yaml.safe_load(small.read_text())
    list(cli.materialize_runs(run_config, dg.DagsterInstance.ephemeral(), features=False))
    assert ran == ["main"]
