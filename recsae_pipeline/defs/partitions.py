"""The per-(model, layer) partitions: activations and everything downstream of them."""

from __future__ import annotations

import dagster as dg

from recsae_pipeline.storage.registry import parse_partition_key, partition_key

DEFAULT_TARGETS = {"sasrec": (1, 2), "student": (1, 2)}
"""model -> layers: the SASRec blocks and the student blocks (the SAE targets)."""

feature_partitions = dg.StaticPartitionsDefinition(
    [partition_key(m, layer) for m, layers in DEFAULT_TARGETS.items() for layer in layers]
)


def model_layer(key: str) -> tuple[str, int]:
    """A partition key -> (model, layer), as a Dagster failure that names the fix."""
    try:
        return parse_partition_key(key)
    except ValueError as err:
        raise dg.Failure(str(err)) from None
