"""The per-(model, layer) partitions: activations and everything downstream of them."""

from __future__ import annotations

import dagster as dg

from recsae_pipeline.storage.registry import parse_partition_key, partition_key

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


def model_layer(key: str) -> tuple[str, int]:
    """A partition key -> (model, layer), as a Dagster failure that names the fix."""
    try:
        return parse_partition_key(key)
    except ValueError as err:
        raise dg.Failure(str(err)) from None
