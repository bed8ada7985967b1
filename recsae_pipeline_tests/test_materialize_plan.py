"""`recsae materialize`'s plans: the parallel one covers exactly the sequential one's work in
an order the asset graph allows, and running it on two workers writes the same bytes as on
one; a failed step stops the plan."""

from __future__ import annotations

import copy
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import torch

from recsae_pipeline.cli import job_run_configs
from recsae_pipeline.defs.definitions import defs
from recsae_pipeline.defs.plan import (
    _worker_step,
    parallel_plan,
    run_parallel,
    sequential_plan,
    step_threads,
)
from recsae_pipeline_tests.support import MODELS_CONFIG

MAIN_JOBS = ["main"]


def test_the_parallel_plan_runs_every_asset_once_after_its_parents() -> None:
    graph = defs.resolve_asset_graph()
    main = defs.resolve_job_def("main").asset_layer.selected_asset_keys
    plan = parallel_plan()
    position = {step.label: i for i, step in enumerate(plan)}
    step_of: dict[dg.AssetKey, str] = {}
    for step in plan:
        assert all(position[a] < position[step.label] for a in step.after), step
        if step.job == "main":
            for asset in step.assets:
                assert dg.AssetKey(asset) not in step_of, f"{asset} in two steps"
                step_of[dg.AssetKey(asset)] = step.label
    assert set(step_of) == main
    for key, label in step_of.items():
        step = plan[position[label]]
        for parent in graph.get(key).parent_keys & main:
            assert step_of[parent] == label or step_of[parent] in step.after, (key, parent)
    # Partition runs: the sequential plan's, each after its model's step.
    partition_runs = [(s.job, s.partition) for s in plan if s.partition]
    assert sorted(partition_runs) == sorted(
        (s.job, s.partition) for s in sequential_plan() if s.partition
    )
    for step in plan:
        if step.job.startswith("activations_"):
            model = step.job.removeprefix("activations_")
            assert step.after == (step_of[dg.AssetKey(model)],)
    assert plan[-1].job == "report" and set(plan[-1].after) == {s.label for s in plan[:-1]}


def _model_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / "models").rglob("*.safetensors"))
    }


def _configs(run_config: dict) -> dict[str, dict]:
    return job_run_configs(run_config, MAIN_JOBS)


@pytest.fixture
def tiny_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)  # each worker: an ephemeral instance
    return tmp_path


def test_two_workers_write_what_one_writes(tiny_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps run one by one (here, in plan order, each at the thread count the plan gives
    it) and on two worker processes side by side write the same model bytes: what a step
    writes depends on its thread count, never on the steps beside it or the process."""
    config = copy.deepcopy(MODELS_CONFIG)
    for model in ("teacher", "student", "student_ce"):
        config["ops"][model]["config"] |= {"max_epochs": 2, "patience": 2}
    configs = _configs(config)
    first, *rest = parallel_plan(features=False)
    # The first step (data and SASRec) runs alone in any plan: once, then copied.
    rest = [s._replace(after=tuple(a for a in s.after if a != first.label)) for s in rest]
    one_by_one, two_workers = tiny_env / "workers-1", tiny_env / "workers-2"  # no "=" in paths
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("RECSAE_DATA_DIR", str(one_by_one))
        for step in [first, *rest]:  # plan order is a topological order
            done = _worker_step(step, configs[step.job], False, step_threads(step, 2, 1))
            assert done.success, done
            if step is first:
                shutil.copytree(one_by_one, two_workers)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("RECSAE_DATA_DIR", str(two_workers))
    outcomes = list(run_parallel(rest, configs, 2, cores=2, share=1))
    assert all(o.success for o in outcomes), [o for o in outcomes if not o.success]
    assert {o.label for o in outcomes} == {s.label for s in rest}
    hashes = [_model_hashes(root) for root in (one_by_one, two_workers)]
    assert len(hashes[0]) >= 5  # sasrec, teacher (+ init), student, student_ce
    assert hashes[0] == hashes[1]


def test_a_failed_step_stops_the_plan(tiny_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSAE_DATA_DIR", str(tiny_env / "data"))
    config = copy.deepcopy(MODELS_CONFIG)
    config["ops"]["sasrec"]["config"]["num_heads"] = 3  # 16 is not divisible by 3
    outcomes = list(run_parallel(parallel_plan(features=False), _configs(config), 2, cores=2))
    assert len(outcomes) == 1 and not outcomes[0].success  # nothing after it started
    assert "main (" in outcomes[0].label and outcomes[0].run_id
    assert (tiny_env / "data" / "sequences").exists()
    assert not (tiny_env / "data" / "models").exists()


def test_steps_with_the_longest_queue_behind_them_start_first() -> None:
    """The ranking `run_parallel` starts ready steps by (after `first`): a model that a
    partition's two jobs and the report wait for ranks above a probe only the report waits
    for, though the probe comes first in the plan."""
    from recsae_pipeline.defs.plan import PlanStep, waiting_counts

    plan = [
        PlanStep("main", assets=("probe",)),
        PlanStep("main", assets=("model",)),
        PlanStep("activations", "model.layer1", after=("main (model)",)),
        PlanStep("features", "model.layer1", after=("activations [model.layer1]",)),
    ]
    plan.append(PlanStep("report", after=tuple(s.label for s in plan)))
    counts = waiting_counts(plan)
    assert counts == {
        "main (probe)": 1,
        "main (model)": 3,
        "activations [model.layer1]": 2,
        "features [model.layer1]": 1,
        "report": 0,
    }


def test_the_workers_end_when_the_process_that_started_them_is_killed(tmp_path: Path) -> None:
    """When the process that started the workers dies without shutting the pool down
    (SIGKILL), each worker ends within a second or so, though busy with a step (here a long
    sleep); without that they would run on and then wait for work for ever."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import time\n"
        "from recsae_pipeline.defs.plan import start_workers\n"
        "if __name__ == '__main__':\n"
        "    pool = start_workers(2, share=1, warm=False)\n"
        "    busy = [pool.submit(time.sleep, 60) for _ in range(2)]\n"
        "    while sum(f.running() for f in busy) < 2:\n"
        "        time.sleep(0.05)\n"
        "    print(*pool._processes, flush=True)\n"
        "    time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    assert parent.stdout is not None
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "a worker outlived its parent"


def _alive(pid: int) -> bool:
    """`pid` runs and is not a zombie (an orphan that init has not reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
