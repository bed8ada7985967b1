"""Item sequences -> model inputs: right-padded batches and the leave-one-out evaluation split."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

Split = Literal["valid", "test"]


def pad_right(sequences: list[np.ndarray], length: int | None = None) -> Tensor:
    """An int64 [len(sequences), length] tensor, each row its sequence followed by zeros."""
    length = max((len(s) for s in sequences), default=0) if length is None else length
    padded = np.zeros((len(sequences), length), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = sequence
    return torch.from_numpy(padded)


def split_examples(
    sequences: list[np.ndarray], split: Split, max_len: int
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """(inputs cut to max_len, targets, full histories) for the validation or test split."""
    if split not in ("valid", "test"):
        raise ValueError(f"split={split!r}; use 'valid' or 'test'")
    end = -2 if split == "valid" else -1
    histories = [s[:end] for s in sequences]
    targets = np.array([s[end] for s in sequences], dtype=np.int64)
    return [h[-max_len:] for h in histories], targets, histories
