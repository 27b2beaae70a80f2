"""The kernel registry: (QTensor kind, device type) -> linear(x, qt, bias).

Generated CPU kernels and GPU kernels register here for the kinds they support; anything not
registered runs the reference kernel, so every format always works, only at different speeds.
"""

from collections.abc import Callable

import torch

from ..formats import QTensor
from . import reference

Kernel = Callable[[torch.Tensor, QTensor, torch.Tensor | None], torch.Tensor]
REGISTRY: dict[tuple[str, str], Kernel] = {}


def register(kind: str, device: str) -> Callable[[Kernel], Kernel]:
    def add(fn: Kernel) -> Kernel:
        REGISTRY[(kind, device)] = fn
        return fn
    return add


def lookup(kind: str, device: str) -> Kernel:
    return REGISTRY.get((kind, device), reference.linear)


def linear(x: torch.Tensor, qt: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return lookup(qt.kind, x.device.type)(x, qt, bias)
