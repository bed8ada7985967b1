"""The `recsae` command: materialize the pipeline, query its artifacts, and get steered
recommendations from a terminal."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsae_pipeline.storage.registry import ArtifactPaths, default_data_dir, parse_partition_key
from recsae_pipeline.storage.remote import local_root
from recsae_pipeline.storage.warehouse import query

if TYPE_CHECKING:  # serve imports torch: only `recsae recommend` pays for it
    from recsae_pipeline.defs.plan import PlanStep, StepOutcome
    from recsae_pipeline.serve.recommend import Steer


def _format_table(columns: list[str], rows: list[tuple], max_width: int = 48) -> str:
    def cell(value: object) -> str:
        text = "NULL" if value is None else str(value)
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    body = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    line = "-+-".join("-" * w for w in widths)
    out = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), line]
    out += [
        " | ".join(
            v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths, strict=True)
        )
        for r in body
    ]
    return "\n".join(out)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _artifact_paths(data_dir: str) -> ArtifactPaths:
    """`--data-dir` used in place, or for a remote fsspec URL its local cache, pulled first."""
    local = local_root(data_dir)
    if local is not None:
        return ArtifactPaths(local.resolve())
    from recsae_pipeline.defs.resources import StorageRoot

    storage = StorageRoot(path=data_dir)
    try:
        storage.pull()
    except ValueError as err:  # an unknown protocol or a missing filesystem package
        raise SystemExit(f"recsae: {err}") from err
    return storage.paths


def cmd_sql(args: argparse.Namespace) -> int:
    db = Path(args.db) if args.db else _artifact_paths(args.data_dir).duckdb
    try:
        rel = query(db, args.query)
    except (FileNotFoundError, PermissionError) as err:
        print(f"recsae sql: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # DuckDB parse/bind errors: show them as the user's mistake
        print(f"recsae sql: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    if rel is None:
        return 0
    columns = list(rel.columns)
    rows = rel.limit(args.max_rows + 1).fetchall()
    truncated = len(rows) > args.max_rows
    rows = rows[: args.max_rows]
    if args.format == "csv":
        # Unix line ends, not csv's CRLF default, so `... | tail -1` yields a clean value.
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    elif args.format == "json":
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str, indent=1))
    else:
        print(_format_table(columns, rows))
        print(
            f"({len(rows)} row{'s' if len(rows) != 1 else ''}{', more not shown: raise --max-rows' if truncated else ''})"
        )
    if truncated and args.format != "table":  # on stderr, so the piped data stays clean
        print(f"recsae sql: only the first {args.max_rows} rows; raise --max-rows", file=sys.stderr)
    return 0


RUN_CONFIG_SECTIONS = ("ops", "resources", "execution", "loggers")


def job_run_configs(run_config: dict[str, Any], job_names: list[str]) -> dict[str, dict]:
    """The run config each job gets (its own `ops`, everything else as given), checked against
    the jobs' config schemas first: an unknown section, op or key is a ValueError naming it."""
    import dagster as dg

    from recsae_pipeline.defs.definitions import defs

    unknown = sorted(set(run_config) - set(RUN_CONFIG_SECTIONS))
    if unknown:
        raise ValueError(
            f"unknown top-level key {', '.join(map(repr, unknown))}; a run config has "
            f"{', '.join(RUN_CONFIG_SECTIONS)}"
        )
    jobs = {name: defs.resolve_job_def(name) for name in job_names}
    nodes = {name: {n.name: n for n in job.graph.node_defs} for name, job in jobs.items()}
    ops = run_config.get("ops") or {}
    if not isinstance(ops, dict):
        raise ValueError(
            "`ops` must map op names to {config: {...}}, e.g. ops: {sae: {config: {k: 16}}}"
        )
    # Check ops and assets without a Config class accept any config (Dagster types it `Any`),
    # so naming one is a mistake the schema would let through.
    configurable = sorted(
        {
            name
            for job_nodes in nodes.values()
            for name, node in job_nodes.items()
            if node.config_field is not None and node.config_field.config_type.kind.name != "ANY"
        }
    )
    wrong = sorted(set(ops) - set(configurable))
    if wrong:
        all_nodes = set().union(*(set(n) for n in nodes.values()))
        named = [
            f"{op!r} ({'takes no config' if op in all_nodes else 'no such op'})" for op in wrong
        ]
        raise ValueError(
            f"under `ops`: {', '.join(named)}; the jobs ({', '.join(job_names)}) take "
            f"config for: {', '.join(configurable)}"
        )
    configs = {}
    for name, job in jobs.items():
        config = {**run_config, "ops": {k: v for k, v in ops.items() if k in nodes[name]}}
        try:
            dg.validate_run_config(job, config)
        except dg.DagsterInvalidConfigError as err:
            reasons = "; ".join(e.message for e in err.errors) or str(err)
            raise ValueError(f"invalid run config for the {name} job: {reasons}") from err
        configs[name] = config
    return configs


def materialize_plan(features: bool = True) -> list[tuple[str, str | None]]:
    """The (job, partition) runs of `recsae materialize --workers 1`, in order: `main`, then
    (with `features`) each partition's jobs, then `report`."""
    from recsae_pipeline.defs.plan import sequential_plan

    return [(step.job, step.partition) for step in sequential_plan(features)]


def materialize_runs(
    run_config: dict[str, Any],
    instance: Any,
    *,
    features: bool = True,
    force: bool = False,
) -> Iterator[tuple[str, Any]]:
    """Run `materialize_plan(features)` in this process, yielding (label,
    ExecuteInProcessResult) after each run; the caller stops iterating to stop. Each job gets
    the `ops` of `run_config` that it has; the whole config is validated (`job_run_configs`)
    before this returns, so nothing runs on a typo."""
    return _run_plan(materialize_plan(features), _plan_configs(run_config), instance, force)


def _plan_configs(run_config: dict[str, Any]) -> dict[str, dict]:
    # Validated against every job a preset can address, so `--skip-features` takes the same
    # preset as a full run; each job then gets only its own ops.
    every_job = list(dict.fromkeys(job for job, _ in materialize_plan(features=True)))
    return job_run_configs(run_config, every_job)


def _run_plan(
    plan: list[tuple[str, str | None]], configs: dict[str, dict], instance: Any, force: bool
) -> Iterator[tuple[str, Any]]:
    from recsae_pipeline.defs.plan import PlanStep, execute_step

    for job_name, partition in plan:
        step = PlanStep(job_name, partition)
        print(f"recsae materialize: {step.label} ...", flush=True)
        yield step.label, execute_step(step, configs[job_name], instance, force)


def _workers(text: str) -> int:
    from recsae_pipeline.defs.plan import available_cores

    if text == "auto":
        return max(1, min(available_cores(), 4))
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: use a count >= 1 or `auto`")
    return workers


def cmd_materialize(args: argparse.Namespace) -> int:
    """Run the `main` job, then the partition jobs and `report` (in parallel with --workers)."""
    import yaml

    from recsae_pipeline.defs.plan import run_parallel, start_workers

    if not os.environ.get("DAGSTER_HOME"):
        print(
            "recsae materialize: DAGSTER_HOME is unset, so runs are not kept for `dagster dev`.",
            file=sys.stderr,
        )
    run_config = (yaml.safe_load(Path(args.config).read_text()) if args.config else None) or {}
    features = not args.skip_features
    if args.workers == 1:
        return _materialize_in_process(args, run_config, features)
    # The workers import the definitions as they start; the plan and the checked configs come
    # from the first one ready, so this process never imports them (about 10 s less to wait).
    with start_workers(args.workers) as pool:
        try:
            plan, configs = pool.submit(_parallel_plan_and_configs, run_config, features).result()
        except ValueError as err:
            print(f"recsae materialize: {args.config or 'run config'}: {err}", file=sys.stderr)
            return 2
        return _report_outcomes(run_parallel(plan, configs, args.workers, args.force, pool=pool))


def _parallel_plan_and_configs(
    run_config: dict[str, Any], features: bool
) -> tuple[list[PlanStep], dict[str, dict]]:
    from recsae_pipeline.defs.plan import parallel_plan

    return parallel_plan(features), _plan_configs(run_config)


def _materialize_in_process(
    args: argparse.Namespace, run_config: dict[str, Any], features: bool
) -> int:
    import dagster as dg

    from recsae_pipeline.defs.plan import outcome

    try:
        configs = _plan_configs(run_config)
    except ValueError as err:
        print(f"recsae materialize: {args.config or 'run config'}: {err}", file=sys.stderr)
        return 2
    instance = (
        dg.DagsterInstance.get()
        if os.environ.get("DAGSTER_HOME")
        else dg.DagsterInstance.ephemeral()
    )
    runs = _run_plan(materialize_plan(features), configs, instance, args.force)
    return _report_outcomes(outcome(label, result, 0.0) for label, result in runs)


def _report_outcomes(outcomes: Iterator[StepOutcome]) -> int:
    """Print each step's outcome as it ends; 1 at the first failed step, else 0."""
    for result in outcomes:
        label = result.label
        if result.reused:
            print(
                f"recsae materialize: {label}: unchanged, reused: {', '.join(result.reused)} "
                "(--force recomputes)",
                flush=True,
            )
        for warning in result.warnings:
            print(f"recsae materialize: warning: {label} {warning}", file=sys.stderr)
        if not result.success:
            reason = result.error or f"run {result.run_id}"
            print(
                f"recsae materialize: {label} failed ({reason}); failed checks: "
                f"{result.failed_checks or 'none'}",
                file=sys.stderr,
            )
            return 1
        if result.seconds:
            print(f"recsae materialize: {label} done in {result.seconds:.1f} s", flush=True)
    print("recsae materialize: done")
    return 0


def _steer_spec(text: str) -> Steer:
    """`FEATURE=ALPHA` (hidden-state units) or `FEATURE=ALPHAx` (x the feature's max activation)."""
    from recsae_pipeline.serve.recommend import Steer

    feature, sep, alpha = text.partition("=")
    relative = alpha.strip().lower().endswith("x")
    try:
        if not sep:
            raise ValueError
        return Steer(int(feature), float(alpha.strip()[:-1] if relative else alpha), relative)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write FEATURE=ALPHA, e.g. 123=4.0 (alpha in hidden-state units), or "
            "FEATURE=SCALEx, e.g. 123=2x (2 x the feature's max activation, the scale "
            "`steering_eval` sweeps and `steering_summary.best_alpha_scale` reports)"
        ) from None


def _describe_steer(spec: Steer, alpha: float, max_activation: float | None) -> str:
    scale = "" if max_activation is None else f" (max activation {max_activation:.3g})"
    if spec.relative:
        return (
            f"steering feature {spec.feature}: alpha {alpha:.4g} = {spec.alpha:g}x its max "
            f"activation {max_activation:.3g} (relative, from {spec.feature}={spec.alpha:g}x)"
        )
    return (
        f"steering feature {spec.feature}: alpha {alpha:.4g} in hidden-state units{scale} "
        f"(absolute; write {spec.feature}={spec.alpha:g}x for a multiple of the max activation)"
    )


def cmd_recommend(args: argparse.Namespace) -> int:
    from recsae_pipeline.distributed.ddp import resolve_device
    from recsae_pipeline.serve.recommend import absolute_alphas, format_recommendations, recommend

    paths = _artifact_paths(args.data_dir)
    try:
        steer = absolute_alphas(paths, args.sae, args.steer)
        for spec, (_, alpha, info) in zip(args.steer, steer, strict=True):
            print(_describe_steer(spec, alpha, info.max_activation))
        result = recommend(
            paths,
            args.user,
            sae_key=args.sae,
            steer=[(feature, alpha) for feature, alpha, _ in steer],
            clamp=args.clamp,
            k=args.k,
            device=resolve_device(args.device),
        )
    except (FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) else str(err)
        print(f"recsae recommend: {message}", file=sys.stderr)
        return 2
    print(format_recommendations(result, steered=bool(args.steer or args.clamp)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild reports/results.json and results.md from the artifacts (the `results` asset's
    work, without Dagster) and print the markdown."""
    from recsae_pipeline.report.results import build_results, write_results

    paths = _artifact_paths(args.data_dir)
    partitions = [parse_partition_key(k) for k in args.partition] if args.partition else None
    if partitions is None:
        from recsae_pipeline.defs.partitions import feature_partitions

        partitions = [parse_partition_key(k) for k in feature_partitions.get_partition_keys()]
    if not paths.recommender_eval.exists() and not any(
        paths.partition(m, layer).dir("sae").exists() for m, layer in partitions
    ):
        print(
            f"recsae report: nothing to report under {paths.root}: run `recsae materialize` "
            "first (or pass --data-dir)",
            file=sys.stderr,
        )
        return 2
    built = build_results(paths, partitions, args.resamples, args.seed)
    written = write_results(paths, built, resamples=args.resamples, seed=args.seed)
    print(written.markdown.read_text(), end="")
    print(f"recsae report: wrote {written.json} and {written.markdown}", file=sys.stderr)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Run SAGE (and the baseline) on one feature, print the transcript summary and scores."""
    from recsae_pipeline.defs.resources import LLM
    from recsae_pipeline.distributed.ddp import resolve_device
    from recsae_pipeline.interp.explain import LoadedPartition, explain_features, score_features

    paths = _artifact_paths(args.data_dir)
    try:
        model_name, layer = parse_partition_key(args.sae)
        llm = LLM(backend=args.backend, base_url=args.base_url, model=args.model)
        policy, scorer = llm.policy_factory(), llm.scorer_factory()
        transcripts = paths.partition(model_name, layer).cli_transcripts
        methods = ("baseline", "sage") if args.method == "both" else (args.method,)
        loaded = LoadedPartition(paths, model_name, layer, resolve_device(args.device))
        explained = explain_features(loaded, [args.feature], policy, transcripts, methods=methods)
        scores = score_features(loaded, explained, scorer)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"recsae explain: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # dagster.Failure from the LLM resource: a configuration problem
        if type(err).__name__ != "Failure":
            raise
        print(f"recsae explain: {err}", file=sys.stderr)
        return 2
    for e, s in zip(explained, scores, strict=True):
        print(f"== feature {e.feature}, {e.method} ({e.backend})")
        for h in e.hypotheses:
            sep = h["last_separation"]
            tail = "" if sep is None else f", last test: separation AUC {sep:.2f}"
            print(
                f"  H{h['id']} [{h['kind']}] {h['status'].upper()}: {h['text']} ({h['tests']} tests{tail})"
            )
        print(f"  label: {e.label}")
        print(f"  description: {e.description}")
        print(
            f"  experiments {e.experiments}, sequences run {e.sequences_run}, LLM calls "
            f"{e.usage.get('calls', 0)}, tokens {e.usage.get('prompt_tokens', 0) + e.usage.get('completion_tokens', 0)}, "
            f"{e.seconds:.1f} s; stopped by: {e.stopped_by}"
        )
        r = s["predictive_r"]
        print(
            f"  scores: generative {s['generative_accuracy']:.2f} from the label "
            f"({s['generative_accuracy_description']:.2f} from the description), predictive r "
            f"{'nan' if r != r else f'{r:.3f}'}, detection AUC {s['detection_auc']:.3f}"
        )
        if e.transcript:
            print(f"  transcript: {e.transcript}")
    return 0


def cmd_export_sae(args: argparse.Namespace) -> int:
    """Write one trained SAE in SAELens's or sparsify's layout, its whitening folded in
    (`recsae_pipeline.sae.export`), and print where."""
    from recsae_pipeline.sae.export import export_saelens, export_sparsify, saelens_hook_name
    from recsae_pipeline.sae.model import TopKSae

    paths = _artifact_paths(args.data_dir)
    try:
        model_name, layer = parse_partition_key(args.sae)
        sae_dir = paths.partition(model_name, layer).sae
        sae = TopKSae.load(sae_dir).eval()
        meta = {"model": model_name, "layer": layer, "source": str(sae_dir)}
        if args.format == "saelens":
            hook = saelens_hook_name(model_name, layer)
            written = export_saelens(sae, Path(args.out), hook, **meta)
        else:
            written = export_sparsify(sae, Path(args.out), f"layers.{layer}", **meta)
    except (FileNotFoundError, ValueError) as err:
        print(f"recsae export-sae: {err}", file=sys.stderr)
        return 2
    print(written)
    return 0


def cmd_llm_serve(args: argparse.Namespace) -> int:
    """llama.cpp's server over a GGUF file in the foreground, for other tools: prints its
    base_url and model, stops on Ctrl-C or SIGTERM."""
    import signal

    from recsae_pipeline.interp.local_server import LocalServer, LocalServerError, ServerConfig

    values = {
        "gguf": args.gguf, "n_threads": args.n_threads, "n_ctx": args.n_ctx,
        "port": args.port, "log_dir": args.log_dir,
    }  # fmt: skip
    config = ServerConfig(**{k: v for k, v in values.items() if v is not None})
    server = LocalServer(config)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # through `finally`: stop the server
    try:
        server.start()
        print(server.base_url, flush=True)
        print(
            f"recsae llm serve: model {server.model} ({server.gguf}), {config.threads} threads, "
            f"log {server.log_path}; any API key works (e.g. OPENAI_API_KEY=EMPTY). Ctrl-C stops it.",
            file=sys.stderr,
        )
        code = server.wait()
        print(
            f"recsae llm serve: the server exited with code {code}:\n{server.log_tail()}",
            file=sys.stderr,
        )
        return 1
    except LocalServerError as err:
        print(f"recsae llm serve: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsae", description=__doc__)
    parser.add_argument(
        "--data-dir",
        default=default_data_dir(),
        help="storage root, a directory or an fsspec URL pulled into its cache "
        "(default: $RECSAE_DATA_DIR or data/)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sql = sub.add_parser("sql", help="run a read-only SQL query over the artifacts' DuckDB views")
    sql.add_argument("query", help='e.g. "SELECT count(*) FROM interactions"')
    sql.add_argument("--db", help="DuckDB file (default: <data-dir>/recsae.duckdb)")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument("--max-rows", type=int, default=50)
    sql.set_defaults(func=cmd_sql)
    run = sub.add_parser(
        "materialize", help="materialize every asset (main job, then each feature partition)"
    )
    run.add_argument(
        "-c", "--config", help="run-config YAML (the `ops:` section of `dagster job execute -c`)"
    )
    run.add_argument(
        "--skip-features", action="store_true", help="only the unpartitioned `main` job"
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="recompute assets whose inputs, config and code are unchanged (tag recsae/force)",
    )
    run.add_argument(
        "--workers",
        type=_workers,
        default="auto",
        help="processes running independent steps side by side, each with cores / workers "
        "torch threads (auto: one per core, at most 4; 1: the jobs one after another)",
    )
    run.set_defaults(func=cmd_materialize)
    rec = sub.add_parser(
        "recommend", help="a user's top 10 with titles, before and after steering SAE features"
    )
    rec.add_argument("--user", required=True, help="raw user id (as in the interaction log)")
    rec.add_argument(
        "--steer",
        type=_steer_spec,
        action="append",
        default=[],
        metavar="FEATURE=ALPHA[x]",
        help="add ALPHA x the feature's decoder direction at the SAE's layer; ALPHAx: ALPHA "
        "times the feature's max activation, as steering_eval sweeps (repeatable)",
    )
    rec.add_argument(
        "--clamp", type=int, action="append", default=[], metavar="FEATURE",
        help="switch a feature off (clamp its activation to 0; repeatable)",
    )  # fmt: skip
    rec.add_argument("--sae", default="sasrec.layer2", help="SAE partition <model>.layer<l>")
    rec.add_argument("-k", type=int, default=10, help="list length")
    rec.add_argument("--device", default="auto", help="auto | cpu | cuda[:n]")
    rec.set_defaults(func=cmd_recommend)
    rep = sub.add_parser(
        "report", help="rebuild reports/results.{json,md}: every comparison with its 95%% CI"
    )
    rep.add_argument(
        "--partition", action="append", metavar="MODEL.layerL",
        help="only these feature partitions (repeatable; default: all)",
    )  # fmt: skip
    rep.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per CI")
    rep.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    rep.set_defaults(func=cmd_report)
    exp = sub.add_parser("explain", help="explain one SAE feature with SAGE and the baseline")
    exp.add_argument("feature", type=int)
    exp.add_argument("--sae", default="sasrec.layer2", help="SAE partition <model>.layer<l>")
    exp.add_argument("--method", choices=["sage", "baseline", "both"], default="both")
    exp.add_argument("--backend", choices=["auto", "offline", "openai"], default="auto")
    exp.add_argument("--base-url", help="OpenAI-compatible endpoint (key in $OPENAI_API_KEY)")
    exp.add_argument("--model", help="model name at that endpoint")
    exp.add_argument("--device", default="auto", help="auto | cpu | cuda[:n]")
    exp.set_defaults(func=cmd_explain)
    ex = sub.add_parser(
        "export-sae", help="write a trained SAE for SAELens (SAE.load_from_disk) or sparsify"
    )
    ex.add_argument("--sae", default="sasrec.layer2", help="SAE partition <model>.layer<l>")
    ex.add_argument("--format", choices=["saelens", "sparsify"], default="saelens")
    ex.add_argument(
        "--out",
        required=True,
        help="folder to write (replaced whole); sparsify: the parent of its layers.<l> folder",
    )
    ex.set_defaults(func=cmd_export_sae)
    llm = sub.add_parser("llm", help="the local language model (the `local-llm` extra)")
    llm_sub = llm.add_subparsers(dest="llm_command", required=True)
    serve = llm_sub.add_parser(
        "serve",
        help="run llama.cpp's OpenAI-compatible server in the foreground; prints its base_url",
    )
    serve.add_argument(
        "--gguf", help="a .gguf path, a .whl carrying one, or wheel:<dist> (default: SmolLM2-135M)"
    )
    serve.add_argument("--n-threads", type=int, help="generation threads (default: half the cores)")
    serve.add_argument("--n-ctx", type=int, help="context length in tokens (default 8192)")
    serve.add_argument("--port", type=int, help="loopback port (default: a free one)")
    serve.add_argument("--log-dir", help="folder of the server log (default: <tempdir>/recsae-llm)")
    serve.set_defaults(func=cmd_llm_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # `recsae sql ... | head`: the reader left. Stop quietly, as Unix tools do, and keep
        # Python's flush at exit from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
