"""Read and replace a recommender's hidden state at one layer, through forward hooks.

Layer l (1-based) is the output of decoder block l. For l < L this equals
`hidden_states[l]` of a forward pass with output_hidden_states=True; for the last layer
`transformers` reports `hidden_states[L]` after the final norm, while the hook sees the block
output before it. Edits are spliced into the model's own forward pass, so every later block,
the final norm, the user head and the scores see the replaced state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from recsae_pipeline.models.recommender import Recommender


def layer_block(model: Recommender, layer: int) -> nn.Module:
    """Decoder block `layer` (1-based) of the model's backbone."""
    layers = model.config.num_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= layers:
        raise ValueError(f"layer={layer!r}; pick 1..{layers} (1 = output of the first block)")
    return model.layers[layer - 1]


def _hidden_of(output: Tensor | tuple) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def read_hidden(model: Recommender, items: Tensor, layer: int) -> Tensor:
    """Block `layer`'s output [B, T, hidden] for right-padded items [B, T], without grad.

    Runs the model's full forward pass in its current mode (call `.eval()` for deterministic
    states); an active `edit_hidden` at the same layer shows in what is read.
    """
    captured: list[Tensor] = []

    def read(module: nn.Module, inputs: tuple, output: Tensor | tuple) -> None:
        captured.append(_hidden_of(output))

    handle = layer_block(model, layer).register_forward_hook(read)
    try:
        model(items)
    finally:
        handle.remove()
    return captured[0]


@contextmanager
def edit_hidden(model: Recommender, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While active, block `layer`'s output h [B, T, hidden] is replaced by fn(h) in every pass.

    fn sees padding positions too; under causal attention they never reach a real position.
    The hook is prepended so that `transformers`' own hidden_states recording (installed at
    the first forward) sees the replacement; it is removed on exit, also after an error.
    """
    block = layer_block(model, layer)

    def replace(module: nn.Module, inputs: tuple, output: Tensor | tuple) -> Tensor | tuple:
        hidden = _hidden_of(output)
        edited = fn(hidden)
        if edited.shape != hidden.shape:
            raise ValueError(
                f"edit_hidden at layer {layer}: fn returned shape {tuple(edited.shape)}, the "
                f"hidden state has {tuple(hidden.shape)}; fn must keep the shape"
            )
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    handle = block.register_forward_hook(replace, prepend=True)
    try:
        yield
    finally:
        handle.remove()
