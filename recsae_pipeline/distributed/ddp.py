"""Data-parallel training helpers for runs under `torchrun` (DDP: gloo on CPU, nccl on CUDA).

Without a process group (no `WORLD_SIZE` in the environment: the single-machine default)
every helper is a no-op that returns its input, so the training loops call them
unconditionally. Every rank reads the same seeded batch stream and trains on its strided
shard of each global batch (`shard`), so `batch_size` keeps its single-process meaning.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


def is_initialized() -> bool:
    """Whether a process group is up (i.e. this process is one rank of a DDP run)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def backend() -> str:
    """The process group's backend (gloo, nccl), or "none" in a single process."""
    return str(dist.get_backend()) if is_initialized() else "none"


def is_main() -> bool:
    """Rank 0, or the only process: the one that evaluates, saves and reports."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """torchrun (and any launcher following its contract) sets WORLD_SIZE for every rank."""
    return "WORLD_SIZE" in os.environ


def rank_device(spec: str = "auto") -> torch.device:
    """This rank's device: `resolve_device(spec)`, with CUDA pinned to `cuda:LOCAL_RANK`."""
    device = resolve_device(spec)
    if device.type != "cuda":
        return device
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def init_process_group(device: torch.device) -> bool:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) from the env:// variables
    torchrun sets. Returns False, and does nothing, outside torchrun or when already joined."""
    if is_initialized() or not launched_by_torchrun():
        return False
    name = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(name, device_id=device if device.type == "cuda" else None)
    return True


def destroy_process_group() -> None:
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """`init_process_group` for the block, torn down after it (even on error); yields whether
    this process is one rank of a group."""
    started = init_process_group(device)
    try:
        yield is_initialized()
    finally:
        if started:
            destroy_process_group()


def shard(batch: Tensor) -> Tensor:
    """This rank's rows of a global batch: rows rank, rank + W, ... (W = world size), after
    repeating the batch's first rows to a multiple of W (as DistributedSampler pads), so every
    rank gets ceil(len / W) >= 1 rows. Without a process group, the batch itself."""
    world = world_size()
    if world == 1:
        return batch
    short = -len(batch) % world
    if short:
        batch = batch[torch.arange(len(batch) + short, device=batch.device) % len(batch)]
    return batch[rank() :: world]


def wrap(module: nn.Module, device: torch.device, static_graph: bool = False) -> nn.Module:
    """`DistributedDataParallel(module)` under a process group (gradients are averaged over
    ranks in backward; rank 0's weights and buffers are broadcast once here), else the module
    itself. `static_graph`: the same parameters take part in every step, some possibly none
    (the recommender's unused GPT-2 token table), which plain DDP rejects. Buffers are not
    re-broadcast each step: ours stay fixed in training (whitening, frozen item tables), and
    BatchTopK's threshold is only read in eval, where rank 0's is saved."""
    if not is_initialized():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        module, device_ids=ids, static_graph=static_graph, **_NO_FORWARD_BUFFER_SYNC
    )


# torch 2.13 renamed broadcast_buffers (and warns on it); the range in pyproject has both.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of a float `tensor` over ranks, in place; the tensor as is without a group."""
    if is_initialized():
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def all_reduce_min(tensor: Tensor) -> Tensor:
    """The elementwise minimum of `tensor` over ranks, in place."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (picklable objects; metrics dicts, stop decisions)."""
    if not is_initialized():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def resolve_device(spec: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cpu`, `cuda` and `cuda:N` are taken as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {spec!r} was requested but CUDA is not available here; use `auto` or `cpu`."
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) exist.")
    return device
