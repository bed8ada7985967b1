"""The orchestrator's side of torchrun training: launch the ranks through Dagster Pipes."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NamedTuple

from recsae_pipeline.distributed.ranks import TASKS, Task

if TYPE_CHECKING:
    import dagster as dg


class Launched(NamedTuple):
    message: dict[str, Any]
    """The training result rank 0 reported (decode with `sae_result` / `train_result`)."""
    metadata: dict[str, Any]
    """Metadata of the materialization rank 0 reported: launcher, world size, backend, ..."""


def torchrun_command(task: Task, nproc_per_node: int, device: str) -> list[str]:
    """The command line that trains `task` on `nproc_per_node` local ranks."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}; pick one of {TASKS}")
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node={nproc_per_node}; must be >= 1")
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc_per_node), "-m", "recsae_pipeline.distributed.ranks", task, "--device", device,
    ]  # fmt: skip


def launch(
    context: dg.AssetExecutionContext,
    task: Task,
    extras: dict[str, Any],
    nproc_per_node: int,
    device: str,
) -> Launched:
    """Run `task` under torchrun through `dg.PipesSubprocessClient` and return what rank 0
    reported; raises (dg.DagsterPipesExecutionError) if any rank fails."""
    import dagster as dg  # the orchestrator's side only: the ranks never import dagster

    invocation = dg.PipesSubprocessClient().run(
        context=context, command=torchrun_command(task, nproc_per_node, device), extras=extras
    )
    messages = invocation.get_custom_messages()
    if len(messages) != 1:
        raise RuntimeError(
            f"torchrun {task}: expected one training result from rank 0, got {len(messages)}"
        )
    return Launched(messages[0], dict(invocation.get_materialize_result().metadata or {}))
