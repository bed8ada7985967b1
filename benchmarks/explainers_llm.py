"""Explainers with a real language model: SAGE and the one-shot baseline, each with
SmolLM2-135M-Instruct (llama.cpp's server, grammar-constrained replies: the `local` LLM
backend) and with the offline policy, on the same features of one partition of a trained
store; every explanation scored the same way, by the offline scorer (`interp/scoring.py`),
through the pipeline's own driver (`interp/explain.py`: `explain_features`,
`score_features`, `annotate_scores`).

Reported: per arm the mean of every score, LLM calls, prompt and completion tokens and wall
seconds per feature, corrections, cut-off replies, failed calls, how SAGE stopped, the share
of crafted sequences that named no catalog item, and what the labels are made of (a
catalog concept, an item's title, the prompt's item formatting); the paired comparisons over
features with bootstrap 95% CIs (`report/stats.py`); and the server's throughput (prompt and
generated tokens/s) by thread count x OpenMP wait policy x a competing busy process, which
is what the local backend's defaults (half the cores, OMP_WAIT_POLICY=PASSIVE) rest on.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/explainers_llm.py --store DIR
    .venv/bin/python benchmarks/explainers_llm.py --store DIR --quick    # smoke: 2 features

Each explanation is checkpointed (`<store>/reports/explainers_llm/`), so `--resume` picks a
killed run up. Results: benchmarks/results/explainers_llm.{json,md} (`--quick`:
explainers_llm_quick.*).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pyarrow.parquet as pq

from recsae_pipeline.defs.resources import LLM
from recsae_pipeline.interp.explain import (
    METRICS,
    LoadedPartition,
    annotate_scores,
    explain_features,
    score_features,
    select_features,
)
from recsae_pipeline.interp.llm_policy import (
    DOMAIN,
    HYPOTHESES_TASK,
    HYPOTHESIS_GUIDE,
    exemplar_evidence,
)
from recsae_pipeline.interp.local_server import (
    LocalServer,
    ServerConfig,
    default_threads,
    json_grammar,
)
from recsae_pipeline.interp.offline_policy import OfflinePolicy
from recsae_pipeline.interp.replies import HypothesesReply
from recsae_pipeline.interp.sage import Explanation, Limits
from recsae_pipeline.interp.scoring import OfflineScorer
from recsae_pipeline.interp.spec import parse_claims
from recsae_pipeline.report.stats import Comparison, compare, format_ci
from recsae_pipeline.storage.atomic import atomic_path, write_json
from recsae_pipeline.storage.registry import ArtifactPaths, parse_partition_key

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("sage/smollm2", "baseline/smollm2", "sage/offline", "baseline/offline")
PAIRS = (
    ("SAGE: SmolLM2 vs offline policy", "sage/smollm2", "sage/offline"),
    ("baseline: SmolLM2 vs offline policy", "baseline/smollm2", "baseline/offline"),
    ("SmolLM2: SAGE vs baseline", "sage/smollm2", "baseline/smollm2"),
    ("offline policy: SAGE vs baseline", "sage/offline", "baseline/offline"),
)
COMPARED = (*METRICS, "names_concept")
FORMATTING = re.compile(r"\[id \d+\]|·|\(\d{4}\) \[|<item \d+>")
"""How a prompt renders items (`[id N] Title (Year) [Genres] · band`): in a label, copied."""


def arm_of(e: Explanation) -> str:
    return f"{e.method}/{'offline' if e.backend == OfflinePolicy.name else 'smollm2'}"


# ----------------------------------------------------------------------------- explaining


def _checkpoint(work: Path, arm: str) -> Path:
    return work / f"{arm.replace('/', '_')}.jsonl"


def _rows(work: Path, arm: str) -> list[dict]:
    path = _checkpoint(work, arm)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _done(work: Path, arm: str) -> dict[int, Explanation]:
    return {int(r["feature"]): Explanation.from_row(r) for r in _rows(work, arm)}


def arm_commits(work: Path) -> dict[str, list[str]]:
    """The commits the checkpointed explanations of each arm were written at (a resumed
    run scores explanations written earlier)."""
    return {arm: sorted({r.get("commit", "unknown") for r in _rows(work, arm)}) for arm in ARMS}


def explain_arm(
    loaded: LoadedPartition,
    features: list[int],
    arm: str,
    factory: Any,
    work: Path,
    limits: Limits,
    seed: int,
) -> list[Explanation]:
    """`arm`'s explanations of `features`, one feature at a time, each appended to the arm's
    checkpoint; features already there are read back."""
    done = _done(work, arm)
    method = arm.split("/")[0]
    for k, feature in enumerate(features, start=1):
        if feature in done:
            continue
        (e,) = explain_features(
            loaded, [feature], factory, work / "transcripts" / arm.replace("/", "_"), limits,
            (method,), seed,
        )  # fmt: skip
        done[feature] = e
        with _checkpoint(work, arm).open("a") as f:
            f.write(json.dumps(e.as_row() | {"commit": _commit()}, default=str) + "\n")
        print(
            f"  {arm} {k}/{len(features)}: feature {feature}: {e.label[:70]!r} "
            f"({e.usage.get('calls', 0)} calls, {e.seconds:.0f} s; {e.stopped_by[:40]})",
            flush=True,
        )
    return [done[f] for f in features]


def transcript_counts(e: Explanation) -> dict[str, Any]:
    """From the explanation's JSONL transcript: replies cut off at the token limit, the
    crafted sequences that ran or named no catalog item, and the first prompt's text."""
    out: dict[str, Any] = {"cut_off": 0, "sequences": 0, "unresolved": 0, "prompt": ""}
    if not e.transcript or not Path(e.transcript).exists():
        return out
    for line in Path(e.transcript).read_text().splitlines():
        event = json.loads(line)
        if event["state"] == "llm_call":
            out["cut_off"] += int(event["call"].get("cut_off", 0))
            if not out["prompt"]:
                out["prompt"] = "\n".join(m["content"] for m in event["call"]["messages"])
        elif event["state"] == "run":
            result = event["result"]
            out["sequences"] += len(result["sequences"])
            out["unresolved"] += len(result["unresolved"])
    return out


def label_kinds(label: str, catalog: Any, prompt: str = "") -> dict[str, bool]:
    """What a label is made of: a catalog concept the offline scorer reads (genre, decade,
    popularity, franchise, sequel or run), an item's title, the prompt's item formatting,
    20 or more characters copied from its first prompt."""
    lower = label.lower()
    titles = {i.title.lower() for i in catalog.items.values() if len(i.title) >= 5}
    copied = difflib.SequenceMatcher(None, label, prompt, autojunk=False).find_longest_match()
    return {
        "names_vocabulary": bool(parse_claims(label, catalog)),
        "names_a_title": any(t in lower for t in titles),
        "copies_formatting": bool(FORMATTING.search(label)),
        "copies_prompt": copied.size >= 20,
        "unexplained": lower.strip() == "unexplained",
    }


# ----------------------------------------------------------------------------- summary


def _mean(values: list[float]) -> float:
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    return float(x.mean()) if len(x) else float("nan")


def summarize(scores: list[dict], explanations: list[Explanation], catalog: Any) -> dict:
    by_arm: dict[str, dict] = {}
    for arm in ARMS:
        rows = [s for s in scores if s["arm"] == arm]
        es = [e for e in explanations if arm_of(e) == arm]
        if not rows:
            continue
        counts = [transcript_counts(e) for e in es]
        kinds = [
            label_kinds(e.label, catalog, c["prompt"]) for e, c in zip(es, counts, strict=True)
        ]
        n = len(es)
        ran = sum(c["sequences"] for c in counts)
        crafted = ran + sum(c["unresolved"] for c in counts)  # one entry per dropped sequence
        by_arm[arm] = {
            "n": n,
            **{f"mean_{m}": _mean([_num(s[m]) for s in rows]) for m in COMPARED},
            **{f"n_nan_{m}": sum(not math.isfinite(_num(s[m])) for s in rows) for m in COMPARED},
            "llm_calls_per_feature": _mean([e.usage.get("calls", 0) for e in es]),
            "prompt_tokens_per_feature": _mean([e.usage.get("prompt_tokens", 0) for e in es]),
            "completion_tokens_per_feature": _mean(
                [e.usage.get("completion_tokens", 0) for e in es]
            ),
            "seconds_per_feature": _mean([e.seconds for e in es]),
            "seconds_per_feature_max": max(e.seconds for e in es),
            "corrections": int(sum(e.usage.get("corrections", 0) for e in es)),
            "failed_calls": int(sum(e.usage.get("failures", 0) for e in es)),
            "cut_off_replies": sum(c["cut_off"] for c in counts),
            "stopped_by": dict(Counter(e.stopped_by.split(":")[0] for e in es)),
            "experiments_per_feature": _mean([e.experiments for e in es]),
            "crafted_sequences": crafted,
            "sequences_run": ran,
            "unresolved_share": (crafted - ran) / crafted if crafted else float("nan"),
            **{f"labels_{k}": float(np.mean([d[k] for d in kinds])) for k in kinds[0]},
        }
    return by_arm


def _num(value: Any) -> float:
    if value is None:
        return float("nan")
    return float(value)


def comparisons(scores: list[dict], seed: int) -> list[Comparison]:
    """Every pair of arms on every metric, paired by feature (NaN pairs counted), plus the
    cost of SAGE over the baseline with SmolLM2 (tokens and wall seconds)."""
    value = {(s["arm"], int(s["feature"])): s for s in scores}
    features = sorted({int(s["feature"]) for s in scores})
    out = []
    for name, a, b in PAIRS:
        if not any((a, f) in value for f in features) or not any((b, f) in value for f in features):
            continue
        both = [f for f in features if (a, f) in value and (b, f) in value]
        metrics = COMPARED + (("llm_tokens", "seconds") if a.endswith("smollm2") and b.endswith("smollm2") else ())  # fmt: skip
        for m in metrics:
            out.append(
                compare(
                    f"explainers_llm: {name}, {m}",
                    m,
                    a,
                    [_num(value[(a, f)][m]) for f in both],
                    b,
                    [_num(value[(b, f)][m]) for f in both],
                    unit="features",
                    seed=seed,
                    pair=name,
                    features=both,
                )  # fmt: skip
            )
    return out


# ----------------------------------------------------------------------------- throughput


def throughput(
    ctx: Any, threads: list[int], work: Path, repeats: int = 2, max_tokens: int = 150
) -> list[dict]:
    """Prompt and generated tokens/s of the server on SAGE's real hypotheses prompt (with
    its grammar), by threads x OpenMP wait policy x one competing busy process of ours
    (other processes on the machine are not ours to stop: the load average is recorded).
    Prompt speed from a 1-token request on a fresh prompt; generation speed from the same
    prompt again (then cached), `max_tokens` long. Each setting's rows are checkpointed in
    `work/throughput.jsonl` (kept by --resume)."""
    checkpoint = work / "throughput.jsonl"
    kept = (
        [json.loads(line) for line in checkpoint.read_text().splitlines()]
        if checkpoint.exists()
        else []
    )
    system = f"{DOMAIN}\n\n{HYPOTHESIS_GUIDE}\n\n{HYPOTHESES_TASK}"
    grammar = {"grammar": json_grammar(HypothesesReply)}
    rows = []
    for hog in (False, True):
        for n in threads:
            for wait in ("PASSIVE", None):
                setting = (n, wait or "runtime default", hog)
                done = [
                    r
                    for r in kept
                    if (r["n_threads"], r["omp_wait_policy"], r["competing_busy_process"])
                    == setting
                ]
                if done:
                    rows += done
                    continue
                config = ServerConfig(n_threads=n, omp_wait_policy=wait, log_dir=str(work))
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if hog else None
                try:
                    with LocalServer(config) as server:
                        client = openai.OpenAI(
                            base_url=server.base_url, api_key="EMPTY", timeout=600
                        )
                        for r in range(repeats):
                            nonce = f"(run {time.time_ns()})\n"  # defeats the prompt cache
                            messages = [
                                {"role": "system", "content": nonce + system},
                                {"role": "user", "content": exemplar_evidence(ctx)},
                            ]
                            load = os.getloadavg()[0]
                            timed = []
                            for limit in (1, max_tokens):
                                t = time.perf_counter()
                                reply = client.chat.completions.create(
                                    model=server.model, messages=messages, max_tokens=limit,
                                    temperature=0.0, extra_body=grammar,
                                )  # fmt: skip
                                timed.append((time.perf_counter() - t, reply.usage))
                            (prompt_s, prompt), (gen_s, gen) = timed
                            rows.append(
                                {
                                    "n_threads": n,
                                    "omp_wait_policy": wait or "runtime default",
                                    "competing_busy_process": hog,
                                    "repeat": r,
                                    "prompt_tokens": prompt.prompt_tokens,
                                    "prompt_tokens_per_s": prompt.prompt_tokens / prompt_s,
                                    "completion_tokens": gen.completion_tokens,
                                    "generated_tokens_per_s": gen.completion_tokens / gen_s,
                                    "load_average_1m": load,
                                }  # fmt: skip
                            )
                            print(f"  throughput {rows[-1]}", flush=True)
                            with checkpoint.open("a") as f:
                                f.write(json.dumps(rows[-1]) + "\n")
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
    return rows


# ----------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = [
        "# Explainers with a real LLM (SmolLM2-135M) and offline",
        "",
        f"Store `{result['store']}`, partition `{result['partition']}`, "
        f"{len(result['features'])} features ({result['selection_counts']}); scorer: "
        f"{result['scorer']}; {result['server']['n_threads']} server threads; commit "
        f"{result['commit'][:10]}. Command: `{result['command']}`.",
        "",
        "| arm | n | gen. acc. (label) | gen. acc. (descr.) | predictive r | detection AUC "
        "| names concept | calls/feature | tokens/feature (prompt+compl.) | s/feature "
        "| corrections | cut off | failed | labels: concept / title / formatting / prompt copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in result["arms"].items():
        lines.append(
            f"| {arm} | {s['n']} | {s['mean_generative_accuracy']:.3f} | "
            f"{s['mean_generative_accuracy_description']:.3f} | {s['mean_predictive_r']:.3f} | "
            f"{s['mean_detection_auc']:.3f} | {s['mean_names_concept']:.2f} | "
            f"{s['llm_calls_per_feature']:.1f} | {s['prompt_tokens_per_feature']:.0f}+"
            f"{s['completion_tokens_per_feature']:.0f} | {s['seconds_per_feature']:.1f} | "
            f"{s['corrections']} | {s['cut_off_replies']} | {s['failed_calls']} | "
            f"{s['labels_names_vocabulary']:.2f} / {s['labels_names_a_title']:.2f} / "
            f"{s['labels_copies_formatting']:.2f} / {s['labels_copies_prompt']:.2f} |"
        )
    lines += [
        "",
        "| arm | experiments/feature | crafted sequences | not in the catalog | stopped by |",
        "|---|---|---|---|---|",
    ]
    for arm, s in result["arms"].items():
        stops = ", ".join(f"{k} {v}" for k, v in sorted(s["stopped_by"].items()))
        lines.append(
            f"| {arm} | {s['experiments_per_feature']:.1f} | {s['crafted_sequences']} | "
            f"{s['unresolved_share']:.2f} | {stops} |"
        )
    lines += [
        "",
        "Paired differences over features (a - b, bootstrap 95% CI):",
        "",
        "| comparison | metric | a | b | a - b [95% CI] | n | NaN pairs | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in map(Comparison.from_dict, result["comparisons"]):
        lines.append(
            f"| {c.notes['pair']} | {c.metric} | {c.a.value:.3f} | "
            f"{c.b.value:.3f} | {format_ci(c, 3)} | {c.n} | {c.n_nan} | {c.verdict} |"
        )
    if result["throughput"]:
        lines += [
            "",
            "Server throughput on SAGE's hypotheses prompt (mean of the repeats):",
            "",
            "| threads | OMP_WAIT_POLICY | competing busy process | prompt tokens/s "
            "| generated tokens/s | load average |",
            "|---|---|---|---|---|---|",
        ]
        groups: dict[tuple, list[dict]] = {}
        for r in result["throughput"]:
            key = (r["n_threads"], r["omp_wait_policy"], r["competing_busy_process"])
            groups.setdefault(key, []).append(r)
        for (n, wait, hog), rs in groups.items():
            lines.append(
                f"| {n} | {wait} | {'yes' if hog else 'no'} | "
                f"{np.mean([r['prompt_tokens_per_s'] for r in rs]):.0f} | "
                f"{np.mean([r['generated_tokens_per_s'] for r in rs]):.1f} | "
                f"{np.mean([r['load_average_1m'] for r in rs]):.1f} |"
            )
    return "\n".join(lines) + "\n"


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="storage root of a trained store")
    parser.add_argument("--partition", default="sasrec.layer2", help="<model>.layer<l>")
    parser.add_argument("--n-frequent", type=int, default=5)
    parser.add_argument("--n-random", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--n-threads", type=int, default=None, help="server threads (default: half the cores)"
    )
    parser.add_argument(
        "--max-llm-calls", type=int, default=None, help="SAGE's budget (default: Limits())"
    )
    parser.add_argument("--max-output-tokens", type=int, default=None)
    parser.add_argument(
        "--quick", action="store_true", help="2 features, SAGE capped at 4 calls, no throughput"
    )
    parser.add_argument("--resume", action="store_true", help="keep the checkpointed explanations")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--throughput-threads", default="1,2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    paths = ArtifactPaths(Path(args.store).resolve())
    model, layer = parse_partition_key(args.partition)
    part = paths.partition(model, layer)
    stats = pq.read_table(part.feature_stats).to_pylist()
    n_frequent, n_random = (1, 1) if args.quick else (args.n_frequent, args.n_random)
    selection = select_features(stats, n_frequent, n_random, n_concept=0, seed=args.seed)
    features = list(selection)
    limits = Limits()
    if args.max_llm_calls or args.quick:
        limits = Limits(max_llm_calls=args.max_llm_calls or 4)
    stem = "explainers_llm_quick" if args.quick else "explainers_llm"
    work = paths.reports_dir / stem
    if not args.resume and work.exists():
        for f in work.glob("*.jsonl"):
            f.unlink()
    work.mkdir(parents=True, exist_ok=True)
    loaded = LoadedPartition(paths, model, layer, "cpu")
    print(f"{len(features)} features of {args.partition}: {selection}", flush=True)

    explanations: list[Explanation] = []
    for arm in ("sage/offline", "baseline/offline"):
        explanations += explain_arm(loaded, features, arm, OfflinePolicy, work, limits, args.seed)
    overrides = {
        k: v
        for k, v in {
            "n_threads": args.n_threads,
            "max_output_tokens": args.max_output_tokens,
        }.items()
        if v is not None
    }
    with LLM(backend="local", log_dir=str(work), **overrides) as llm:
        factory = None
        for arm in ("baseline/smollm2", "sage/smollm2"):
            if len(_done(work, arm)) < len(features) and factory is None:
                factory = llm.policy_factory()  # starts the server
            explanations += explain_arm(loaded, features, arm, factory, work, limits, args.seed)
        server = {
            "gguf": str(llm.server.gguf) if llm.server else llm.gguf,
            "model": llm.server.model if llm.server else None,
            "n_threads": llm.n_threads or default_threads(),
            "n_ctx": llm.n_ctx,
            "max_output_tokens": llm.max_output_tokens,
            "startup_s": llm.server.startup_s if llm.server else None,
            "grammar": True,
        }

    print("scoring (offline scorer) ...", flush=True)
    # Feature-major, as `explain_features` returns them: `score_features` groups by feature
    # and `annotate_scores` pairs its rows with the explanations in that order.
    explanations.sort(key=lambda e: features.index(e.feature))
    scores = score_features(loaded, explanations, OfflineScorer, args.seed)
    scores = annotate_scores(
        scores, explanations, selection, {r["feature"]: r for r in stats}, loaded.catalog, 0.9
    )
    for s, e in zip(scores, explanations, strict=True):
        s["arm"] = arm_of(e)
        s["names_concept"] = None if s["names_concept"] is None else float(s["names_concept"])
    arms = summarize(scores, explanations, loaded.catalog)
    rows = comparisons(scores, args.seed)
    throughput_rows: list[dict] = []
    if not (args.quick or args.skip_throughput):
        ctx, data = loaded.context(features[0], args.seed)
        try:
            threads = [int(t) for t in args.throughput_threads.split(",")]
            throughput_rows = throughput(ctx, threads, work)
        finally:
            data.close()

    result = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "command": " ".join(["benchmarks/explainers_llm.py", *(argv or sys.argv[1:])]),
        "store": str(paths.root),
        "partition": args.partition,
        "features": features,
        "selection": {str(f): s for f, s in selection.items()},
        "selection_counts": dict(Counter(selection.values())),
        "limits": asdict(limits),
        "scorer": OfflineScorer.name,
        "server": server,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "arms": arms,
        "comparisons": [c.as_dict() for c in rows],
        "per_feature": [
            {
                k: s.get(k)
                for k in (
                    "arm",
                    "feature",
                    "selection",
                    "label",
                    *COMPARED,
                    "llm_calls",
                    "llm_tokens",
                    "seconds",
                    "best_concept",
                    "concept_auc",
                )
            }  # fmt: skip
            | {"description": e.description, "stopped_by": e.stopped_by}
            for s, e in zip(scores, explanations, strict=True)
        ],
        "throughput": throughput_rows,
        "seconds_explaining": sum(e.seconds for e in explanations),
        "seconds_total": time.perf_counter() - started,
        "resumed": args.resume,
        "explained_at_commits": arm_commits(work),
    }
    out = args.out or RESULTS / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, out)
    md = out.with_suffix(".md")
    with atomic_path(md) as tmp:
        tmp.write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
