"""Torch helpers the model tests share: the CPU device, one intra-op thread, and a tiny local
Llama checkpoint to build teachers from (no download)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import LlamaModel

CPU = torch.device("cpu")


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models train several times faster on one thread, most of all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_llama_checkpoint(
    path: Path, *, num_layers: int, intermediate_size: int, vocab_size: int
) -> LlamaModel:
    """A randomly initialised 16-wide Llama (2 heads) saved to `path`, as `from_pretrained`
    reads it; returns the model to compare loaded weights with."""
    from transformers import LlamaConfig, LlamaModel  # only here: conftest imports this module

    model = LlamaModel(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=vocab_size,
            bos_token_id=None,
            eos_token_id=None,
        )
    )
    model.save_pretrained(path)
    return model
