"""A network's parameters as one flat vector, and the modes the code that works on them needs.

MC-SGD stores its solutions (w_hat, w_bar) as flat vectors in the layout of
``torch.nn.utils.parameters_to_vector(net.parameters())``; the line gradient, EWC's Fisher and the
linear-path analysis move between that layout and the network. They all take the helpers here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@torch.no_grad()
def load_flat(net: nn.Module, vector: Tensor) -> None:
    """Copy a flat parameter vector into ``net``'s parameters (copies, never shares storage)."""
    offset = 0
    for p in net.parameters():
        p.copy_(vector[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


class Unflatten:
    """Split a flat parameter vector into ``{name: view}`` in ``module.parameters()`` order, the
    parameter dict ``torch.func.functional_call`` takes."""

    def __init__(self, module: nn.Module) -> None:
        named = list(module.named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]

    def __call__(self, flat: Tensor) -> dict[str, Tensor]:
        chunks = flat.split(self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}


def outside_inference(t: Tensor) -> Tensor:
    """A tensor usable by autograd even if it was made under ``torch.inference_mode`` (Lightning
    runs validation and some hooks in it, and its tensors cannot be saved for backward)."""
    return t.clone() if t.is_inference() else t


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run a block with ``module`` in eval mode (dropout off), then restore every submodule's mode."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)
