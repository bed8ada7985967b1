"""Activation assets: hidden states of a model at a layer, one static partition per (model, layer),
as hive-partitioned Parquet shards that DuckDB queries through the `activations` view."""

import dagster as dg
import duckdb
import pyarrow.parquet as pq
from pydantic import Field

from recsae_pipeline.activations.shards import expected_rows, partition_dir, write_activations
from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.defs.partitions import feature_partitions, model_layer
from recsae_pipeline.defs.progress import throttled_log
from recsae_pipeline.defs.resources import StorageRoot, TorchDevice
from recsae_pipeline.defs.versioning import content_versioned, partition_output
from recsae_pipeline.models.artifacts import load_recommender

GROUP = "activations"


class ActivationsConfig(dg.Config):
    batch_users: int = Field(default=256, description="Users per forward pass.")
    rows_per_shard: int = Field(default=200_000, description="Rows per part-*.parquet file.")
    row_group_rows: int = Field(
        default=65_536, description="Parquet row-group size (streaming reads)."
    )


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"parquet", "duckdb", "pytorch"},
    partitions_def=feature_partitions,
    deps=["sasrec", "student"],
    check_specs=[
        dg.AssetCheckSpec(
            "complete_and_finite",
            asset="activations",
            blocking=True,
            description="Row count equals the non-padding positions of `sequences` (within "
            "max_len), no NaN/Inf, and the width equals the model's hidden size.",
        )
    ],
    description="Hidden states at one (model, layer) from the model's own forward pass (forward "
    "hook on the block), for every non-padding position and split: "
    "activations/model=<m>/layer=<l>/part-*.parquet.",
)
@content_versioned(partition_output("activations"))
def activations(
    context: dg.AssetExecutionContext,
    config: ActivationsConfig,
    storage: StorageRoot,
    device: TorchDevice,
) -> dg.MaterializeResult:
    model_name, layer = model_layer(context.partition_key)
    paths = storage.paths
    dev = device.torch_device
    sequences, _ = read_sequences(paths.sequences)
    model = load_recommender(paths.model_dir(model_name), dev)
    out = partition_dir(paths.root, model_name, layer)
    log = throttled_log(context)

    def progress(done: int, total: int) -> None:
        log(f"{context.partition_key}: {done:,}/{total:,} users", done == total)

    report = write_activations(
        model, sequences, layer, out, dev,
        batch_users=config.batch_users, rows_per_shard=config.rows_per_shard,
        row_group_rows=config.row_group_rows, on_progress=progress,
    )  # fmt: skip
    storage.refresh_duckdb()
    context.log.info(
        f"{report.rows:,} rows x {report.dim} in {report.shards} shards, {report.bytes / 2**20:.1f} MiB"
    )
    check = _completeness(
        paths, model_name, layer, sequences, model.config.max_len, model.config.hidden
    )
    return dg.MaterializeResult(
        check_results=[check],
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "dagster/row_count": report.rows,
            "model": model_name,
            "layer": layer,
            "dim": report.dim,
            "shards": report.shards,
            "megabytes": dg.MetadataValue.float(round(report.bytes / 2**20, 2)),
            "seconds": dg.MetadataValue.float(round(report.seconds, 2)),
            "forward_seconds": dg.MetadataValue.float(round(report.forward_seconds, 2)),
            "mean_norm": dg.MetadataValue.float(round(report.mean_norm, 4)),
        },
    )


def _completeness(
    paths, model_name: str, layer: int, sequences: list, max_len: int, hidden: int
) -> dg.AssetCheckResult:
    """Row count equals the non-padding positions (within max_len), all finite, width = hidden."""
    out = partition_dir(paths.root, model_name, layer)
    want_rows = expected_rows(sequences, max_len)
    width = pq.read_schema(next(out.glob("part-*.parquet"))).field("activation").type.list_size
    glob = str(out / "part-*.parquet").replace("'", "''")
    rows, nonfinite = duckdb.execute(
        "SELECT count(*), count(*) FILTER (WHERE list_bool_or(list_transform(activation::FLOAT[], "
        f"lambda x: isnan(x) OR isinf(x)))) FROM read_parquet('{glob}')"
    ).fetchone()  # type: ignore[misc]
    problems = []
    if rows != want_rows:
        problems.append(f"{rows} rows, expected {want_rows} non-padding positions")
    if nonfinite:
        problems.append(f"{nonfinite} rows with NaN/Inf")
    if width != hidden:
        problems.append(f"width {width} != model hidden size {hidden}")
    return dg.AssetCheckResult(
        check_name="complete_and_finite",
        passed=not problems,
        description="; ".join(problems) or f"{rows:,} rows, all finite, width {width}",
        metadata={
            "rows": rows,
            "expected_rows": want_rows,
            "width": width,
            "nonfinite_rows": nonfinite,
        },
    )
