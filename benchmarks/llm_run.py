"""The whole graph with the SmolLM2 teacher (configs/llm.yaml), timed per stage.

Runs `recsae materialize -c CONFIG` in a fresh storage root (or collects an existing one with
--collect), then reads every step's duration from the Dagster instance (DAGSTER_HOME under
the work dir) and keeps, in one result file: the run's `reports/results.json` (every
comparison with its CI, the recommenders table), the layer probe's 30 rows, the wall time,
the peak RSS of the run, the seconds per stage (asset and partition), and the student's
inference speed-up over the teacher (ms per 1,000 users, from `recommender_eval`).

    nice .venv/bin/python benchmarks/llm_run.py                 # about 30-45 min on 2 cores
    .venv/bin/python benchmarks/llm_run.py --collect --work /tmp/recsae-llm

Result: benchmarks/results/llm_run.json, rendered into the README by
scripts/render_results.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsae_pipeline.storage.atomic import write_json  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "llm_run.json"


def step_seconds(home: Path) -> list[dict[str, Any]]:
    """Every successful step of every run in the instance at `home`: job, partition, step,
    seconds (Dagster's own step duration)."""
    import dagster as dg
    from dagster._core.events import DagsterEventType

    os.environ["DAGSTER_HOME"] = str(home)
    instance = dg.DagsterInstance.get()
    rows = []
    for run in reversed(instance.get_runs()):
        records = instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_SUCCESS)
        for record in records:
            event = record.dagster_event
            rows.append(
                {
                    "job": run.job_name,
                    "run": run.run_id,
                    "partition": run.tags.get("dagster/partition"),
                    "step": event.step_key,
                    "seconds": round(event.event_specific_data.duration_ms / 1000, 1),
                }
            )
    return rows


def latest_stages(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (step, partition): the latest run that computed it (over a second), else
    the latest; a store built over several `recsae materialize` calls (a run stopped by a
    failed check, then resumed) counts each stage once, as one run would."""
    kept: dict[tuple[str, str | None], dict[str, Any]] = {}
    for stage in stages:  # oldest run first
        key = (stage["step"], stage["partition"])
        if key not in kept or stage["seconds"] > 1.0 or kept[key]["seconds"] <= 1.0:
            kept[key] = stage
    return list(kept.values())


def speedup(results: dict[str, Any]) -> dict[str, float] | None:
    rows = {r["model"]: r for r in results.get("tables", {}).get("recommenders", [])}
    if "teacher" not in rows or "student" not in rows:
        return None
    teacher, student = rows["teacher"], rows["student"]
    return {
        "teacher_ms_per_1000_users": teacher["ms_per_1000_users"],
        "student_ms_per_1000_users": student["ms_per_1000_users"],
        "speedup": teacher["ms_per_1000_users"] / student["ms_per_1000_users"],
        "teacher_params": teacher["params"],
        "student_params": student["params"],
    }


def layer_probe(data: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = data / "models" / "layer_probe.parquet"
    return pq.read_table(path).to_pylist() if path.is_file() else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llm.yaml")
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsae-llm"))
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument(
        "--collect", action="store_true", help="only read an existing --work (no new run)"
    )
    args = parser.parse_args()
    data, home = args.work / "data", args.work / "home"
    command = f"recsae materialize -c {args.config}"
    wall, peak_mb = None, None
    if not args.collect:
        shutil.rmtree(args.work, ignore_errors=True)
        home.mkdir(parents=True)
        env = os.environ | {"RECSAE_DATA_DIR": str(data), "DAGSTER_HOME": str(home)}
        start = time.perf_counter()
        done = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "recsae"), "materialize", "-c", args.config],
            cwd=ROOT,
            env=env,
        )
        wall = round(time.perf_counter() - start, 1)
        peak_mb = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        if done.returncode:
            print(f"llm_run: {command} exited {done.returncode}", file=sys.stderr)
            return done.returncode
    results = json.loads((data / "reports" / "results.json").read_text())
    every = step_seconds(home)
    stages = latest_stages(every)
    out = results | {
        "command": command,
        "benchmark": f"benchmarks/llm_run.py --config {args.config}",
        "wall_seconds": wall,
        "peak_rss_mb": peak_mb,
        "stages": stages,
        "stage_seconds_total": round(sum(s["seconds"] for s in stages), 1),
        "dagster_runs": len({s["run"] for s in every}),
        "layer_probe": layer_probe(data),
        "speedup": speedup(results),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "note": "load average above the core count means other processes shared the cores",
    }
    print(f"wrote {write_json(out, args.out)}")
    probe_plot = data / "reports" / "layer_probe.png"
    if probe_plot.is_file():
        shutil.copyfile(probe_plot, args.out.parent / "llm_layer_probe.png")
    print(f"wall {wall} s; steps {out['stage_seconds_total']} s; speed-up {out['speedup']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
