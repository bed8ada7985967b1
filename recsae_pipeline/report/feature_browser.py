"""A static HTML feature browser for one (model, layer): an index of features sortable by any
column, and one page per feature with its explanations and scores, top windows, activation
histogram, attribute enrichment and steering effect. Plain files, no server, no CDN: open
`index.html` from disk.

Reads one feature's rows of the sparse activation table at a time (it is sorted by feature,
so the row-group statistics skip the rest) and the sequences once, for the peak users only.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
import pyarrow.parquet as pq

from recsae_pipeline.data.catalog import Catalog
from recsae_pipeline.interp.windows import Window
from recsae_pipeline.report.results import partition_comparisons
from recsae_pipeline.report.stats import Comparison
from recsae_pipeline.storage.atomic import atomic_path
from recsae_pipeline.storage.registry import BROWSER_INDEX_FILE, ArtifactPaths
from recsae_pipeline.storage.sql import read_parquet

WINDOW_RADIUS = 5
HISTOGRAM_BINS = 30
ENRICHMENT_ROWS = 10


class BrowserReport(NamedTuple):
    pages: int
    """Feature pages written."""
    index: Path
    """The site's entry point, `<out_dir>/index.html`."""
    seconds: float


@dataclass
class FeaturePage:
    """Everything one feature's page shows; None where the artifact is not materialized."""

    stats: dict[str, Any]
    windows: list[Window]
    histogram: list[tuple[float, float, int]]
    """(bin start, bin end, active rows) over the feature's nonzero activations."""
    enrichment: list[dict[str, Any]]
    explanations: list[dict[str, Any]] | None
    scores: dict[str, dict[str, Any]] | None
    """method -> its scores row."""
    steering: list[dict[str, Any]] | None
    """This feature's steering points (empty: not a steering target)."""
    steering_summary: list[dict[str, Any]] | None


def write_browser(
    paths: ArtifactPaths,
    model: str,
    layer: int,
    out_dir: Path,
    max_features: int = 200,
    top_windows: int = 10,
) -> BrowserReport:
    """Write the site for one (model, layer) to `out_dir` (replaced atomically): pages for the
    explained features plus the most frequent active ones, up to `max_features` in all."""
    started = time.perf_counter()
    partition = paths.partition(model, layer)
    activations = partition.feature_activations
    for path, asset in (
        (partition.feature_stats, "feature_stats"),
        (activations, "feature_activations"),
        (paths.sequences, "sequences"),
    ):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing; materialize `{asset}` for {model}.layer{layer}"
            )
    stats = {r["feature"]: r for r in pq.read_table(partition.feature_stats).to_pylist()}
    explanations = _optional_rows(partition.explanations)
    scores = _optional_rows(partition.explanation_scores)
    steering = _optional_rows(partition.steering_points)
    steering_summary = _optional_rows(partition.steering_summary)

    explained = sorted({int(r["feature"]) for r in explanations or []} & stats.keys())
    frequent = sorted(
        (r for r in stats.values() if r["n_active"] > 0 and r["feature"] not in explained),
        key=lambda r: (-r["frequency"], r["feature"]),
    )
    features = explained + [r["feature"] for r in frequent[: max(0, max_features - len(explained))]]
    enrichment = _enrichment(partition.feature_enrichment, features)
    reads = _read_activations(activations, features, top_windows)
    windows = _windows(paths, model, reads)
    catalog = Catalog.load(paths)

    pages = {
        f: FeaturePage(
            stats=stats[f],
            windows=windows[f],
            histogram=reads[f].histogram,
            enrichment=enrichment.get(f, []),
            explanations=None
            if explanations is None
            else [r for r in explanations if r["feature"] == f],
            scores=None
            if scores is None
            else {r["method"]: r for r in scores if r["feature"] == f},
            steering=None if steering is None else [r for r in steering if r["feature"] == f],
            steering_summary=None
            if steering_summary is None
            else [r for r in steering_summary if r["feature"] == f],
        )
        for f in features
    }
    missing = [
        name
        for name, rows in (
            ("explanations", explanations),
            ("explanation_scores", scores),
            ("steering_eval", steering),
        )
        if rows is None
    ]
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        (tmp / "features").mkdir(parents=True)
        for i, f in enumerate(features):
            neighbours = (
                features[i - 1] if i else None,
                features[i + 1] if i + 1 < len(features) else None,
            )
            html = render_feature_page(pages[f], catalog, partition.key, neighbours)
            (tmp / "features" / f"{f}.html").write_text(html, encoding="utf-8")
        (tmp / BROWSER_INDEX_FILE).write_text(
            render_index(
                list(pages.values()), partition.key, missing,
                partition_comparisons(partition, resamples=1000).comparisons,
            ),
            encoding="utf-8",
        )  # fmt: skip
    return BrowserReport(len(features), out_dir / BROWSER_INDEX_FILE, time.perf_counter() - started)


# ----------------------------------------------------------------------------- reading


def _optional_rows(path: Path) -> list[dict[str, Any]] | None:
    return pq.read_table(path).to_pylist() if path.exists() else None


def _enrichment(path: Path, features: list[int]) -> dict[int, list[dict[str, Any]]]:
    """The `ENRICHMENT_ROWS` purest attributes of each feature."""
    if not features or not path.exists():
        return {}
    rows = duckdb.execute(
        f"""SELECT * FROM {read_parquet(path)}
            WHERE kind = 'feature' AND unit IN ({",".join(map(str, features))})
            QUALIFY row_number() OVER (PARTITION BY unit ORDER BY purity DESC, family, value) <= {ENRICHMENT_ROWS}
            ORDER BY unit, purity DESC, family, value"""
    ).fetchall()
    columns = [
        d[0] for d in duckdb.execute(f"DESCRIBE SELECT * FROM {read_parquet(path)}").fetchall()
    ]
    out: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        record = dict(zip(columns, row, strict=True))
        out.setdefault(int(record["unit"]), []).append(record)
    return out


class _FeatureReads(NamedTuple):
    histogram: list[tuple[float, float, int]]
    peaks: list[tuple[int, int, float]]
    """(user_idx, position, value): each user's strongest activation, strongest users first."""
    nearby: dict[tuple[int, int], float]
    """(user_idx, position) -> activation within WINDOW_RADIUS of a peak."""


READ_GROUP = 32
"""Features per filtered read of the sparse activation table (`_read_activations`)."""


def _read_activations(
    table: Path, features: list[int], top_windows: int
) -> dict[int, _FeatureReads]:
    """Per feature its histogram, peaks and window values, from one filtered read of the
    sparse table per `READ_GROUP` features (memory: that group's rows, not the table's)."""
    out = {}
    con = duckdb.connect()
    try:
        for start in range(0, len(features), READ_GROUP):
            group = ", ".join(str(int(f)) for f in features[start : start + READ_GROUP])
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE group_acts AS SELECT feature, user_idx, position, "
                f"value FROM {read_parquet(table)} WHERE feature IN ({group})"
            )
            for feature in features[start : start + READ_GROUP]:
                out[feature] = _feature_reads(con, feature, top_windows)
    finally:
        con.close()
    return out


def _feature_reads(con: duckdb.DuckDBPyConnection, feature: int, top_windows: int) -> _FeatureReads:
    """One feature's histogram, peaks and window values, from table `group_acts`."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE acts AS SELECT user_idx, position, value "
        f"FROM group_acts WHERE feature = {int(feature)}"
    )
    histogram = _histogram(con)
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE peaks AS
            SELECT user_idx, position, value FROM acts
            QUALIFY row_number() OVER (PARTITION BY user_idx ORDER BY value DESC, position) = 1
            ORDER BY value DESC, user_idx LIMIT {int(top_windows)}"""
    )
    peaks = con.execute("SELECT * FROM peaks ORDER BY value DESC, user_idx").fetchall()
    nearby = con.execute(
        f"""SELECT a.user_idx, a.position, a.value FROM acts a JOIN peaks p USING (user_idx)
            WHERE abs(a.position - p.position) <= {WINDOW_RADIUS}"""
    ).fetchall()
    return _FeatureReads(histogram, peaks, {(u, p): v for u, p, v in nearby})


def _histogram(con: duckdb.DuckDBPyConnection) -> list[tuple[float, float, int]]:
    """HISTOGRAM_BINS equal bins from the smallest to the largest value of table `acts`."""
    low, high, n = con.execute("SELECT min(value), max(value), count(*) FROM acts").fetchone()  # type: ignore[misc]
    if not n:
        return []
    low, high = float(low), float(high)
    if high <= low:
        return [(low, high, int(n))]
    bins = HISTOGRAM_BINS
    width = (high - low) / bins
    counts = dict(
        con.execute(
            f"""SELECT least(CAST(floor((value - {low!r}) / {width!r}) AS INTEGER), {bins - 1}) AS bin,
                       count(*) FROM acts GROUP BY bin"""
        ).fetchall()
    )
    return [(low + b * width, low + (b + 1) * width, int(counts.get(b, 0))) for b in range(bins)]


def _max_len(paths: ArtifactPaths, model: str) -> int | None:
    """The model's context length: earlier positions of longer users were never encoded."""
    config = paths.model_config(model)
    try:
        return int(json.loads(config.read_text())["recommender"]["max_len"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _windows(
    paths: ArtifactPaths, model: str, reads: dict[int, _FeatureReads]
) -> dict[int, list[Window]]:
    """+-WINDOW_RADIUS items around each peak; NaN where the model never saw the position."""
    users = sorted({u for r in reads.values() for u, _, _ in r.peaks})
    sequences: dict[int, list[int]] = {}
    if users:
        sequences = dict(
            duckdb.execute(
                f"SELECT user_idx, items FROM {read_parquet(paths.sequences)} "
                f"WHERE user_idx IN ({','.join(map(str, users))})"
            ).fetchall()
        )
    max_len = _max_len(paths, model)
    out: dict[int, list[Window]] = {}
    for feature, r in reads.items():
        windows = []
        for user, position, _ in r.peaks:
            items = sequences.get(user) or []
            first_seen = max(0, len(items) - max_len) if max_len else 0
            start, end = (
                max(0, position - WINDOW_RADIUS),
                min(len(items), position + WINDOW_RADIUS + 1),
            )
            values = tuple(
                r.nearby.get((user, p), 0.0) if p >= first_seen else math.nan
                for p in range(start, end)
            )
            windows.append(
                Window(user, position, start, tuple(int(i) for i in items[start:end]), values)
            )
        out[feature] = windows
    return out


# ----------------------------------------------------------------------------- rendering

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f3f3f3}table.sortable th{cursor:pointer;user-select:none}
th[data-dir=asc]::after{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.missing{color:#888;font-style:italic}.muted{color:#666}
.strip{display:flex;gap:2px}.strip .cell{font-size:12px;width:9em;padding:2px 4px;border:1px solid #eee}
.cell.peak{outline:2px solid #c44e52}.cell.unseen{background:repeating-linear-gradient(45deg,#eee,#eee 4px,#fff 4px,#fff 8px)}
.verdict-confirmed{color:#2a7d2a;font-weight:600}.verdict-refuted{color:#b03030;font-weight:600}.verdict-refined{color:#a06000;font-weight:600}
nav a{margin-right:1em}
"""

SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0];
  const asc = th.dataset.dir === "desc";
  th.parentNode.querySelectorAll("th").forEach(h => delete h.dataset.dir);
  th.dataset.dir = asc ? "asc" : "desc";
  const key = row => row.cells[col].dataset.v ?? row.cells[col].textContent.trim();
  const rows = [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === "" || y === "") return (x === "") - (y === "");  // blanks last either way
    const d = isNaN(x) || isNaN(y) ? x.localeCompare(y) : Number(x) - Number(y);
    return asc ? d : -d;
  });
  body.append(...rows);
}));
"""


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return format(value, spec)


def _num_cell(value: Any, spec: str = ".3f") -> str:
    """A right-aligned cell that sorts by its exact value (blank when missing)."""
    text = _fmt(value, spec)
    raw = "" if not text else repr(float(value))
    return f'<td class="num" data-v="{raw}">{text}</td>'


def _table(headers: list[str] | None, rows: list[list[str]], cls: str = "") -> str:
    """Headers are escaped here; cells must already be HTML (`<td>...</td>`)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers or [])
    thead = f"<thead><tr>{head}</tr></thead>" if headers else ""
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}>{thead}<tbody>{body}</tbody></table>"


def _document(title: str, body: str, script: str = "") -> str:
    script_tag = f"<script>{script}</script>" if script else ""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}{script_tag}</body></html>\n"
    )


def _missing(what: str) -> str:
    return f'<p class="missing">{escape(what)}</p>'


def histogram_svg(
    histogram: list[tuple[float, float, int]], width: int = 520, height: int = 170
) -> str:
    """Bars of active rows per activation bin, inline SVG with a hover count per bar."""
    if not histogram:
        return _missing("no nonzero activations")
    left, bottom, top_pad = 48, 28, 8
    plot_w, plot_h = width - left - 8, height - bottom - top_pad
    peak = max(c for _, _, c in histogram) or 1
    bar_w = plot_w / len(histogram)
    bars = []
    for i, (lo, hi, count) in enumerate(histogram):
        h = plot_h * count / peak
        bars.append(
            f'<rect x="{left + i * bar_w:.1f}" y="{top_pad + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="#4c72b0"><title>{lo:.3f}-{hi:.3f}: {count} rows</title></rect>'
        )
    x_min, x_max, y0 = histogram[0][0], histogram[-1][1], top_pad + plot_h
    return (
        f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-size="11" font-family="sans-serif">'
        f'<line x1="{left}" y1="{y0}" x2="{left + plot_w}" y2="{y0}" stroke="#333"/>'
        f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{y0}" stroke="#333"/>'
        f"{''.join(bars)}"
        f'<text x="{left}" y="{height - 10}" text-anchor="middle">{x_min:.3f}</text>'
        f'<text x="{left + plot_w}" y="{height - 10}" text-anchor="end">{x_max:.3f}</text>'
        f'<text x="{left + plot_w / 2}" y="{height - 2}" text-anchor="middle">activation</text>'
        f'<text x="{left - 4}" y="{top_pad + 10}" text-anchor="end">{peak}</text>'
        f'<text x="{left - 4}" y="{y0}" text-anchor="end">0</text>'
        f'<text x="12" y="{top_pad + plot_h / 2}" transform="rotate(-90 12 {top_pad + plot_h / 2})" '
        f'text-anchor="middle">active rows</text></svg>'
    )


def window_row(window: Window, catalog: Catalog, scale: float) -> list[str]:
    """One top window as table cells: user, peak position, peak, then the items in a strip,
    each coloured by its activation relative to `scale` (the feature's max activation)."""
    strip = []
    for offset, (item, value) in enumerate(zip(window.items, window.activations, strict=True)):
        classes = ["cell"] + (["peak"] if offset == window.peak_offset else [])
        if math.isnan(value):
            classes.append("unseen")
            note, shown, style = "beyond the model's context: never encoded", "-", ""
        else:
            alpha = min(1.0, value / scale) if scale > 0 else 0.0
            colour = "#fff" if alpha > 0.6 else "#222"
            note = shown = f"{value:.3f}"
            style = f' style="background:rgba(76,114,176,{alpha:.2f});color:{colour}"'
        strip.append(
            f'<span class="{" ".join(classes)}"{style} title="{escape(note)}">'
            f"{escape(catalog.render(item))}<br><small>{shown}</small></span>"
        )
    return [
        f'<td class="num">{window.user_idx}</td>',
        f'<td class="num">{window.peak_position}</td>',
        _num_cell(window.peak),
        f'<td><div class="strip">{"".join(strip)}</div></td>',
    ]


def _hypotheses(raw: str | None) -> str:
    try:
        hypotheses = json.loads(raw or "[]")
    except json.JSONDecodeError:
        return _missing("hypotheses are not valid JSON")
    if not hypotheses:
        return ""
    rows = []
    for h in hypotheses:
        status = str(h.get("status", ""))
        text = escape(str(h.get("text", "")))
        initial = h.get("initial_text")
        if initial and initial != h.get("text"):
            text += f'<br><span class="muted">initially: {escape(str(initial))}</span>'
        rows.append(
            [
                f"<td>H{escape(str(h.get('id', '')))}</td>",
                f"<td>{escape(str(h.get('kind', '')))}</td>",
                f"<td>{text}</td>",
                f'<td class="verdict-{escape(status)}">{escape(status)}</td>',
                f'<td class="num">{escape(str(h.get("tests", "")))}</td>',
                _num_cell(h.get("last_separation")),
            ]
        )
    return _table(["", "kind", "hypothesis", "verdict", "tests", "separation AUC"], rows)


def _explanations_html(page: FeaturePage) -> str:
    if page.explanations is None:
        return _missing("not materialized: materialize `explanations` and `explanation_scores`")
    if not page.explanations:
        return _missing("not explained (`explanations` explains a configured set of features)")
    parts = []
    for e in sorted(page.explanations, key=lambda e: e["method"] != "sage"):
        method = str(e["method"])
        parts.append(f"<h3>{escape(method)}: {escape(str(e.get('label') or ''))}</h3>")
        parts.append(f"<p>{escape(str(e.get('description') or ''))}</p>")
        parts.append(
            f'<p class="muted">backend: {escape(str(e.get("backend", "")))}; experiments: '
            f"{escape(str(e.get('experiments', '')))}; stopped by: {escape(str(e.get('stopped_by', '')))}</p>"
        )
        if page.scores is None:
            parts.append(_missing("scores not materialized: materialize `explanation_scores`"))
        elif method in page.scores:
            s = page.scores[method]
            named = s.get("names_concept")
            parts.append(
                _table(
                    [
                        "generative accuracy",
                        "predictive r",
                        "detection AUC",
                        "names planted concept",
                    ],
                    [
                        [
                            _num_cell(s.get("generative_accuracy")),
                            _num_cell(s.get("predictive_r")),
                            _num_cell(s.get("detection_auc")),
                            f"<td>{'' if named is None else escape(str(named).lower())}</td>",
                        ]
                    ],
                )
            )
        parts.append(_hypotheses(e.get("hypotheses")))
    return "".join(parts)


def _steering_html(page: FeaturePage) -> str:
    if page.steering is None:
        return _missing("not materialized: materialize `steering_eval`")
    if not page.steering:
        return _missing(
            "not a steering target (`steering_eval` steers the purest feature per genre)"
        )
    parts = []
    for s in page.steering_summary or []:
        parts.append(
            f"<p>{escape(str(s['genre']))}: top-10 share {_fmt(s['base_share'])} -> {_fmt(s['best_share'])} "
            f"({_fmt(s['share_ratio'], '.1f')}x at alpha scale {_fmt(s['best_alpha_scale'], 'g')}), "
            f"NDCG@10 loss {_fmt(s['ndcg_loss'], '.1%')}; clamped to 0: share {_fmt(s['clamp_share'])}</p>"
        )
    rows = [
        [
            f"<td>{escape(str(p['genre']))}</td>",
            f"<td>{escape(str(p['mode']))}</td>",
            _num_cell(p["alpha_scale"], "g"),
            _num_cell(p["alpha"]),
            _num_cell(p["share"]),
            _num_cell(p["ndcg"], ".4f"),
        ]
        for p in page.steering
    ]
    parts.append(
        _table(
            [
                "genre",
                "mode",
                "alpha / max activation",
                "alpha",
                "genre share of top 10",
                "NDCG@10",
            ],
            rows,
        )
    )
    return "".join(parts)


def render_feature_page(
    page: FeaturePage,
    catalog: Catalog,
    partition: str,
    neighbours: tuple[int | None, int | None] = (None, None),
) -> str:
    """One feature's page; every piece of text from the data is escaped."""
    s = page.stats
    feature = int(s["feature"])
    nav = ['<a href="../index.html">index</a>']
    for label, other in zip(("previous", "next"), neighbours, strict=True):
        if other is not None:
            nav.append(f'<a href="{int(other)}.html">{label}: feature {int(other)}</a>')
    facts = [
        ("active rows", _fmt(s.get("n_active"), "d")),
        ("frequency", _fmt(s.get("frequency"), ".5f")),
        (
            "mean / max activation",
            f"{_fmt(s.get('mean_activation'))} / {_fmt(s.get('max_activation'))}",
        ),
        ("best attribute", escape(str(s.get("best_attribute") or ""))),
        ("monosemanticity", _fmt(s.get("monosemanticity"))),
        (
            "best share (base rate)",
            f"{_fmt(s.get('best_share'))} ({_fmt(s.get('best_base_rate'))})",
        ),
    ]
    if s.get("best_concept") is not None:
        facts.append(
            (
                "best planted concept (AUC)",
                f"{escape(str(s['best_concept']))} ({_fmt(s.get('concept_auc'))})",
            )
        )
    top_items = "".join(
        f"<li>{escape(catalog.render(int(i)))}</li>" for i in s.get("top_items") or []
    )
    scale = float(s.get("max_activation") or 0.0) or max(
        (v for w in page.windows for v in w.activations if not math.isnan(v)), default=0.0
    )
    windows = (
        _table(
            ["user", "peak position", "peak", "items around the peak, with their activation"],
            [window_row(w, catalog, scale) for w in page.windows],
            "windows",
        )
        if page.windows
        else _missing("no active rows")
    )
    enrichment = (
        _table(
            ["attribute", "hits / top items", "share", "base rate", "lift", "purity"],
            [
                [
                    f"<td>{escape(str(e['family']))}:{escape(str(e['value']))}</td>",
                    f'<td class="num">{e["hits"]} / {e["top_items"]}</td>',
                    _num_cell(e["share"]),
                    _num_cell(e["base_rate"]),
                    _num_cell(e["lift"], ".2f"),
                    _num_cell(e["purity"]),
                ]
                for e in page.enrichment
            ],
            "enrichment",
        )
        if page.enrichment
        else _missing("no enrichment (too few top items)")
    )
    body = (
        f'<nav>{"".join(nav)}</nav><h1>Feature {feature} <small class="muted">{escape(partition)}</small></h1>'
        + _table(None, [[f"<th>{escape(k)}</th>", f"<td>{v}</td>"] for k, v in facts])
        + f"<h2>Explanations</h2>{_explanations_html(page)}"
        + f'<h2>Top windows</h2><p class="muted">One per user, +-{WINDOW_RADIUS} items around the '
        "peak (outlined); colour: activation / the feature's max activation; hatched: beyond the "
        f"model's context.</p>{windows}"
        + f"<h2>Activation histogram</h2>{histogram_svg(page.histogram)}"
        + f"<h2>Top items</h2><ol>{top_items}</ol>"
        + f'<h2>Attribute enrichment</h2><p class="muted">The {ENRICHMENT_ROWS} purest attributes '
        "of the feature's top items: share against the base rate.</p>"
        + enrichment
        + f"<h2>Steering</h2>{_steering_html(page)}"
    )
    return _document(f"Feature {feature}, {partition}", body)


def comparisons_html(comparisons: list[Comparison], partition: str) -> str:
    """Both sides of every comparison of the partition (SAE vs neurons, steering vs the
    baseline directions, SAGE vs the baseline) with the difference and its 95% CI."""
    if not comparisons:
        return ""
    rows = []
    for c in comparisons:
        lo, hi = c.ci95
        name = c.name.removeprefix(f"{partition}: ")
        rows.append(
            [
                f"<td>{escape(name)}</td>",
                f"<td>{escape(c.metric)}</td>",
                f"<td>{escape(c.a.label)}</td>",
                _num_cell(c.a.value),
                f"<td>{escape(c.b.label)}</td>",
                _num_cell(c.b.value),
                _num_cell(c.difference),
                f"<td>[{lo:+.4f}, {hi:+.4f}]</td>",
                f"<td>{c.n} {escape(c.unit)}" + (f", {c.n_nan} NaN" if c.n_nan else "") + "</td>",
                f"<td>{escape(c.verdict)}</td>",
            ]
        )
    headers = ["comparison", "metric", "a", "a value", "b", "b value", "a - b", "95% CI", "n", "verdict"]  # fmt: skip
    return (
        "<h2>Both sides</h2>"
        '<p class="muted">Paired 95% CIs (bootstrap over the unit); where the CI includes '
        "zero: no measurable difference.</p>" + _table(headers, rows)
    )


def render_index(
    pages: list[FeaturePage],
    partition: str,
    missing: list[str],
    comparisons: list[Comparison] | None = None,
) -> str:
    """The partition's comparisons, both sides, then the sortable table of every page's
    feature."""
    has_concepts = any(p.stats.get("best_concept") is not None for p in pages)
    headers = [
        "feature",
        "active rows",
        "frequency",
        "max activation",
        "best attribute",
        "monosemanticity",
    ]
    headers += ["planted concept", "concept AUC"] if has_concepts else []
    headers += ["SAGE label", "SAGE gen. accuracy", "SAGE r", "baseline label", "baseline gen. accuracy", "baseline r", "steered genre"]  # fmt: skip
    rows = []
    for p in pages:
        s, f = p.stats, int(p.stats["feature"])
        labels = {e["method"]: e.get("label") or "" for e in p.explanations or []}
        scores = p.scores or {}
        row = [
            f'<td class="num" data-v="{f}"><a href="features/{f}.html">{f}</a></td>',
            _num_cell(s.get("n_active"), "d"),
            _num_cell(s.get("frequency"), ".5f"),
            _num_cell(s.get("max_activation")),
            f"<td>{escape(str(s.get('best_attribute') or ''))}</td>",
            _num_cell(s.get("monosemanticity")),
        ]
        if has_concepts:
            row += [
                f"<td>{escape(str(s.get('best_concept') or ''))}</td>",
                _num_cell(s.get("concept_auc")),
            ]
        for method in ("sage", "baseline"):
            score = scores.get(method, {})
            row += [
                f"<td>{escape(str(labels.get(method, '')))}</td>",
                _num_cell(score.get("generative_accuracy")),
                _num_cell(score.get("predictive_r")),
            ]
        row.append(
            f"<td>{escape(', '.join(sorted({str(x['genre']) for x in p.steering or []})))}</td>"
        )
        rows.append(row)
    note = (
        _missing(
            f"not materialized for this partition: {', '.join(missing)}; those columns are empty"
        )
        if missing
        else ""
    )
    body = (
        f"<h1>SAE features, {escape(partition)}</h1>"
        f'<p class="muted">{len(pages)} features: every explained one, then the most frequent. '
        "Click a column header to sort.</p>"
        f"{comparisons_html(comparisons or [], partition)}"
        f"{note}{_table(headers, rows, 'sortable')}"
    )
    return _document(f"SAE features, {partition}", body, SORT_SCRIPT)
