"""Activation assets, one per model: its hidden states at a layer, one static partition per
(model, layer), as hive-partitioned Parquet shards that DuckDB queries through the
`activations` view. Each partition depends on its own model only, so retraining the student
leaves the SASRec partitions (and everything downstream of them) fresh."""

import dagster as dg

from recsae_pipeline.activations.shards import write_activations
from recsae_pipeline.activations.validation import completeness_check
from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.defs.checks import check_result
from recsae_pipeline.defs.config import knob
from recsae_pipeline.defs.partitions import (
    DEFAULT_TARGETS,
    model_partitions,
    own_partitions,
    partition_asset,
    partition_of,
)
from recsae_pipeline.defs.progress import partition_progress
from recsae_pipeline.defs.resources import StorageRoot, TorchDevice
from recsae_pipeline.models.artifacts import load_recommender

GROUP = "activations"


class ActivationsConfig(dg.Config):
    batch_users: int = knob(write_activations, "batch_users", "Users per forward pass.")
    rows_per_shard: int = knob(write_activations, "rows_per_shard", "Rows per part-*.parquet file.")
    row_group_rows: int = knob(
        write_activations, "row_group_rows", "Parquet row-group size (streaming reads)."
    )


def activations_asset(model_name: str) -> dg.AssetsDefinition:
    """`<model>_activations`: the model's hidden states at each of its layers, one partition
    per (model, layer); it depends on that model alone."""
    name = f"{model_name}_activations"

    @partition_asset(
        "activations",
        name=name,
        group=GROUP,
        kinds={"parquet", "duckdb", "pytorch"},
        partitions_def=model_partitions[model_name],
        deps=[model_name],
        checks={
            "complete_and_finite": "Row count equals the non-padding positions of `sequences` "
            "(within max_len), no NaN/Inf, and the width equals the model's hidden size."
        },
        blocking=True,
        description=f"Hidden states of {model_name} at one layer from its own forward pass "
        "(forward hook on the block), for every non-padding position and split: "
        f"activations/model={model_name}/layer=<l>/part-*.parquet.",
    )
    def write_partition(
        context: dg.AssetExecutionContext,
        config: ActivationsConfig,
        storage: StorageRoot,
        device: TorchDevice,
    ) -> dg.MaterializeResult:
        part = partition_of(context, storage.paths)
        dev = device.torch_device
        sequences, _ = read_sequences(storage.paths.sequences)
        model = load_recommender(storage.paths.model_dir(model_name), dev)
        out = part.activations
        report = write_activations(
            model, sequences, part.layer, out, dev,
            batch_users=config.batch_users, rows_per_shard=config.rows_per_shard,
            row_group_rows=config.row_group_rows,
            on_progress=partition_progress(context, "{done:,}/{total:,} users"),
        )  # fmt: skip
        storage.refresh_duckdb()
        context.log.info(
            f"{report.rows:,} rows x {report.dim} in {report.shards} shards, "
            f"{report.bytes / 2**20:.1f} MiB"
        )
        check = completeness_check(out, sequences, model.config.max_len, model.config.hidden_size)
        return dg.MaterializeResult(
            check_results=[check_result("complete_and_finite", check)],
            metadata={
                "path": dg.MetadataValue.path(str(out)),
                "dagster/row_count": report.rows,
                "model": model_name,
                "layer": part.layer,
                "dim": report.dim,
                "shards": report.shards,
                "megabytes": dg.MetadataValue.float(round(report.bytes / 2**20, 2)),
                "seconds": dg.MetadataValue.float(round(report.seconds, 2)),
                "forward_seconds": dg.MetadataValue.float(round(report.forward_seconds, 2)),
                "mean_norm": dg.MetadataValue.float(round(report.mean_norm, 4)),
            },
        )

    return write_partition


activation_assets = {model: activations_asset(model) for model in DEFAULT_TARGETS}
"""model -> its activations asset (`sasrec_activations`, `student_activations`)."""
sasrec_activations, student_activations = activation_assets.values()


def activation_deps() -> list[dg.AssetDep]:
    """What a per-(model, layer) asset reads: each partition its own model's activations."""
    return [
        dg.AssetDep(asset, partition_mapping=own_partitions(model))
        for model, asset in activation_assets.items()
    ]
