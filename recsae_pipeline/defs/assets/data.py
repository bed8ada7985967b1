"""Data assets: raw interactions, the item catalog and sequence datasets, with GX checks."""

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import duckdb
import pyarrow.parquet as pq
from pydantic import Field

from recsae_pipeline.data.catalog import build_catalog
from recsae_pipeline.data.ingest import InteractionColumns
from recsae_pipeline.data.sequences import SequenceConfig, build_sequences
from recsae_pipeline.data.sources import (
    MovieLensSource,
    RecBoleSource,
    Source,
    SyntheticSource,
    TabularSource,
    ingest,
)
from recsae_pipeline.data.synthetic import SyntheticConfig
from recsae_pipeline.data.validation import (
    SuiteOutcome,
    validate_catalog,
    validate_raw_interactions,
    validate_sequences,
)
from recsae_pipeline.defs.config import knob, to_domain
from recsae_pipeline.defs.resources import DataQuality, StorageRoot
from recsae_pipeline.defs.versioning import Outputs, content_versioned
from recsae_pipeline.report.plots import new_figure, save_figure
from recsae_pipeline.storage.sql import read_parquet

GROUP = "data"


class SyntheticOptions(dg.Config):
    """Size and seed of the embedded synthetic movie log (defaults: ~100k interactions); the
    generator's other knobs keep `SyntheticConfig`'s defaults."""

    n_users: int = knob(SyntheticConfig, "n_users")
    n_items: int = knob(SyntheticConfig, "n_items")
    mean_sequence_length: float = knob(SyntheticConfig, "mean_sequence_length")
    n_franchises: int = knob(SyntheticConfig, "n_franchises", "Each with 2-5 ordered installments.")
    seed: int = knob(SyntheticConfig, "seed")


class MovieLensOptions(dg.Config):
    path: str = Field(default="data/external/ml-100k", description="Unzipped GroupLens directory.")
    download: str | None = Field(
        default=None, description="Fetch this archive (e.g. 'ml-1m') if `path` is absent."
    )


class RecBoleOptions(dg.Config):
    path: str = Field(
        default="data/external/ml-100k", description="Directory with <name>.inter / <name>.item."
    )
    name: str | None = Field(
        default=None, description="Dataset name; defaults to the directory name."
    )


class TabularOptions(dg.Config):
    path: str = Field(default="", description="CSV or Parquet file of interactions.")
    user_column: str = knob(InteractionColumns, "user_id")
    item_column: str = knob(InteractionColumns, "item_id")
    timestamp_column: str = knob(InteractionColumns, "timestamp")
    rating_column: str | None = knob(InteractionColumns, "rating")
    timestamp_unit: Literal["s", "ms", "datetime"] = knob(InteractionColumns, "timestamp_unit")
    delimiter: str = knob(TabularSource, "delimiter")
    encoding: str = knob(TabularSource, "encoding")
    items_path: str | None = Field(default=None, description="Optional CSV/Parquet item file.")
    title_column: str | None = knob(TabularSource, "item_title_column")
    year_column: str | None = knob(TabularSource, "item_year_column")
    genres_column: str | None = knob(TabularSource, "item_genres_column")
    genres_separator: str = knob(TabularSource, "genres_separator")


class RawInteractionsConfig(dg.Config):
    """Which source to ingest, and its options."""

    source: Literal["synthetic", "movielens", "recbole", "tabular"] = "synthetic"
    synthetic: SyntheticOptions = Field(default_factory=SyntheticOptions)
    movielens: MovieLensOptions = Field(default_factory=MovieLensOptions)
    recbole: RecBoleOptions = Field(default_factory=RecBoleOptions)
    tabular: TabularOptions = Field(default_factory=TabularOptions)

    def to_source(self) -> Source:
        if self.source == "synthetic":
            return SyntheticSource(to_domain(self.synthetic, SyntheticConfig))
        if self.source == "movielens":
            return MovieLensSource(Path(self.movielens.path), self.movielens.download)
        if self.source == "recbole":
            return RecBoleSource(Path(self.recbole.path), self.recbole.name)
        t = self.tabular
        if not t.path:
            raise dg.Failure(
                "source 'tabular' needs `tabular.path`: the CSV or Parquet file of interactions."
            )
        return TabularSource(
            path=Path(t.path),
            columns=InteractionColumns(
                t.user_column, t.item_column, t.timestamp_column, t.rating_column, t.timestamp_unit
            ),
            delimiter=t.delimiter,
            encoding=t.encoding,
            items_path=Path(t.items_path) if t.items_path else None,
            item_title_column=t.title_column,
            item_year_column=t.year_column,
            item_genres_column=t.genres_column,
            genres_separator=t.genres_separator,
        )


def _table_metadata(path: Path) -> dict[str, dg.MetadataValue]:
    schema = pq.read_schema(path)
    return {
        "dagster/row_count": dg.MetadataValue.int(pq.ParquetFile(path).metadata.num_rows),
        "dagster/column_schema": dg.MetadataValue.table_schema(
            dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in schema])
        ),
        "path": dg.MetadataValue.path(str(path)),
    }


def _data_asset(
    outputs: Outputs, check: str, description: str, **asset: Any
) -> Callable[[Callable[..., dg.MaterializeResult]], dg.AssetsDefinition]:
    """`@dg.asset` for a data asset, content-versioned over `outputs`, with its blocking GX
    check `<name>_expectations` (described by `check`) run by the asset on what it staged."""

    def decorate(fn: Callable[..., dg.MaterializeResult]) -> dg.AssetsDefinition:
        name = fn.__name__
        spec = dg.AssetCheckSpec(
            f"{name}_expectations", asset=name, blocking=True, description=check
        )
        versioned = content_versioned(outputs, skip=asset.pop("skip", True))(fn)
        return dg.asset(
            group_name=GROUP,
            code_version="1",
            check_specs=[spec],
            description=description,
            **asset,
        )(versioned)

    return decorate


@_data_asset(
    lambda paths, _: [paths.raw_dir],
    "GX: schema and types, non-null ids and timestamps, plausible timestamp range, ratings in "
    "range, no duplicate (user, item, timestamp) rows.",
    "User-item interaction logs from the configured source, as Parquet (user_id, item_id, "
    "timestamp, rating); synthetic runs also store the planted ground truth.",
    kinds={"parquet", "duckdb"},
    skip=False,
)
def raw_interactions(
    context: dg.AssetExecutionContext,
    config: RawInteractionsConfig,
    storage: StorageRoot,
    quality: DataQuality,
) -> dg.MaterializeResult:
    paths = storage.paths
    report = ingest(config.to_source(), paths)
    storage.refresh_duckdb()
    users, items, t_min, t_max = duckdb.execute(
        f"SELECT count(DISTINCT user_id), count(DISTINCT item_id), min(timestamp), max(timestamp) "
        f"FROM {read_parquet(paths.raw_interactions)}"
    ).fetchone()  # type: ignore[misc]
    context.log.info(
        f"ingested {report.rows:,} interactions of {users:,} users and {items:,} items"
    )
    return dg.MaterializeResult(
        check_results=[
            _check_result(
                "raw_interactions_expectations", validate_raw_interactions(paths, quality.bounds)
            )
        ],
        metadata={
            **_table_metadata(paths.raw_interactions),
            "source": config.source,
            "files": ", ".join(report.files),
            "notes": "; ".join(report.notes) or "",
            "users": users,
            "items": items,
            "first_timestamp": t_min,
            "last_timestamp": t_max,
            "ground_truth": dg.MetadataValue.path(str(paths.ground_truth))
            if config.source == "synthetic"
            else "none",
        },
    )


@_data_asset(
    lambda paths, _: [paths.items],
    "GX: unique non-null item ids, titles present, plausible years, every interacted item in "
    "the catalog.",
    "Item catalog: item_id, title, year, genres, plus the source's extra attributes "
    "(franchise, installment, ...) and interaction counts.",
    kinds={"parquet"},
    deps=[raw_interactions],
)
def item_catalog(context: dg.AssetExecutionContext, storage: StorageRoot) -> dg.MaterializeResult:
    paths = storage.paths
    summary = build_catalog(paths)
    storage.refresh_duckdb()
    context.log.info(f"catalog of {summary['items']:,} items")
    return dg.MaterializeResult(
        check_results=[_check_result("item_catalog_expectations", validate_catalog(paths))],
        metadata={**_table_metadata(paths.items), **summary},
    )


class SequencesConfig(dg.Config):
    """k-core filter and rating threshold applied before the leave-one-out split."""

    user_core: int = knob(
        SequenceConfig, "user_core", "Keep users with at least this many interactions."
    )
    item_core: int = knob(
        SequenceConfig, "item_core", "Keep items with at least this many interactions."
    )
    min_rating: float | None = knob(
        SequenceConfig, "min_rating", "Keep interactions rated at least this."
    )


@_data_asset(
    lambda paths, _: [paths.sequences_dir],
    "GX: minimum length after filtering, item indices in range (0 = padding never inside), "
    "chronological order, and no test/validation target inside the training prefix.",
    "Chronological item sequences per user (item index 0 = padding) with id maps; "
    "leave-one-out split: last item test, second-last validation.",
    kinds={"parquet"},
    deps=[raw_interactions, item_catalog],
)
def sequences(
    context: dg.AssetExecutionContext,
    config: SequencesConfig,
    storage: StorageRoot,
    quality: DataQuality,
) -> dg.MaterializeResult:
    paths = storage.paths
    stats = build_sequences(paths, to_domain(config, SequenceConfig))
    storage.refresh_duckdb()
    fig, ax = new_figure()
    lows = [f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi, _ in stats.length_histogram]
    ax.bar(range(len(lows)), [n for _, _, n in stats.length_histogram], color="#4c72b0")
    ax.set_xticks(range(len(lows)), lows, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("sequence length (items)")
    ax.set_ylabel("users")
    ax.set_title(f"{stats.users:,} users, median length {stats.length_percentiles['p50']:.0f}")
    histogram = save_figure(fig, paths.report("sequence_lengths"))
    context.log.info(
        f"{stats.users:,} users x {stats.items:,} items, {stats.interactions:,} interactions "
        f"({stats.raw_interactions - stats.interactions:,} removed by filtering)"
    )
    return dg.MaterializeResult(
        check_results=[
            _check_result("sequences_expectations", validate_sequences(paths, quality.bounds))
        ],
        metadata={
            **_table_metadata(paths.sequences),
            "users": stats.users,
            "items": stats.items,
            "interactions": stats.interactions,
            "interactions_removed": stats.raw_interactions - stats.interactions,
            "density": dg.MetadataValue.float(round(stats.density, 6)),
            "core_iterations": stats.core_iterations,
            **{
                f"length_{k}": dg.MetadataValue.float(v)
                for k, v in stats.length_percentiles.items()
            },
            "length_histogram": dg.MetadataValue.md(
                histogram
                + "\n\n| length | users |\n|---|---|\n"
                + "\n".join(
                    f"| {lab} | {n} |"
                    for lab, (_, _, n) in zip(lows, stats.length_histogram, strict=True)
                )
            ),
        },
    )


def _check_result(name: str, outcome: SuiteOutcome) -> dg.AssetCheckResult:
    """The GX suite's outcome as the result of blocking check `name`."""
    failed = [k for k, v in outcome.details.items() if not v["success"]]
    return dg.AssetCheckResult(
        check_name=name,
        passed=outcome.success,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            f"GX suite `{outcome.suite}`: {outcome.evaluated - len(failed)}/{outcome.evaluated} "
            f"expectations met on {outcome.rows:,} rows"
            + ("" if not failed else f"; failed: {', '.join(failed)}")
        ),
        metadata={
            **{k: v for k, v in outcome.metadata().items() if k != "expectations"},
            "expectations": dg.MetadataValue.json(outcome.details),
        },
    )
