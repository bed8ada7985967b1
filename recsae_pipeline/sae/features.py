"""SAE features over a whole activations partition: the sparse feature-activation table, and
per-unit statistics that are computed the same way for SAE features and raw hidden dimensions.

Terms used throughout:
- a *unit* is one SAE feature, or one raw hidden dimension read in one sign (`+` = its
  highest values, `-` = its lowest), so each dimension gives two units;
- a row's *item* is the input item at that position (the item the hidden state has just
  read), and its attributes are that item's catalog attributes;
- a unit's *top items* are the `top_n` distinct items with its highest activation on a row
  of that item (for SAE features only where it is active, so a rare feature has fewer);
  counting items once keeps one frequent item from standing for a concept.

Everything streams: encoding goes row group by row group, the top items of SAE features come
from an out-of-core DuckDB window over the sparse table, and the concept AUCs use a bounded,
deterministic sample of users.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import duckdb
import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from recsae_pipeline.activations.shards import iter_in_file_order, partition_rows
from recsae_pipeline.data.catalog import Catalog
from recsae_pipeline.data.sequences import DUCKDB_MEMORY_LIMIT
from recsae_pipeline.models.metrics import dense_auc, sparse_auc
from recsae_pipeline.sae.interpretability import (
    KINDS,
    DenseUnits,
    MeasureConfig,
    Measures,
    SparseUnits,
    Targets,
    Units,
    attribute_targets,
    concept_targets,
    item_attribute_matrix,
    measure_units,
    purity_chance,
    random_rotation,
    rotated,
)
from recsae_pipeline.sae.model import TopKSae
from recsae_pipeline.storage.atomic import copy_to_parquet, parquet_writer, scratch_dir
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline.storage.sql import read_parquet, sql_literal

FEATURE_ACTIVATION_SCHEMA = pa.schema(
    [
        ("user_idx", pa.int32()),
        ("position", pa.int32()),
        ("item_idx", pa.int32()),
        ("feature", pa.int32()),
        ("value", pa.float32()),
    ]
)


class FeatureActivationReport(NamedTuple):
    rows: int
    """Activation rows encoded (every row of the partition)."""
    entries: int
    """Nonzero (row, feature) entries written: at most k per row."""
    active_features: int
    """Features active on at least one row."""
    seconds: float
    bytes: int


@torch.no_grad()
def write_feature_activations(
    sae: TopKSae,
    partition_dir: Path,
    out_path: Path,
    device: torch.device | str,
    on_progress: Callable[[int, int], None] | None = None,
) -> FeatureActivationReport:
    """Encode every activation row and write the nonzero top-k entries as one Parquet file
    (user_idx, position, item_idx, feature, value) sorted by feature, then value descending,
    so the row-group statistics let a query for one feature skip the rest.

    Entries are streamed to a scratch file first; DuckDB then sorts out of core into a temp
    path that is renamed over `out_path`, so a failure leaves any previous file untouched."""
    import time

    started = time.perf_counter()
    device = torch.device(device)
    sae = sae.eval()
    total = partition_rows(partition_dir)
    rows = entries = 0
    fired = torch.zeros(sae.config.n_latents, dtype=torch.bool)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(out_path.parent) as scratch:
        unsorted = Path(scratch) / "unsorted.parquet"
        with parquet_writer(unsorted, FEATURE_ACTIVATION_SCHEMA) as writer:
            for batch in iter_in_file_order(
                partition_dir, columns=("activation", "user_idx", "position", "item_idx")
            ):
                values, indices = sae.encode(batch["activation"].to(device))
                values, indices = values.cpu(), indices.cpu()
                active = values > 0
                per_row = active.sum(1)
                fired[indices[active]] = True
                table = pa.table(
                    {
                        name: np.repeat(batch[name].numpy(), per_row.numpy())
                        for name in ("user_idx", "position", "item_idx")
                    }
                    | {
                        "feature": indices[active].to(torch.int32).numpy(),
                        "value": values[active].to(torch.float32).numpy(),
                    },
                    schema=FEATURE_ACTIVATION_SCHEMA,
                )
                writer.write_table(table)
                rows += len(per_row)
                entries += len(table)
                if on_progress is not None:
                    on_progress(rows, total)
        con = duckdb.connect()
        try:
            con.execute(f"SET temp_directory = {sql_literal(scratch)}")
            con.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")  # spills beyond it
            copy_to_parquet(
                con,
                f"SELECT * FROM {read_parquet(unsorted)} "
                "ORDER BY feature, value DESC, user_idx, position",
                out_path,
                row_group_size=131_072,
            )
        finally:
            con.close()
    return FeatureActivationReport(
        rows=rows,
        entries=entries,
        active_features=int(fired.sum()),
        seconds=time.perf_counter() - started,
        bytes=out_path.stat().st_size,
    )


# ----------------------------------------------------------------------------- attributes


def item_attributes(con: duckdb.DuckDBPyConnection, catalog: Catalog) -> None:
    """Register `attrs(item_idx, family, value)` in `con`: every indexed item's attributes
    (`Item.attributes`: genres, decade, popularity band, franchise)."""
    con.register("attrs", catalog.attribute_table())


# ----------------------------------------------------------------------------- top items


def feature_top_items(con: duckdb.DuckDBPyConnection, feature_path: Path, top_n: int) -> None:
    """Create temp table `top_items(unit, sign, item_idx, value)`: each feature's `top_n`
    distinct items by their highest activation of it (sign '+'), through an out-of-core
    aggregation and window over the sparse table."""
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE top_items AS
        SELECT feature AS unit, '+' AS sign, item_idx, max(value) AS value
        FROM {read_parquet(feature_path)} GROUP BY feature, item_idx
        QUALIFY row_number() OVER (PARTITION BY feature ORDER BY max(value) DESC, item_idx) <= {int(top_n)}
        """
    )


@torch.no_grad()
def neuron_top_items(partition_dir: Path, top_n: int, rotation: Tensor | None = None) -> pa.Table:
    """(unit, sign, item_idx, value) of each hidden dimension's `top_n` distinct items by
    their highest value ('+') and by their lowest value ('-', value kept negative); with a
    `rotation` [d, d], of each coordinate of x @ rotation instead.

    Streams once, keeping a running per-item maximum of x and of -x: memory is
    O(num_items * d) whatever the number of rows."""
    best: dict[str, Tensor] = {}
    seen = torch.zeros(0, dtype=torch.bool)
    for batch in iter_in_file_order(partition_dir, columns=("activation", "item_idx")):
        x = batch["activation"] if rotation is None else batch["activation"].float() @ rotation
        items = batch["item_idx"].long()
        size = int(items.max()) + 1
        if size > len(seen):  # grow the per-item tables to the largest index so far
            grow = size - len(seen)
            seen = torch.cat([seen, torch.zeros(grow, dtype=torch.bool)])
            for sign in ("+", "-"):
                pad = torch.full((grow, x.shape[1]), -torch.inf)
                best[sign] = torch.cat([best[sign], pad]) if sign in best else pad
        seen[items] = True
        index = items.unsqueeze(1).expand_as(x)
        best["+"].scatter_reduce_(0, index, x, reduce="amax")
        best["-"].scatter_reduce_(0, index, -x, reduce="amax")
    if not len(seen):
        raise FileNotFoundError(f"{partition_dir} holds no activation rows")
    n = min(top_n, int(seen.sum()))
    units, signs, items_out, values_out = [], [], [], []
    for sign, table in best.items():
        values, item_idx = table.topk(n, dim=0)  # [n, d]; unseen items sit at -inf
        d = values.shape[1]
        units.append(np.tile(np.arange(d, dtype=np.int32), n))
        signs.extend([sign] * (n * d))
        items_out.append(item_idx.reshape(-1).numpy().astype(np.int32))
        scale = 1.0 if sign == "+" else -1.0
        values_out.append((scale * values).reshape(-1).numpy().astype(np.float32))
    return pa.table(
        {
            "unit": np.concatenate(units),
            "sign": pa.array(signs, pa.string()),
            "item_idx": np.concatenate(items_out),
            "value": np.concatenate(values_out),
        }
    )


# ----------------------------------------------------------------------------- enrichment


def enrichment(
    con: duckdb.DuckDBPyConnection, top_items: str, base_items: str, min_support: int
) -> pa.Table:
    """Attribute enrichment of each unit's top items against the base rate over items.

    `top_items`: a relation (unit, sign, item_idx, value) of distinct items per unit;
    `base_items`: (item_idx), the items that occur in the partition, each counted once;
    `attrs` must exist (`item_attributes`). Returns one row per (unit, sign, family, value)
    present among the top items, with top_items (the unit's count), hits, share = hits /
    top_items, base_rate (share of all items with the attribute), lift = share / base_rate,
    and purity = (share - base_rate) / (1 - base_rate): 1 when every top item carries the
    attribute, 0 at chance. Units with fewer than `min_support` top items are left out."""
    return con.sql(
        f"""
        WITH support AS (
            SELECT unit, sign, count(*) AS top_items FROM {top_items} GROUP BY ALL
            HAVING count(*) >= {int(min_support)}
        ), total AS (SELECT count(*) AS items FROM {base_items}),
        base AS (
            SELECT a.family, a.value, count(*) / (SELECT items FROM total) AS base_rate
            FROM {base_items} b JOIN attrs a USING (item_idx) GROUP BY ALL
        ), hits AS (
            SELECT t.unit, t.sign, a.family, a.value, count(*) AS hits
            FROM {top_items} t JOIN attrs a USING (item_idx) GROUP BY ALL
        )
        SELECT h.unit::INTEGER AS unit, h.sign, h.family, h.value, s.top_items::INTEGER AS top_items,
               h.hits::INTEGER AS hits, h.hits / s.top_items AS share, b.base_rate,
               (h.hits / s.top_items) / b.base_rate AS lift,
               CASE WHEN b.base_rate < 1 THEN (h.hits / s.top_items - b.base_rate) / (1 - b.base_rate) ELSE 0 END AS purity
        FROM hits h JOIN support s USING (unit, sign) JOIN base b USING (family, value)
        ORDER BY unit, sign, purity DESC, family, value
        """
    ).to_arrow_table()


def monosemanticity(enrichment_table: pa.Table) -> pa.Table:
    """Per (unit, sign): the monosemanticity score = the purity of its best attribute (how
    completely one catalog attribute accounts for its top items beyond chance), with that
    attribute as `family:value`, its share and base rate."""
    con = duckdb.connect()
    try:
        con.register("enrichment", enrichment_table)
        return con.sql(
            """
            SELECT unit, sign, arg_max(family || ':' || value, purity) AS best_attribute,
                   max(purity) AS monosemanticity, arg_max(share, purity) AS best_share,
                   arg_max(base_rate, purity) AS best_base_rate, any_value(top_items) AS top_items
            FROM enrichment GROUP BY unit, sign ORDER BY unit, sign
            """
        ).to_arrow_table()
    finally:
        con.close()


# ----------------------------------------------------------------------------- concept AUC


def sample_stride(total_rows: int, max_rows: int) -> int:
    """Keep users with user_idx % stride == 0 so that about `max_rows` rows remain."""
    return max(1, math.ceil(total_rows / max(1, max_rows)))


@dataclass
class RowSample:
    """Rows of a deterministic user sample, with the SAE code and raw activations."""

    user_idx: Tensor
    position: Tensor
    item_idx: Tensor
    """The input item at each row's position."""
    activation: Tensor
    """float32 [R, d]"""
    values: Tensor
    """float32 [R, k] top-k values"""
    indices: Tensor
    """int64 [R, k] their features"""


@torch.no_grad()
def sample_rows(
    sae: TopKSae, partition_dir: Path, max_rows: int, device: torch.device | str
) -> RowSample:
    """Every row of the users with user_idx % stride == 0 (`sample_stride`), encoded."""
    stride = sample_stride(partition_rows(partition_dir), max_rows)
    names = ("user_idx", "position", "item_idx")
    parts: dict[str, list[Tensor]] = {k: [] for k in (*names, "activation")}
    codes: list[tuple[Tensor, Tensor]] = []
    for batch in iter_in_file_order(partition_dir, columns=("activation", *names)):
        keep = batch["user_idx"] % stride == 0
        if not keep.any():
            continue
        x = batch["activation"][keep]
        parts["activation"].append(x)
        for name in names:
            parts[name].append(batch[name][keep])
        values, indices = sae.encode(x.to(device))
        codes.append((values.cpu(), indices.cpu()))
    # BatchTopK and the L1 SAE pad each batch to its widest row: pad all to the widest
    width = max(v.shape[1] for v, _ in codes)
    return RowSample(
        user_idx=torch.cat(parts["user_idx"]),
        position=torch.cat(parts["position"]),
        item_idx=torch.cat(parts["item_idx"]),
        activation=torch.cat(parts["activation"]),
        values=torch.cat([_pad(v, width) for v, _ in codes]),
        indices=torch.cat([_pad(i, width) for _, i in codes]).long(),
    )


def _pad(codes: Tensor, width: int) -> Tensor:
    """[B, w] -> [B, width] with zeros on the right (value 0 = inactive, whatever its id)."""
    return torch.nn.functional.pad(codes, (0, width - codes.shape[1]))


def concept_labels(
    con: duckdb.DuckDBPyConnection,
    sample: RowSample,
    ground_truth_path: Path,
    sequences_path: Path,
    user_map_path: Path,
    item_map_path: Path,
    min_positives: int,
) -> tuple[list[str], Tensor]:
    """Planted concepts (the synthetic `mechanism` that produced the item at each sampled
    row's position) as bool labels [R, C]; concepts with fewer than `min_positives`
    positive rows in the sample are dropped."""
    positions = pa.table(
        {
            "user_idx": sample.user_idx.numpy(),
            "position": sample.position.numpy(),
            "row": np.arange(len(sample.user_idx)),
        }
    )
    con.register("sample_rows", positions)
    pairs = con.execute(
        f"""
        WITH seq AS (
            SELECT user_idx, unnest(items) AS item_idx, unnest(timestamps) AS ts,
                   unnest(generate_series(0, len(items) - 1)) AS position
            FROM {read_parquet(sequences_path)}
            WHERE user_idx IN (SELECT DISTINCT user_idx FROM sample_rows)
        ), labelled AS (
            SELECT seq.user_idx, seq.position, g.mechanism
            FROM seq
            JOIN {read_parquet(user_map_path)} u USING (user_idx)
            JOIN {read_parquet(item_map_path)} i USING (item_idx)
            JOIN {read_parquet(ground_truth_path)} g
              ON g.user_id = u.user_id AND g.item_id = i.item_id AND g.timestamp = seq.ts
        )
        SELECT s.row, l.mechanism FROM sample_rows s JOIN labelled l USING (user_idx, position)
        """
    ).fetchall()
    con.unregister("sample_rows")
    by_concept: dict[str, list[int]] = {}
    for row, mechanism in pairs:
        by_concept.setdefault(mechanism, []).append(row)
    concepts = sorted(c for c, rows in by_concept.items() if len(rows) >= min_positives)
    labels = torch.zeros(len(sample.user_idx), len(concepts), dtype=torch.bool)
    for j, concept in enumerate(concepts):
        labels[torch.tensor(by_concept[concept]), j] = True
    return concepts, labels


def planted_labels(
    con: duckdb.DuckDBPyConnection, sample: RowSample, paths: ArtifactPaths, min_positives: int
) -> tuple[list[str], Tensor]:
    """`concept_labels` from the store's planted ground truth; no concepts ([], [R, 0]) on a
    real log, which has none."""
    if not paths.ground_truth.exists():
        return [], torch.zeros(len(sample.user_idx), 0, dtype=torch.bool)
    return concept_labels(
        con, sample, paths.ground_truth, paths.sequences, paths.user_map, paths.item_map,
        min_positives,
    )  # fmt: skip


def sample_units(
    sae: TopKSae, sample: RowSample, rotation: Tensor, kinds: tuple[str, ...] = KINDS
) -> list[Units]:
    """The sampled rows as each of `kinds` of unit (`sae.interpretability.KINDS`)."""
    builders = {
        "sae": lambda: SparseUnits(sample.values, sample.indices, sae.config.n_latents),
        "neurons": lambda: DenseUnits("neurons", sample.activation),
        "rotation": lambda: DenseUnits("rotation", rotated(sample.activation, rotation)),
    }
    if unknown := set(kinds) - builders.keys():
        raise ValueError(f"kinds={kinds}: {sorted(unknown)} unknown; pick from {list(builders)}")
    return [builders[k]() for k in kinds]


# ----------------------------------------------------------------------------- all together


@dataclass
class FeatureStats:
    features: pa.Table
    """Per SAE feature: frequency, mean/max activation, top items, best attribute and
    monosemanticity (with its chance level), and (synthetic data) the best planted concept."""
    neurons: pa.Table
    """Per (hidden dimension, sign): best attribute and monosemanticity (with chance level)."""
    enrichment: pa.Table
    """Per (kind, unit, sign, family, value): share among top items, base rate, lift, purity."""
    concepts: pa.Table | None
    """Per planted concept: positives, best feature and neuron with their AUCs (or None)."""
    sample_rows: int
    """Rows behind the AUCs and probes."""
    measures: Measures
    """The chance-corrected measures (`sae.interpretability`) of SAE features, neurons and a
    random rotation."""
    units: pa.Table
    """`Measures.unit_table` joined with each unit's purity and its chance level."""
    targets: pa.Table
    """`Measures.target_table`: per (target, kind) best unit, null, k-sparse probes."""
    chance: pa.Table
    """Per (kind, measure, family): the chance level of each unit-level measure."""


def compute_feature_stats(
    sae: TopKSae,
    paths: ArtifactPaths,
    model: str,
    layer: int,
    device: torch.device | str,
    top_n: int = 50,
    min_support: int = 20,
    max_sample_rows: int = 500_000,
    min_positives: int = 20,
    measure_config: MeasureConfig | None = None,
) -> FeatureStats:
    """Statistics of every SAE feature and raw hidden dimension of partition (model, layer)
    (see the module docstring), from its activations, its sparse feature-activation table
    (`write_feature_activations`), the catalog and, when present, the planted ground truth;
    with the chance-corrected measures of `sae.interpretability` for SAE features, neurons
    and a random rotation."""
    config = measure_config or MeasureConfig(min_positives=min_positives)
    partition = paths.partition(model, layer)
    partition_dir, feature_path = partition.activations, partition.feature_activations
    catalog = Catalog.load(paths)
    scratch = scratch_dir(paths.root)
    con = duckdb.connect()
    try:
        # The top-items window groups every (feature, item) of the sparse table: capped and
        # spilled like every DuckDB build over a whole table (10 GB at 100x the default data
        # under DuckDB's default cap of 80% of RAM)
        con.execute(f"SET temp_directory = {sql_literal(scratch.name)}")
        con.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
        item_attributes(con, catalog)
        con.execute(
            f"CREATE TEMP TABLE base_items AS SELECT item_idx, count(*) AS rows "
            f"FROM {read_parquet(partition.activation_shards)} GROUP BY item_idx"
        )
        total_rows = partition_rows(partition_dir)
        sample = sample_rows(sae, partition_dir, max_sample_rows, device)
        rotation = random_rotation(sample.activation.shape[1], config.seed)
        feature_top_items(con, feature_path, top_n)
        con.register("neuron_top", neuron_top_items(partition_dir, top_n))
        con.register("rotation_top", neuron_top_items(partition_dir, top_n, rotation))
        enrichments = {
            kind: enrichment(con, table, "base_items", min_support)
            for kind, table in (
                ("feature", "top_items"), ("neuron", "neuron_top"), ("rotation", "rotation_top")
            )
        }  # fmt: skip
        monos = {kind: monosemanticity(table) for kind, table in enrichments.items()}
        item_rows = dict(con.execute("SELECT item_idx, rows FROM base_items").fetchall())
        _, attribute_matrix = item_attribute_matrix(catalog)
        sizes = {int(s) for t in monos.values() for s in t.column("top_items").to_pylist()}
        chance = purity_chance(
            item_rows, attribute_matrix, sorted(sizes), config.purity_null_draws, config.seed
        )
        monos = {kind: _with_purity_chance(t, chance) for kind, t in monos.items()}
        con.register("feature_mono", monos["feature"])
        con.register("titles", catalog.title_table())
        features = con.sql(
            f"""
            WITH basic AS (
                SELECT feature, count(*) AS n_active, avg(value) AS mean_activation,
                       max(value) AS max_activation
                FROM {read_parquet(feature_path)} GROUP BY feature
            ), items_ranked AS (
                SELECT unit AS feature, item_idx,
                       row_number() OVER (PARTITION BY unit ORDER BY value DESC, item_idx) AS r
                FROM top_items
            ), top_items AS (
                SELECT feature, list(item_idx ORDER BY r) AS top_items,
                       list(COALESCE(title, CAST(item_idx AS VARCHAR)) ORDER BY r) AS top_titles
                FROM items_ranked LEFT JOIN titles USING (item_idx) WHERE r <= 5 GROUP BY feature
            ), all_features AS (SELECT range::INTEGER AS feature FROM range({sae.config.n_latents}))
            SELECT f.feature, COALESCE(b.n_active, 0)::BIGINT AS n_active,
                   COALESCE(b.n_active, 0) / {total_rows}::DOUBLE AS frequency,
                   b.mean_activation::FLOAT AS mean_activation, b.max_activation::FLOAT AS max_activation,
                   t.top_items::INTEGER[] AS top_items, t.top_titles,
                   m.best_attribute, m.monosemanticity, m.monosemanticity_chance_p95,
                   m.best_share, m.best_base_rate
            FROM all_features f LEFT JOIN basic b USING (feature) LEFT JOIN top_items t USING (feature)
            LEFT JOIN feature_mono m ON m.unit = f.feature
            ORDER BY f.feature
            """
        ).to_arrow_table()
        enrichment_all = pa.concat_tables(
            [
                t.append_column("kind", pa.array([kind] * len(t), pa.string()))
                for kind, t in enrichments.items()
            ]
        )
        targets = attribute_targets(
            sample.item_idx, sample.user_idx, sample.position, catalog, config
        )
        concepts = None
        names, labels = planted_labels(con, sample, paths, min_positives)
        if names:
            feature_auc = sparse_auc(sample.values, sample.indices, labels, sae.config.n_latents)
            concepts = _concept_table(feature_auc, sample, names, labels)
            features = _with_best_concept(features, feature_auc, sample, names)
            targets = Targets.concat([targets, concept_targets(names, labels, config)])
        units = sample_units(sae, sample, rotation, KINDS)
        measures = measure_units(units, targets, sample.user_idx, config)
        unit_table = _units_with_purity(measures.unit_table(), monos)
        return FeatureStats(
            features,
            monos["neuron"],
            enrichment_all,
            concepts,
            len(sample.user_idx),
            measures,
            unit_table,
            measures.target_table(),
            _chance_table(measures, chance, top_n),
        )
    finally:
        con.close()
        scratch.cleanup()


def _with_purity_chance(mono: pa.Table, chance: dict[int, tuple[float, float]]) -> pa.Table:
    """`monosemanticity` table plus the chance level of a unit with that many top items."""
    sizes = mono.column("top_items").to_pylist()
    return mono.append_column(
        "monosemanticity_chance_p95",
        pa.array([chance[int(s)][1] if s is not None else None for s in sizes], pa.float64()),
    )


def _units_with_purity(units: pa.Table, monos: dict[str, pa.Table]) -> pa.Table:
    """Each unit's purity score and its chance level beside the AUC measures."""
    con = duckdb.connect()
    try:
        con.register("units", units)
        for kind, table in monos.items():
            con.register(f"mono_{kind}", table)
        return con.sql(
            """
            WITH mono AS (
                SELECT 'sae' AS kind, * FROM mono_feature
                UNION ALL SELECT 'neurons', * FROM mono_neuron
                UNION ALL SELECT 'rotation', * FROM mono_rotation
            )
            SELECT u.*, m.best_attribute AS purity_attribute, m.monosemanticity AS purity,
                   m.monosemanticity_chance_p95 AS purity_chance_p95
            FROM units u LEFT JOIN mono m USING (kind, unit, sign)
            ORDER BY CASE u.kind WHEN 'sae' THEN 0 WHEN 'neurons' THEN 1 ELSE 2 END, u.unit, u.sign
            """
        ).to_arrow_table()
    finally:
        con.close()


def _chance_table(
    measures: Measures, purity: dict[int, tuple[float, float]], top_n: int
) -> pa.Table:
    """(kind, measure, family, chance_p95, share_above): the unit-level measures' chance levels
    and the share of each kind's active units above them; the purity's level at `top_n`."""
    rows: dict[str, list] = {
        k: [] for k in ("kind", "measure", "family", "chance_p95", "share_above")
    }
    for kind, levels in measures.chance_levels().items():
        for family, level in levels.items():
            rows["kind"].append(kind)
            rows["measure"].append("best_auc")
            rows["family"].append(family)
            rows["chance_p95"].append(level)
            rows["share_above"].append(measures.share_above_chance(kind, family))
    n = max((s for s in purity if s <= top_n), default=None)
    if n is not None:
        rows["kind"].append("any")
        rows["measure"].append(f"purity@{n}")
        rows["family"].append("attribute")
        rows["chance_p95"].append(purity[n][1])
        rows["share_above"].append(None)
    return pa.table(rows, schema=pa.schema([
        ("kind", pa.string()), ("measure", pa.string()), ("family", pa.string()),
        ("chance_p95", pa.float64()), ("share_above", pa.float64()),
    ]))  # fmt: skip


def _concept_table(
    feature_auc: Tensor, sample: RowSample, names: list[str], labels: Tensor
) -> pa.Table:
    """Per planted concept: positives, best SAE feature (`feature_auc` [n_latents, C]) and
    best neuron (either sign), with their AUCs."""
    neuron_auc = dense_auc(sample.activation, labels)
    signed = torch.cat([neuron_auc, 1 - neuron_auc])  # rows: d '+', then d '-'
    d = neuron_auc.shape[0]
    best_f = feature_auc.max(0)
    best_n = signed.max(0)
    return pa.table(
        {
            "concept": names,
            "positives": labels.sum(0).numpy().astype(np.int64),
            "best_feature": best_f.indices.numpy().astype(np.int32),
            "feature_auc": best_f.values.numpy(),
            "best_neuron": (best_n.indices % d).numpy().astype(np.int32),
            "neuron_sign": ["+" if i < d else "-" for i in best_n.indices.tolist()],
            "neuron_auc": best_n.values.numpy(),
        }
    )


def _with_best_concept(
    features: pa.Table, feature_auc: Tensor, sample: RowSample, names: list[str]
) -> pa.Table:
    """Each feature's best planted concept and its AUC (None for features never active in
    the sample: their AUC is 0.5 everywhere)."""
    per_feature = feature_auc.max(1)
    seen = torch.zeros(feature_auc.shape[0], dtype=torch.bool)
    seen[sample.indices[sample.values > 0]] = True
    pairs = list(
        zip(per_feature.indices.tolist(), per_feature.values.tolist(), seen.tolist(), strict=True)
    )
    return features.append_column(
        "best_concept", pa.array([names[i] if s else None for i, _, s in pairs], pa.string())
    ).append_column("concept_auc", pa.array([v if s else None for _, v, s in pairs], pa.float32()))


def partition_measures(
    sae: TopKSae,
    paths: ArtifactPaths,
    model: str,
    layer: int,
    device: torch.device | str,
    kinds: tuple[str, ...] = ("sae", "neurons", "rotation"),
    max_sample_rows: int = 100_000,
    config: MeasureConfig | None = None,
    baseline: Measures | None = None,
) -> Measures:
    """The chance-corrected measures (`sae.interpretability`) of partition (model, layer) for
    `kinds` alone, without the sparse table or the purity: what a sweep over SAE settings
    needs per configuration (`Measures.summary()` flattens them). The neurons' and the
    rotation's figures do not depend on the SAE: compute them once, with `kinds`."""
    config = config or MeasureConfig()
    partition = paths.partition(model, layer)
    catalog = Catalog.load(paths)
    sample = sample_rows(sae, partition.activations, max_sample_rows, device)
    targets = attribute_targets(sample.item_idx, sample.user_idx, sample.position, catalog, config)
    con = duckdb.connect()
    try:
        names, labels = planted_labels(con, sample, paths, config.min_positives)
    finally:
        con.close()
    if names:
        targets = Targets.concat([targets, concept_targets(names, labels, config)])
    rotation = random_rotation(sample.activation.shape[1], config.seed)
    units = sample_units(sae, sample, rotation, kinds)
    out = measure_units(units, targets, sample.user_idx, config)
    if baseline is not None:
        if baseline.targets.names != targets.names or baseline.config != config:
            raise ValueError(
                "baseline was measured on other targets or settings; compute it with the same "
                "paths, partition, max_sample_rows and config"
            )
        for kind in baseline.kinds.keys() - out.kinds.keys():
            out.kinds[kind] = baseline.kinds[kind]
            out.units_of[kind] = baseline.units_of[kind]
        out.kinds = {k: out.kinds[k] for k in KINDS if k in out.kinds}
        out.units_of = {k: out.units_of[k] for k in KINDS if k in out.units_of}
    return out
