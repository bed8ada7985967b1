"""`recsae materialize`'s plan, run in order or by a pool of worker processes.

The plan is the `main` job, then per (model, layer) partition its model's activations job
and the `features` job, then `report` (`sequential_plan`). On a machine with more than one
core, `parallel_plan` cuts the same work into steps along the asset graph so that
independent work overlaps: the `main` job's assets up to SASRec in one run, then each of
its other assets in a run of its own (a subset run of `main`, with that asset's checks), and
each partition's jobs as soon as that partition's model is trained. While the teacher trains,
SASRec's partitions build their SAEs; the two students and the layer probe train side by side.

`run_parallel` runs a plan on `workers` processes (`start_workers`: spawned once, each
importing the definitions as it starts, so the imports overlap and each pays them once), each step as one Dagster run in its worker (`execute_in_process`) once the steps it
waits for have succeeded; among steps ready at once, the plan's `first` ones start first,
then those with the most steps waiting behind them, then plan order. Every step gets a
fixed number of torch threads, decided by the plan and not by timing (cores // workers; all
cores for a step nothing can overlap), so the same command writes the same bytes run after
run. The first failed step stops the plan: running steps finish, nothing new starts.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import nullcontext
from multiprocessing import get_context
from typing import Any, NamedTuple

FIRST_MAIN_ASSET = "sasrec"
"""The `main` job's first step builds this asset and everything it depends on."""
ALONE = ("main", "report")
"""Steps that nothing can overlap (the first `main` step, `report`): they get every core."""


class PlanStep(NamedTuple):
    """One Dagster run of the plan."""

    job: str
    partition: str | None = None
    assets: tuple[str, ...] | None = None
    """A subset of the job's assets (each with its checks); None: the whole job."""
    after: tuple[str, ...] = ()
    """Labels of the steps that must have succeeded first."""
    alone: bool = False
    """No other step can run beside it: it gets every core."""
    first: bool = False
    """Among the steps ready at once, these start first (plan order otherwise)."""

    @property
    def label(self) -> str:
        label = self.job
        if self.assets is not None:
            label += f" ({', '.join(self.assets)})"
        return label + (f" [{self.partition}]" if self.partition else "")


class StepOutcome(NamedTuple):
    """What a step's run reports back to the plan (picklable, unlike the run's result)."""

    label: str
    success: bool
    run_id: str | None
    reused: list[str]
    """Assets skipped as unchanged (`recsae/skipped`)."""
    failed_checks: list[str]
    warnings: list[str]
    """'asset.check: description' of every failed WARN check."""
    seconds: float
    error: str | None = None
    """An exception raised outside the run (the run's own failures are in `success`)."""


def sequential_plan(features: bool = True) -> list[PlanStep]:
    """The whole jobs in order: `main`, then (with `features`) each partition's jobs, `report`."""
    from recsae_pipeline.defs.jobs import partition_jobs
    from recsae_pipeline.defs.partitions import feature_partitions

    plan = [PlanStep("main")]
    if features:
        for key in feature_partitions.get_partition_keys():
            plan += [PlanStep(job, key) for job in partition_jobs(key)]
        plan.append(PlanStep("report"))
    return [step._replace(after=(plan[i - 1].label,) if i else ()) for i, step in enumerate(plan)]


def parallel_plan(features: bool = True) -> list[PlanStep]:
    """The same runs as `sequential_plan`, cut along the asset graph (module docstring)."""
    import dagster as dg

    from recsae_pipeline.defs.definitions import defs
    from recsae_pipeline.defs.jobs import partition_jobs
    from recsae_pipeline.defs.partitions import feature_partitions
    from recsae_pipeline.storage.registry import parse_partition_key

    graph = defs.resolve_asset_graph()
    main = defs.resolve_job_def("main").asset_layer.selected_asset_keys
    order = [key for key in graph.toposorted_asset_keys if key in main]
    first_key = dg.AssetKey(FIRST_MAIN_ASSET)
    first = {first_key} | (graph.get_ancestor_asset_keys(first_key) & main)
    # Assets that depend on nothing in `main` outside the first step join it (the base LLM).
    first |= {k for k in order if not (graph.get(k).parent_keys & main) - first}
    first_step = PlanStep("main", assets=tuple(k.to_user_string() for k in order if k in first))
    steps = [first_step._replace(alone=True)]
    step_of = dict.fromkeys(first, first_step.label)
    for key in order:
        if key in first:
            continue
        after = sorted({step_of[p] for p in graph.get(key).parent_keys & main})
        step = PlanStep("main", assets=(key.to_user_string(),), after=tuple(after))
        steps.append(step)
        step_of[key] = step.label
    # Among steps ready together, a model that partitions wait for goes first.
    feeds = {parse_partition_key(k)[0] for k in feature_partitions.get_partition_keys()}
    steps = [s._replace(first=True) if set(s.assets or ()) & feeds else s for s in steps]
    if not features:
        return steps
    partition_steps = []
    for key in feature_partitions.get_partition_keys():
        model, _ = parse_partition_key(key)
        previous = step_of[dg.AssetKey(model)]
        for job in partition_jobs(key):
            step = PlanStep(job, key, after=(previous,))
            partition_steps.append(step)
            previous = step.label
    # A partition of a model trained early goes first (a stable sort: activations, features).
    rank = {step.label: i for i, step in enumerate(steps)}
    model_step = {k: step_of[dg.AssetKey(parse_partition_key(k)[0])] for k in feature_partitions.get_partition_keys()}  # fmt: skip
    partition_steps.sort(key=lambda s: rank[model_step[s.partition]])
    steps += partition_steps
    steps.append(PlanStep("report", after=tuple(s.label for s in steps), alone=True))
    return steps


def step_run_config(step: PlanStep, job_config: dict[str, Any]) -> dict[str, Any]:
    """The job's run config cut to the step's assets (Dagster refuses config for ops a subset
    run does not have)."""
    if step.assets is None:
        return job_config
    ops = {k: v for k, v in (job_config.get("ops") or {}).items() if k in step.assets}
    return {**job_config, "ops": ops}


def execute_step(step: PlanStep, run_config: dict[str, Any], instance: Any, force: bool) -> Any:
    """Run one step in this process; the `ExecuteInProcessResult`."""
    import dagster as dg

    from recsae_pipeline.defs.definitions import defs
    from recsae_pipeline.defs.versioning import FORCE_TAG

    return defs.resolve_job_def(step.job).execute_in_process(
        run_config=step_run_config(step, run_config),
        instance=instance,
        partition_key=step.partition,
        asset_selection=None if step.assets is None else [dg.AssetKey(a) for a in step.assets],
        raise_on_error=False,
        tags={FORCE_TAG: "true"} if force else None,
    )


def outcome(label: str, result: Any, seconds: float) -> StepOutcome:
    """A run's result as the plan reports it."""
    import dagster as dg

    from recsae_pipeline.defs.versioning import SKIPPED_TAG

    reused = sorted(
        e.asset_key.to_user_string()
        for e in result.get_asset_materialization_events()
        if e.materialization.tags.get(SKIPPED_TAG) == "true"
    )
    evaluations = result.get_asset_check_evaluations()
    return StepOutcome(
        label=label,
        success=result.success,
        run_id=result.run_id,
        reused=reused,
        failed_checks=[e.check_name for e in evaluations if not e.passed],
        warnings=[
            f"{e.asset_key.to_user_string()}.{e.check_name}: {e.description}"
            for e in evaluations
            if not e.passed and e.severity == dg.AssetCheckSeverity.WARN
        ],
        seconds=seconds,
    )


def step_threads(step: PlanStep, cores: int, share: int) -> int:
    """Torch threads for `step`: every core when it runs alone, else `share`."""
    return cores if step.alone else share


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _instance() -> Any:
    import dagster as dg

    return (
        dg.DagsterInstance.get()
        if os.environ.get("DAGSTER_HOME")
        else dg.DagsterInstance.ephemeral()
    )


def _worker_step(
    step: PlanStep, run_config: dict[str, Any], force: bool, threads: int
) -> StepOutcome:
    """Run `step` in a worker process with `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        result = execute_step(step, run_config, _instance(), force)
    except Exception as err:  # noqa: BLE001 - reported to the plan, which stops
        return StepOutcome(step.label, False, None, [], [], [], time.perf_counter() - start,
                           f"{type(err).__name__}: {err}")  # fmt: skip
    return outcome(step.label, result, time.perf_counter() - start)


def _init_worker(threads: int, parent: int, warm: bool = True) -> None:
    _die_with_parent(parent)
    # Before torch is imported in this process: OpenMP reads these once.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    if warm:
        # Every step needs the definitions (torch, transformers, Dagster: about 10 s of
        # imports); importing them here, as the pool starts, overlaps the workers' imports.
        import recsae_pipeline.defs.definitions  # noqa: F401


def _die_with_parent(parent: int) -> None:
    """End this worker once `parent`, the process that started it, is gone (killed, say): a
    pool worker busy with a step would otherwise run on, and then wait for work for ever.
    A step's outputs are staged until they are published, so nothing published is lost."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def start_workers(workers: int, share: int | None = None, warm: bool = True) -> ProcessPoolExecutor:
    """`workers` spawned processes for `run_parallel`, started now: each imports the
    definitions as it starts (`warm`), so the caller can hand the first worker free work
    (building the plan, say) while the others import; each ends when this process does.
    `share`: torch threads of a step that does not run alone (default: cores // workers)."""
    share = share or max(1, available_cores() // workers)
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("spawn"),  # fork would copy a process that may hold threads
        initializer=_init_worker,
        initargs=(share, os.getpid(), warm),
    )
    # The pool spawns a process per submit while none is idle: one no-op each starts them all.
    for _ in range(workers):
        pool.submit(os.getpid)
    return pool


def waiting_counts(plan: list[PlanStep]) -> dict[str, int]:
    """label -> how many steps wait for it, directly or through others: among steps ready
    at once the one with the longest queue behind it starts first (a partition's activations
    before the layer probe, say), so the plan's tail is not one long chain on one worker."""
    after = {step.label: step.after for step in plan}
    waits_for: dict[str, set[str]] = {}

    def ancestors(label: str) -> set[str]:
        if label not in waits_for:
            waits_for[label] = set(after[label]).union(*map(ancestors, after[label]))
        return waits_for[label]

    for label in after:
        ancestors(label)
    counts = dict.fromkeys(after, 0)
    for waited_for in waits_for.values():
        for label in waited_for:
            counts[label] += 1
    return counts


def run_parallel(
    plan: list[PlanStep],
    configs: dict[str, dict[str, Any]],
    workers: int,
    force: bool = False,
    cores: int | None = None,
    share: int | None = None,
    pool: ProcessPoolExecutor | None = None,
) -> Iterator[StepOutcome]:
    """Run `plan` on `workers` processes, yielding each step's outcome as it ends; after a
    failed step nothing new starts and the rest is not yielded. `configs` maps job -> run
    config (`cli.job_run_configs`). A step that runs alone gets `cores` torch threads (default:
    this process's), any other `share` (default: cores // workers): the bytes a step writes
    depend on its thread count, never on which steps happened to run beside it. `pool`: the
    workers of `start_workers(workers, share)`, left running (default: a pool of its own)."""
    cores = cores or available_cores()
    share = share or max(1, cores // workers)
    labels = [s.label for s in plan]
    if len(set(labels)) != len(labels):
        raise ValueError(f"plan has repeated steps: {labels}")
    unknown = {a for s in plan for a in s.after} - set(labels)
    if unknown:
        raise ValueError(f"plan steps wait for steps it does not have: {sorted(unknown)}")
    waiting = waiting_counts(plan)
    pending, done = list(plan), set()
    running: dict[Future, PlanStep] = {}
    with nullcontext(pool) if pool else start_workers(workers, share) as pool:
        failed = False
        while pending or running:
            while not failed and len(running) < workers:
                ready = min(
                    (s for s in pending if set(s.after) <= done),
                    key=lambda s: (not s.first, -waiting[s.label]),  # then plan order
                    default=None,
                )
                if ready is None or (running and ready.alone):
                    break
                if any(s.alone for s in running.values()):
                    break
                pending.remove(ready)
                threads = step_threads(ready, cores, share)
                print(f"recsae materialize: {ready.label} ... ({threads} thread"
                      f"{'s' if threads > 1 else ''})", flush=True)  # fmt: skip
                future = pool.submit(_worker_step, ready, configs[ready.job], force, threads)
                running[future] = ready
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                step = running.pop(future)
                result = future.result()
                yield result
                if result.success:
                    done.add(step.label)
                else:
                    failed = True
