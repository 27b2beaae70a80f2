"""KQuant (GGUF K-quants) on the CPU: the file's own blocks, read in place by c/kquant.h.

Nothing is repacked: the kernels decode each 256-weight super-block in registers as they stream it
(a super-block is 84-210 contiguous bytes of one row, already one sequential run), so the layer
costs exactly the GGUF tensor's bytes, and the decode engine copies them into its huge-page arena
like any packed layer (`WEIGHTS`). The drivers, plans and `native` interface are UniformQ's; the
entry points are the kernel table's kquant rows: int8 activations (x rounded to s8 per 32-block,
integer dots) where the int8 switch is on, as the decode engine runs by default, else fp32.
The int8 rows round x as llama.cpp's K-quant dots do (q8_K: per 256, `quantize_activations`), not per
32 as UniformQ's: that keeps every sum of a super-block in integers (c/kquant.h says why).
"""

from __future__ import annotations

import ctypes

import torch

from ...formats.kquant import QK_K, KQuant
from ...formats.packing import BLOCK
from .uniform import PackedUniform, entry_point
from .uniform import prepare as _prepare


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """What the int8 rows compute with, in float: x (a multiple of 256 wide) rounded to s8 per 256,
    scale amax/127, round half to even."""
    xb = x.float().unflatten(-1, (-1, QK_K))
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).flatten(-2)


class PackedKQuant(PackedUniform):
    """A KQuant's blocks as the kernels read them, callable as linear(x, bias)."""

    WEIGHTS = ("blocks",)

    def __init__(self, qt: KQuant, isa: str, lib: ctypes.CDLL):
        n, k = qt.shape
        self.isa, self.n, self.k = isa, n, k
        self.nblocks, self.groups = k // BLOCK, 1
        self.bpg = self.nblocks
        self.blocks = qt.blocks.contiguous()
        self._plans = {}
        self.fn, self.qfn = entry_point(lib, isa, qt, "fp32"), entry_point(lib, isa, qt, "int8")

    def _weights(self) -> dict[str, int | None]:
        return {"qw": self.blocks.data_ptr()}


def prepare(qt: KQuant, isa: str | None = None) -> PackedKQuant | None:
    """The packed layer for the best ISA this CPU runs (or `isa`); None when no kernel can be built."""
    return _prepare(qt, isa, PackedKQuant)
