"""The README's main command, `recsae materialize` on the embedded default data, timed.

Runs the command in a fresh storage root and DAGSTER_HOME under --work, from this checkout or
another one (--checkout, e.g. a `git worktree` of an older commit, so before and after run
the same way), optionally under py-spy (--profile: a flame graph of every process, workers
included). Keeps in one result file: the wall time, the peak RSS of the largest process, every
Dagster step's seconds, the test NDCG@10 of every model and of every test user, and with
--baseline (an earlier run's result file) each model's test NDCG@10 difference to that run,
paired over the same test users with a bootstrap 95% CI. The per-user values come from the
baseline's result file, or from its --work when the file predates them.

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/default_run.py --checkout /tmp/before --work /tmp/recsae-before \\
        --label before --out benchmarks/results/default_run_before.json
    .venv/bin/python benchmarks/default_run.py --work /tmp/recsae-prof --profile \\
        --out benchmarks/results/default_run_profile.json    # flame graph of this commit
    .venv/bin/python benchmarks/default_run.py --work /tmp/recsae-after --label current \\
        --baseline benchmarks/results/default_run_before.json

Result: benchmarks/results/default_run_timing.json. A --profile run writes its flame graph
beside the result file as default_run_<commit>.svg (profile in a run of its own: py-spy slows
the run it samples); a later run of the same commit, and one comparing with a baseline whose
commit has one, name them in the result (`flame_graph`, `baseline_flame_graph`).
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

from benchmarks.activations import cpu_model  # noqa: E402
from benchmarks.llm_run import latest_stages, step_seconds  # noqa: E402
from recsae_pipeline.storage.atomic import write_json  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "default_run_timing.json"
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
MODELS = ("sasrec", "teacher", "student", "student_ce", "popularity")


def git(checkout: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=checkout, capture_output=True, text=True, check=False
    ).stdout.strip()


def per_user_ndcg(data: Path) -> dict[str, list[float]]:
    """model -> each test user's NDCG@10, in user order (recommender_eval_users)."""
    import pyarrow.parquet as pq

    table = pq.read_table(data / "models" / "recommender_eval_users.parquet").to_pydict()
    out: dict[str, list[tuple[int, float]]] = {}
    for model, user, ndcg in zip(table["model"], table["user"], table["ndcg@10"], strict=True):
        out.setdefault(model, []).append((user, ndcg))
    return {m: [v for _, v in sorted(rows)] for m, rows in out.items()}


def flame_graph_path(result: Path, commit: str) -> Path:
    """Where a --profile run of `commit` writes its flame graph: beside the result file."""
    return result.parent.resolve() / f"default_run_{commit}.svg"


def repo_path(path: Path) -> str | None:
    """`path` relative to the repository when it exists there (for the README), else None."""
    return str(path.relative_to(ROOT)) if path.is_file() and path.is_relative_to(ROOT) else None


def baseline_ndcg(base: dict[str, Any], path: Path) -> dict[str, list[float]]:
    """The baseline's per-user NDCG@10: from its result file, else from its --work on disk."""
    if "per_user_test_ndcg@10" in base:
        return base["per_user_test_ndcg@10"]
    data = Path(base["work"]) / "data"
    if not (data / "models" / "recommender_eval_users.parquet").is_file():
        raise SystemExit(
            f"default_run: {path} has no per_user_test_ndcg@10 and its work directory {data} "
            "is gone; run the baseline again with this script (--checkout <its worktree>) "
            "so its result file carries the per-user values"
        )
    return per_user_ndcg(data)


def paired(after: dict[str, list[float]], before: dict[str, list[float]]) -> list[dict]:
    """Per model: after - before test NDCG@10, paired over users, bootstrap 95% CI."""
    import numpy as np

    from recsae_pipeline.report.stats import compare

    rows = []
    for model in MODELS:
        if model not in after or model not in before or len(after[model]) != len(before[model]):
            continue
        c = compare(
            f"{model}: this run vs the baseline run",
            "test NDCG@10",
            "this run",
            np.asarray(after[model]),
            "baseline",
            np.asarray(before[model]),
            unit="users",
        )
        rows.append({"model": model, **c.as_dict()})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the code to run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsae-default-run"))
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--label", help="name of this run in the result (default: its commit)")
    parser.add_argument("--workers", help="passed to `recsae materialize --workers`")
    parser.add_argument("--profile", action="store_true", help="under py-spy, all processes")
    parser.add_argument("--baseline", type=Path, help="an earlier result file to compare with")
    parser.add_argument("--collect", action="store_true", help="only read an existing --work")
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    data, home = args.work / "data", args.work / "home"
    commit = git(checkout, "rev-parse", "--short", "HEAD")
    label = args.label or commit
    command = ["materialize"] + (["--workers", args.workers] if args.workers else [])
    svg = flame_graph_path(args.out, commit)
    wall = peak_mb = None
    if args.collect:
        previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
        wall, peak_mb = previous.get("wall_seconds"), previous.get("peak_rss_mb")
    else:
        shutil.rmtree(args.work, ignore_errors=True)
        home.mkdir(parents=True)
        env = os.environ | {
            "RECSAE_DATA_DIR": str(data),
            "DAGSTER_HOME": str(home),
            "PYTHONPATH": str(checkout),
        }
        cmd = [sys.executable, "-m", "recsae_pipeline.cli", *command]
        if args.profile:
            cmd = [str(PY_SPY), "record", "--subprocesses", "-r", "25", "-f", "flamegraph",
                   "-o", str(svg), "--", *cmd]  # fmt: skip
        print(f"default_run: {' '.join(cmd)} (in {checkout}, commit {commit})", flush=True)
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=checkout, env=env)
        wall = round(time.perf_counter() - start, 1)
        peak_mb = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        if done.returncode:
            print(
                f"default_run: recsae {' '.join(command)} exited {done.returncode}", file=sys.stderr
            )
            return done.returncode
    results = json.loads((data / "reports" / "results.json").read_text())
    stages = latest_stages(step_seconds(home))
    ndcg = per_user_ndcg(data)
    out: dict[str, Any] = {
        "benchmark": "benchmarks/default_run.py",
        "command": f"recsae {' '.join(command)}",
        "label": label,
        "commit": commit,
        "checkout": str(checkout),
        "wall_seconds": wall,
        "peak_rss_mb": peak_mb,
        "stages": stages,
        "stage_seconds_total": round(sum(s["seconds"] for s in stages), 1),
        "test_ndcg@10": {m: sum(v) / len(v) for m, v in ndcg.items()},
        "per_user_test_ndcg@10": ndcg,
        "recommenders": results.get("tables", {}).get("recommenders"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average_at_end": os.getloadavg(),
        "note": "load average above the core count means other processes shared the cores",
        "work": str(args.work),
        "profiled": bool(args.profile),
        "flame_graph": repo_path(svg),
    }
    if args.baseline:
        base = json.loads(args.baseline.read_text())
        out["baseline"] = {k: base.get(k) for k in ("label", "commit", "wall_seconds", "work")}
        out["baseline_flame_graph"] = repo_path(flame_graph_path(args.out, base["commit"]))
        out["vs_baseline"] = paired(ndcg, baseline_ndcg(base, args.baseline))
    print(f"wrote {write_json(out, args.out)}")
    print(f"wall {wall} s; steps {out['stage_seconds_total']} s; peak RSS {peak_mb} MB")
    for row in out.get("vs_baseline", []):
        print(f"  {row['model']}: {row['difference']:+.4f} {row['ci95']} {row['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
