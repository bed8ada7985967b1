"""The per-(model, layer) partitions: activations and everything downstream of them, and the
decorator every asset on them is declared with."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dagster as dg

from recsae_pipeline.defs.versioning import Outputs, content_versioned
from recsae_pipeline.storage.registry import (
    ArtifactPaths,
    PartitionPaths,
    parse_partition_key,
    partition_key,
)

DEFAULT_TARGETS = {"sasrec": (1, 2), "student": (1, 2)}
"""model -> layers: the SASRec blocks and the student blocks (the SAE targets)."""

feature_partitions = dg.StaticPartitionsDefinition(
    [partition_key(m, layer) for m, layers in DEFAULT_TARGETS.items() for layer in layers]
)
"""Every (model, layer): the partitions of the SAE and everything after it."""

model_partitions = {
    model: dg.StaticPartitionsDefinition([partition_key(model, layer) for layer in layers])
    for model, layers in DEFAULT_TARGETS.items()
}
"""model -> its own (model, layer) keys: the partitions of that model's activations asset, so
that retraining one model never touches another model's partitions."""


def own_partitions(model: str) -> dg.StaticPartitionMapping:
    """Each of `model`'s keys maps to the same key downstream; other models' keys map to none."""
    keys = model_partitions[model].get_partition_keys()
    return dg.StaticPartitionMapping({key: key for key in keys})


def partition_of(context: dg.AssetExecutionContext, paths: ArtifactPaths) -> PartitionPaths:
    """The artifacts of the partition this step materializes (its `.model`, `.layer`, `.key`);
    a malformed key is a Dagster failure that names the fix."""
    try:
        return paths.partition(*parse_partition_key(context.partition_key))
    except ValueError as err:
        raise dg.Failure(str(err)) from None


def partition_output(artifact: str) -> Outputs:
    """The outputs of a per-(model, layer) asset: its hive partition directory."""
    return lambda paths, key: [paths.partition_dir(artifact, *parse_partition_key(key or ""))]


def partition_asset(
    artifact: str,
    *,
    group: str,
    kinds: set[str],
    deps: Sequence[Any],
    description: str,
    checks: Mapping[str, str] | None = None,
    blocking: bool = False,
    name: str | None = None,
    partitions_def: dg.PartitionsDefinition = feature_partitions,
    stage: bool = True,
) -> Callable[[Callable[..., dg.MaterializeResult]], dg.AssetsDefinition]:
    """`@dg.asset` for an asset written per (model, layer) into `artifact`'s hive partition
    folder, content-versioned over that folder and staged until its checks pass (unless
    `stage=False`); `checks` (name -> description) are its own, all blocking downstream steps
    when `blocking`."""

    def decorate(fn: Callable[..., dg.MaterializeResult]) -> dg.AssetsDefinition:
        asset_name = name or fn.__name__
        specs = [
            dg.AssetCheckSpec(check, asset=asset_name, blocking=blocking, description=text)
            for check, text in (checks or {}).items()
        ]
        return dg.asset(
            name=asset_name,
            group_name=group,
            code_version="1",
            kinds=kinds,
            partitions_def=partitions_def,
            deps=deps,
            check_specs=specs,
            description=description,
        )(content_versioned(partition_output(artifact), stage=stage)(fn))

    return decorate
