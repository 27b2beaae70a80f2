"""The kernel registry: (QTensor kind, device type) -> linear(x, qt, bias).

Generated CPU kernels and GPU kernels register here for the kinds they support; anything not
registered runs the reference kernel, so every format always works, only at different speeds.
A kernel may also register a `prepare(qt)` step that builds its own layout of the weights once (at
load time, cached by QuantLinear) and returns a callable `(x, bias) -> y`, or None to decline.
`use_reference()` or LOWBIT_KERNELS=reference forces the reference everywhere (tests, benchmarks).
"""

from collections.abc import Callable

import torch

from .. import settings
from ..formats import QTensor
from . import reference

Kernel = Callable[[torch.Tensor, QTensor, torch.Tensor | None], torch.Tensor]
Bound = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
REGISTRY: dict[tuple[str, str], Kernel] = {}
PREPARE: dict[tuple[str, str], Callable[[QTensor], Bound | None]] = {}
_state = {"reference": settings.reference_kernels(), "generation": 0}


def register(kind: str, device: str, prepare: Callable[[QTensor], Bound | None] | None = None
             ) -> Callable[[Kernel], Kernel]:
    def add(fn: Kernel) -> Kernel:
        REGISTRY[(kind, device)] = fn
        PREPARE.pop((kind, device), None)
        if prepare is not None:
            PREPARE[(kind, device)] = prepare
        _state["generation"] += 1
        return fn
    return add


def use_reference(on: bool = True) -> None:
    """Route every call to the reference kernel (on=True) or back to the registered kernels."""
    _state["reference"] = on
    _state["generation"] += 1


def generation() -> int:
    """Changes whenever the choice of kernel may have changed: prepared layers must be rebuilt."""
    return _state["generation"]


def lookup(kind: str, device: str) -> Kernel:
    if _state["reference"]:
        return reference.linear
    return REGISTRY.get((kind, device), reference.linear)


def prepare(qt: QTensor, device: str) -> Bound:
    """`linear` bound to `qt`, with whatever the chosen kernel precomputes done now, once."""
    if not _state["reference"] and REGISTRY.get((qt.kind, device)) is not None:
        prep = PREPARE.get((qt.kind, device))
        bound = prep(qt) if prep is not None else None
        if bound is not None:
            return bound
    fn = lookup(qt.kind, device)
    return lambda x, bias=None: fn(x, qt, bias)


def linear(x: torch.Tensor, qt: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return lookup(qt.kind, x.device.type)(x, qt, bias)


from . import cpu  # noqa: E402  (registers the generated CPU kernels)
from . import gpu  # noqa: E402  (registers the Triton kernels; imports triton only on first use)
