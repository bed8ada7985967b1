"""SAE sweep: TopK over k x expansion x whitening, plus BatchTopK and L1 ReLU SAEs, on the
activation partitions of a materialized store; a Pareto plot of reconstruction against
interpretability.

Every configuration trains with `train_sae` on the partition's non-held-out users (the
pipeline's held-out users: user_idx % 10 == 0 by default) for the same `--rows-seen`, and is
scored with the pipeline's own figures: held-out FVU, L0 and dead fraction (`evaluate_sae`),
test NDCG@10 with the reconstruction spliced in at its layer (`splice_quality`) against the
model as trained, with the paired 95% CI over users of spliced minus original
(`report.stats.compare`), and train seconds. When `recsae_pipeline.sae.interpretability`
offers `sweep_measures`, its SAE-side figures (medians over targets of the k-sparse probe
AUC, the best feature's AUC, ...) join every row under `measures`, and its neuron and random
rotation figures (the same for every SAE of a partition) go to the partition's
`baseline_measures`; the plot's y axis is then `--y-measure` (default the median 1-sparse
probe AUC over attribute targets) with the neurons' value as a dashed line, otherwise
spliced / original NDCG@10.

    .venv/bin/recsae materialize -c configs/default.yaml          # the store, once
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/sae_sweep.py --data-dir DIR --resume
    .venv/bin/python benchmarks/sae_sweep.py --data-dir DIR --quick  # smoke run, ~1 minute

The results file is rewritten (atomically) after every configuration, so `--resume` picks a
killed sweep up where it stopped: configurations already in `--out` at the same rows_seen
are skipped; `seconds_total` adds up the wall time of every run that wrote the file,
`seconds_configs` the seconds of its rows. Results: benchmarks/results/sae_sweep.json and
.png (--quick: sae_sweep_quick.*; --plot-only draws the plot again from the JSON).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pyarrow.parquet as pq
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from recsae_pipeline.activations.shards import partition_rows
from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.defs.config import domain_default
from recsae_pipeline.models.artifacts import load_recommender
from recsae_pipeline.report.plots import new_figure, save_figure
from recsae_pipeline.report.stats import compare
from recsae_pipeline.sae.evaluation import splice_quality
from recsae_pipeline.sae.model import SaeConfig, TopKSae
from recsae_pipeline.sae.training import SaeTrainConfig, train_sae
from recsae_pipeline.storage.atomic import write_json
from recsae_pipeline.storage.registry import SHARD_GLOB, ArtifactPaths, parse_partition_key

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
FORMAT_VERSION = 1
HELDOUT_USERS_MODULO: int = domain_default(train_sae, "heldout_users_modulo")
DEFAULT_ROWS_SEEN = 200_000
"""Training rows per configuration (~2 passes over a default-store partition), so that the 37
configurations on two partitions take ~26 minutes on the 2-core machine of
benchmarks/results/sae_sweep.json at one torch thread. Measured there on configs/default.yaml's
sasrec.layer2 (64-d): TopK k=32 x32 trains in 9.7 s (5.8 s on configs/small.yaml's 32-d
sasrec.layer2), BatchTopK k=32 x32 in 31 s, the L1 SAE x32 in 21 s; evaluation, splicing
and the measures add ~15 s per configuration."""
QUICK_ROWS_SEEN = 8192

TOPK_KS = (4, 8, 16, 32)
EXPANSIONS = (4, 8, 16, 32)
WHITENING = (0.1, None)
BATCH_TOPK = ((8, 32), (32, 32))
"""(k, expansion) of the BatchTopK rows (whitening 0.1)."""
L1_COEFFICIENTS = (0.01, 0.03, 0.1)
"""The L1 ReLU SAE's coefficients (expansion 32, whitening 0.1). On the small store's
sasrec.layer1 after 400k rows: 0.005 -> held-out L0 340 at FVU 0.015, 0.02 -> 212 at 0.087,
0.05 -> 107 at 0.23 (L0 still falling: an L1 SAE needs far more steps than TopK)."""

COLOUR_MAX_L0 = 256
FRONT_COLOUR = "#c44e52"

INTERPRETABILITY_MODULE = "recsae_pipeline.sae.interpretability"
SWEEP_MEASURES = "sweep_measures"
"""Hook: `sweep_measures(sae, paths, model, layer, device, max_sample_rows=...) -> dict[str,
float]` of that module, called once it exists (`<kind>_<measure>_<family>` figures)."""
BASELINE_KINDS = ("neurons_", "rotation_")
"""Prefixes of the figures that do not depend on the SAE: kept once per partition."""
DEFAULT_Y_MEASURE = "sae_probe_auc_k1_attribute"
DEFAULT_MEASURE_ROWS = 20_000
"""Rows (of whole users) the measures sample per SAE: ~7-16 s per x32 SAE on the default
store's 64-d states here, against ~80 s for all of its ~100k rows."""


@dataclass(frozen=True)
class SweepConfig:
    """One configuration of the sweep; `name` is its key in the results (for --resume)."""

    family: str
    """topk, batch_topk or relu_l1 (`SaeConfig.kind`)."""
    k: int | None
    expansion: int
    whitening_shrinkage: float | None
    l1_coefficient: float | None = None

    @property
    def name(self) -> str:
        sparsity = f"l1={self.l1_coefficient:g}" if self.k is None else f"k={self.k}"
        white = "off" if self.whitening_shrinkage is None else f"{self.whitening_shrinkage:g}"
        return f"{self.family} {sparsity} x{self.expansion} whitening={white}"

    def sae_config(self, d_in: int) -> SaeConfig:
        return SaeConfig(
            d_in=d_in,
            expansion=self.expansion,
            k=self.k if self.k is not None else domain_default(SaeConfig, "k"),  # ignored
            batch_topk=self.family == "batch_topk",
            whitening_shrinkage=self.whitening_shrinkage,
            l1_coefficient=self.l1_coefficient,
        )


def grid(quick: bool = False) -> list[SweepConfig]:
    """TopK k x expansion x whitening on/off, then BatchTopK and L1 rows; --quick: 6."""
    if quick:
        topk = [SweepConfig("topk", k, 4, w) for k in (4, 16) for w in WHITENING]
        return [
            *topk,
            SweepConfig("batch_topk", 4, 4, 0.1),
            SweepConfig("relu_l1", None, 4, 0.1, L1_COEFFICIENTS[1]),
        ]
    return [
        *(
            SweepConfig("topk", k, expansion, w)
            for expansion in EXPANSIONS
            for k in TOPK_KS
            for w in WHITENING
        ),
        *(SweepConfig("batch_topk", k, expansion, 0.1) for k, expansion in BATCH_TOPK),
        *(SweepConfig("relu_l1", None, 32, 0.1, c) for c in L1_COEFFICIENTS),
    ]


def interpretability_hook(name: str) -> Callable[..., dict[str, float]] | None:
    """`name` from `INTERPRETABILITY_MODULE` when that module offers it, else None (the sweep
    then records no measures)."""
    try:
        module = importlib.import_module(INTERPRETABILITY_MODULE)
    except ModuleNotFoundError as err:
        if err.name != INTERPRETABILITY_MODULE:
            raise
        return None
    return getattr(module, name, None)


def activation_width(partition: Path, key: str) -> int:
    shards = sorted(partition.glob(SHARD_GLOB))
    if not shards:
        raise SystemExit(
            f"{partition} holds no {SHARD_GLOB}: partition {key} is not materialized in "
            f"--data-dir; `ls {partition.parent.parent}` shows what is, or run `recsae "
            "materialize` first"
        )
    return pq.read_schema(shards[0]).field("activation").type.list_size


def git_state() -> dict[str, Any]:
    """The commit, and the files of the code the sweep runs that differ from it."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip()

    dirty = git("status", "--porcelain", "--", "recsae_pipeline", "benchmarks/sae_sweep.py")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_code": dirty.splitlines()}


def sae_path(sae_dir: Path, key: str, config: SweepConfig) -> Path:
    """Where --sae-dir keeps one trained SAE (TopKSae.save's directory)."""
    return sae_dir / key / config.name.replace(" ", "_")


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (fvu, y) points no other point beats: lower-or-equal FVU and higher-or-equal y,
    strictly better in one. Points with a non-finite coordinate are never on it."""
    finite = [math.isfinite(f) and math.isfinite(y) for f, y in points]
    front = []
    for i, (f, y) in enumerate(points):
        beaten = any(
            finite[j] and g <= f and z >= y and (g < f or z > y)
            for j, (g, z) in enumerate(points)
            if j != i
        )
        front.append(finite[i] and not beaten)
    return front


def y_measure(rows: list[dict], preferred: str = DEFAULT_Y_MEASURE) -> tuple[str, str]:
    """(row key, axis label) of the plot's y: measure `preferred` once rows have it, else
    spliced / original NDCG@10."""
    if not any(preferred in (row.get("measures") or {}) for row in rows):
        return "ndcg@10_ratio", "spliced / original NDCG@10"
    probe = re.fullmatch(r"sae_probe_auc_k(\d+)_(\w+)", preferred)
    if probe is None:
        return f"measures.{preferred}", preferred
    k, family = probe.groups()
    return f"measures.{preferred}", f"median {k}-sparse probe AUC ({family} targets)"


def value(row: dict, key: str) -> float:
    """`row[key]`, or `row["measures"][name]` for key `measures.<name>`; NaN when absent."""
    if key.startswith("measures."):
        got = (row.get("measures") or {}).get(key.removeprefix("measures."))
    else:
        got = row.get(key)
    return float(got) if isinstance(got, int | float) else math.nan


def mark_fronts(report: dict) -> None:
    """Set each row's `pareto` (per partition, held-out FVU vs the plot's y) and the
    report's `front`: the front's configurations per partition, lowest FVU first."""
    key, label = y_measure(report["rows"], report["y_measure"])
    report["pareto_axes"] = {"x": "heldout_fvu (lower is better)", "y": f"{key} ({label})"}
    report["front"] = {}
    for partition in report["partitions"]:
        rows = [r for r in report["rows"] if r["partition"] == partition]
        flags = pareto_front([(value(r, "heldout_fvu"), value(r, key)) for r in rows])
        for row, flag in zip(rows, flags, strict=True):
            row["pareto"] = flag
        front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["heldout_fvu"])
        report["front"][partition] = [
            {
                "config": r["config"],
                "heldout_fvu": r["heldout_fvu"],
                "l0": r["l0"],
                key: value(r, key),
            }
            for r in front
        ]


def run_config(
    config: SweepConfig,
    key: str,
    paths: ArtifactPaths,
    d_in: int,
    context: dict[str, Any],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Train one configuration on one partition and measure it; the row for the results."""
    model_name, layer = parse_partition_key(key)
    started = time.perf_counter()
    sae_config = config.sae_config(d_in)
    train_config = SaeTrainConfig(
        batch_size=args.batch_size, rows_seen=args.rows_seen, seed=args.seed
    )
    result = train_sae(
        paths.partition(model_name, layer).activations,
        train_config,
        sae_config,
        device,
        heldout_users_modulo=args.heldout_users_modulo,
    )
    sae = result.sae.eval()
    quality = splice_quality(context["model"], layer, sae, context["sequences"], device)
    users = quality.per_user
    ci = compare(
        f"{key} {config.name}: spliced - original",
        "ndcg@10",
        "spliced",
        users["spliced"],
        "original",
        users["original"],
        unit="users",
        seed=args.seed,
    )
    measured = time.perf_counter()
    measures, error = measure(sae, paths, key, args, device, context["baselines"])
    measure_seconds = time.perf_counter() - measured
    if args.sae_dir is not None:
        sae.save(sae_path(args.sae_dir, key, config))
    heldout = result.heldout
    return {
        "partition": key,
        "config": config.name,
        **asdict(config),
        "n_latents": sae_config.n_latents,
        "heldout_fvu": heldout["fvu"],
        "l0": heldout["l0"],
        "dead_fraction": heldout["dead_fraction"],
        "heldout_rows": heldout["rows"],
        "ndcg@10_original": quality.original,
        "ndcg@10_spliced": quality.spliced,
        "ndcg@10_zero_ablated": quality.zero_ablated,
        "ndcg@10_ratio": quality.spliced / quality.original if quality.original else math.nan,
        "fraction_recovered": quality.fraction_recovered,
        "spliced_minus_original": {
            "difference": ci.difference,
            "ci95": list(ci.ci95),
            "n": ci.n,
            "unit": ci.unit,
            "method": ci.method,
            "verdict": ci.verdict,
        },
        "measures": measures,
        "measures_error": error,
        "rows_seen": result.rows_seen,
        "steps": result.steps,
        "epochs": result.epochs,
        "lr": result.lr,
        "train_seconds": result.seconds,
        "rows_per_second": result.rows_per_second,
        "measure_seconds": measure_seconds,
        "seconds": time.perf_counter() - started,
        "final_training_fvu": result.curve[-1].fvu,
        "load_average_before": context["load_average"],
    }


def measure(
    sae: TopKSae,
    paths: ArtifactPaths,
    key: str,
    args: argparse.Namespace,
    device: torch.device,
    baselines: dict[str, float],
) -> tuple[dict[str, float] | None, str | None]:
    """(SAE-side figures of `sweep_measures`, None) once it exists, else (None, None); its
    neuron and rotation figures are put into `baselines`. A failure of the measures is
    recorded as (None, the error) so the sweep's other figures still count."""
    hook = interpretability_hook(SWEEP_MEASURES)
    if hook is None:
        return None, None
    model_name, layer = parse_partition_key(key)
    extra = {}
    if "max_sample_rows" in inspect.signature(hook).parameters:
        extra["max_sample_rows"] = args.measure_rows
    try:
        figures = hook(sae, paths, model_name, layer, device, **extra)
    except Exception as err:  # the module is young: keep the sweep going, say what failed
        message = f"{type(err).__name__}: {err}"
        print(f"  {SWEEP_MEASURES} failed on {key}: {message}", flush=True)
        return None, message
    baselines.update({k: v for k, v in figures.items() if k.startswith(BASELINE_KINDS)})
    return {k: v for k, v in figures.items() if not k.startswith(BASELINE_KINDS)}, None


def progress_line(row: dict, y: str, baselines: dict[str, float]) -> str:
    """One configuration's figures for the console."""
    ci = row["spliced_minus_original"]["ci95"]
    line = (
        f"FVU {row['heldout_fvu']:.4f}, L0 {row['l0']:.1f}, dead {row['dead_fraction']:.1%}, "
        f"NDCG@10 spliced/original {row['ndcg@10_ratio']:.3f} (difference CI "
        f"[{ci[0]:+.4f}, {ci[1]:+.4f}])"
    )
    if isinstance(got := (row["measures"] or {}).get(y), int | float):
        neurons = baselines.get("neurons_" + y.removeprefix("sae_"))
        line += f", {y} {got:.3f}" + (f" (neurons {neurons:.3f})" if neurons is not None else "")
    if row.get("measures_error"):
        line += ", measures failed"
    return (
        f"{line}; train {row['train_seconds']:.1f}s, measures {row['measure_seconds']:.1f}s, "
        f"total {row['seconds']:.1f}s"
    )


def load_previous(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """An earlier run of this sweep with the same settings, whose rows --resume keeps."""
    if not args.resume or not out.exists():
        return {}
    previous = json.loads(out.read_text())
    same = {
        "format_version": FORMAT_VERSION,
        "rows_seen": args.rows_seen,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "heldout_users_modulo": args.heldout_users_modulo,
    }
    differs = {k: (previous.get(k), v) for k, v in same.items() if previous.get(k) != v}
    if differs:
        raise SystemExit(
            f"--resume: {out} was run with other settings ({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in differs.items())}); "
            "pass the same ones, or drop --resume (or pick another --out) to start afresh"
        )
    return previous


def plot(report: dict, path: Path) -> None:
    """One panel per partition: held-out FVU (log) against the plot's y; colour = k (L1:
    its held-out L0) on a log scale, marker = family, filled = whitened, size = expansion,
    ringed and joined = the Pareto front; dashed line: the neurons' figure where there is one."""
    key, label = y_measure(report["rows"], report["y_measure"])
    partitions = list(report["partitions"])
    fig, axes = new_figure(4.8 * len(partitions) + 1.2, 4.4, ncols=len(partitions))
    axes = np.atleast_1d(axes)
    cmap = matplotlib.colormaps["viridis"]
    norm = LogNorm(min(TOPK_KS), COLOUR_MAX_L0)
    markers = {"topk": "o", "batch_topk": "s", "relu_l1": "^"}
    for ax, partition in zip(axes, partitions, strict=True):
        rows = [r for r in report["rows"] if r["partition"] == partition]
        for r in rows:
            colour = cmap(norm(r["k"] if r["k"] is not None else max(r["l0"], 1.0)))
            whitened = r["whitening_shrinkage"] is not None
            ax.scatter(
                r["heldout_fvu"],
                value(r, key),
                s=12 * math.sqrt(r["expansion"]),
                marker=markers[r["family"]],
                facecolors=colour if whitened else "none",
                edgecolors=colour,
                linewidths=1.2,
                zorder=3,
            )
        front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["heldout_fvu"])
        if front:
            xs, ys = [r["heldout_fvu"] for r in front], [value(r, key) for r in front]
            ax.step(xs, ys, where="post", color=FRONT_COLOUR, linewidth=1, zorder=2)
            ax.scatter(xs, ys, s=150, facecolors="none", edgecolors=FRONT_COLOUR, zorder=4)
        baselines = report["partitions"][partition].get("baseline_measures") or {}
        for kind, style, side in (("neurons", "--", 0), ("rotation", ":", 1)):
            level = baselines.get(f"{kind}_" + key.removeprefix("measures.").removeprefix("sae_"))
            if not key.startswith("measures.") or not isinstance(level, int | float):
                continue
            ax.axhline(level, color="grey", linestyle=style, linewidth=1)
            ax.annotate(
                kind,
                (side, level),
                xycoords=("axes fraction", "data"),
                ha=("left", "right")[side],
                va="bottom",
                color="grey",
                fontsize=8,
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("held-out FVU")
        ax.set_ylabel(label)
        ax.set_title(partition)
        ax.grid(alpha=0.3)
        if missing := [r for r in rows if not math.isfinite(value(r, key))]:
            ax.annotate(
                f"not drawn: {len(missing)} without this figure ("
                + ", ".join(sorted({r["family"] for r in missing}))
                + ")",
                (0.01, 0.01),
                xycoords="axes fraction",
                fontsize=7,
                color="grey",
            )

    def handle(label: str, marker: str = "o", **style: Any) -> Line2D:
        return Line2D([], [], marker=marker, linestyle="", label=label, **style)

    handles = [
        handle("TopK", "o", color="black"),
        handle("BatchTopK", "s", color="black"),
        handle("L1 ReLU", "^", color="black"),
        handle("whitened", color="grey"),
        handle("hidden basis", color="grey", markerfacecolor="none"),
        handle("Pareto front", markerfacecolor="none", markeredgecolor=FRONT_COLOUR, markersize=11),
    ]
    axes[-1].legend(handles=handles, fontsize=7, loc="best")
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=list(axes), pad=0.01)
    bar.set_label("k (L1 ReLU: its held-out L0)")
    bar.set_ticks([4, 8, 16, 32, 64, 128, 256])
    bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(
        f"SAE sweep: {report['rows_seen']:,} training rows each; marker size = expansion "
        f"({', '.join(str(e) for e in EXPANSIONS)})"
    )
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep (argv: the command line without the program) and return the report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="a materialized store")
    parser.add_argument(
        "--partitions",
        default="sasrec.layer2,student.layer2",
        help="comma-separated <model>.layer<l> keys (`ls DATA_DIR/activations`)",
    )
    parser.add_argument(
        "--rows-seen",
        type=int,
        help=f"training rows per configuration (default {DEFAULT_ROWS_SEEN:,}; --quick "
        f"{QUICK_ROWS_SEEN:,})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=domain_default(SaeTrainConfig, "batch_size")
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-users-modulo", type=int, default=HELDOUT_USERS_MODULO)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--out", type=Path, help="results JSON (default benchmarks/results/sae_sweep.json)"
    )
    parser.add_argument("--plot", type=Path, help="Pareto plot PNG (default beside --out)")
    parser.add_argument(
        "--resume", action="store_true", help="skip configurations already in --out"
    )
    parser.add_argument("--quick", action="store_true", help="6 small configurations, few rows")
    parser.add_argument(
        "--plot-only", action="store_true", help="only draw --plot again from --out"
    )
    parser.add_argument(
        "--sae-dir",
        type=Path,
        help="also save every trained SAE here; --resume then adds measures that did not "
        f"exist yet from these instead of retraining (rows without them are redone once "
        f"{SWEEP_MEASURES} exists)",
    )
    parser.add_argument(
        "--measure-rows",
        type=int,
        default=DEFAULT_MEASURE_ROWS,
        help=f"rows {SWEEP_MEASURES} samples per SAE (its max_sample_rows)",
    )
    parser.add_argument(
        "--y-measure",
        default=DEFAULT_Y_MEASURE,
        help=f"the plot's y and the Pareto front's: a {SWEEP_MEASURES} figure (NDCG@10 "
        "spliced/original until it exists)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this configuration, e.g. 'topk k=32 x32 whitening=0.1' (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.plot_only:
        out = args.out or RESULTS / "sae_sweep.json"
        report = json.loads(out.read_text())
        plot(report, args.plot or out.with_suffix(".png"))
        return report
    stem = "sae_sweep_quick" if args.quick else "sae_sweep"
    args.out = args.out or RESULTS / f"{stem}.json"
    args.plot = args.plot or args.out.with_suffix(".png")
    if args.rows_seen is None:
        args.rows_seen = QUICK_ROWS_SEEN if args.quick else DEFAULT_ROWS_SEEN
    keys = [k.strip() for k in args.partitions.split(",") if k.strip()]
    try:
        parsed = {key: parse_partition_key(key) for key in keys}
    except ValueError as err:
        parser.error(f"--partitions: {err}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    paths = ArtifactPaths(args.data_dir.resolve())
    widths = {
        key: activation_width(paths.partition(m, layer).activations, key)
        for key, (m, layer) in parsed.items()
    }
    configs = grid(args.quick)
    if args.only:
        names = {c.name for c in configs}
        if unknown := sorted(set(args.only) - names):
            parser.error(f"--only {unknown}: not in the grid; pick from {sorted(names)}")
        configs = [c for c in configs if c.name in args.only]
    measures_hook = interpretability_hook(SWEEP_MEASURES)
    previous = load_previous(args.out, args)
    done = {
        (r["partition"], r["config"]): r
        for r in previous.get("rows", [])
        if r["partition"] in parsed
    }
    report: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "command": shlex.join(
            [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)]
        ),
        **git_state(),
        "data_dir": str(paths.root),
        "rows_seen": args.rows_seen,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "heldout_users_modulo": args.heldout_users_modulo,
        "device": str(device),
        "machine": {
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
        },
        "interpretability": {
            SWEEP_MEASURES: measures_hook is not None,
            "measure_rows": args.measure_rows,
        },
        "y_measure": args.y_measure,
        "grid": [c.name for c in configs],
        "partitions": {},
        "rows": [],
        "seconds_total": 0.0,
        "seconds_configs": 0.0,
    }
    total = len(configs) * len(keys)
    print(
        f"SAE sweep: {len(configs)} configurations x {len(keys)} partitions = {total}, "
        f"{args.rows_seen:,} rows each, {torch.get_num_threads()} thread(s); "
        f"{len(done)} already in {args.out}"
        + ("" if measures_hook else f"; no {SWEEP_MEASURES} yet"),
        flush=True,
    )
    started = time.perf_counter()
    earlier = previous.get("seconds_total", 0.0)  # wall time of the runs --resume continues
    index = 0
    for key, (model_name, layer) in parsed.items():
        partition = paths.partition(model_name, layer).activations
        model = load_recommender(paths.model_dir(model_name), device)
        sequences, _ = read_sequences(paths.sequences)
        before = previous.get("partitions", {}).get(key, {})
        baselines: dict[str, float] = dict(before.get("baseline_measures") or {})
        report["partitions"][key] = {
            "d_in": widths[key],
            "activation_rows": partition_rows(partition),
            "baseline_measures": baselines,
        }
        for config in configs:
            index += 1
            prefix = f"[{index}/{total}] {key} {config.name}"
            row = done.get((key, config.name))
            if row is not None and row.get("measures") is None and measures_hook is not None:
                # measured before the measures existed (or when they failed): add them from
                # the saved SAE, or train again
                saved = None if args.sae_dir is None else sae_path(args.sae_dir, key, config)
                if saved is not None and saved.is_dir():
                    sae = TopKSae.load(saved, device).eval()
                    measured = time.perf_counter()
                    measures, error = measure(sae, paths, key, args, device, baselines)
                    row = row | {
                        "measures": measures,
                        "measures_error": error,
                        # `seconds` and `measure_seconds` stay those of the run that trained it
                        "measures_added_seconds": time.perf_counter() - measured,
                    }
                    print(f"{prefix}: measures added from {saved}", flush=True)
                else:
                    row = None
            elif row is not None:
                print(f"{prefix}: in {args.out.name}, skipped", flush=True)
            if row is None:
                context = {
                    "model": model,
                    "sequences": sequences,
                    "load_average": os.getloadavg()[0],
                    "baselines": baselines,
                }
                row = run_config(config, key, paths, widths[key], context, args, device)
                print(f"{prefix}: {progress_line(row, report['y_measure'], baselines)}", flush=True)
            report["rows"].append(row)
            report["seconds_total"] = earlier + time.perf_counter() - started
            report["seconds_configs"] = sum(r["seconds"] for r in report["rows"])
            mark_fronts(report)
            write_json(report, args.out)
        print(
            f"{key}: elapsed {(time.perf_counter() - started) / 60:.1f} min, configurations "
            f"{report['seconds_configs'] / 60:.1f} min in all",
            flush=True,
        )
    report["seconds_total"] = earlier + time.perf_counter() - started
    report["seconds_configs"] = sum(r["seconds"] for r in report["rows"])
    mark_fronts(report)
    write_json(report, args.out)
    plot(report, args.plot)
    for key, front in report["front"].items():
        print(f"Pareto front {key} ({report['pareto_axes']['y']}):")
        for point in front:
            print(
                "  "
                + ", ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{v}" for k, v in point.items()
                )
            )
    print(f"-> {args.out}, {args.plot}")
    return report


if __name__ == "__main__":
    main()
