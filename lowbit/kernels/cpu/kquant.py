"""KQuant (GGUF K-quants) on the CPU: the file's own blocks, read in place by c/kquant.h.

Nothing is repacked: the kernels decode each 256-weight super-block in registers as they stream it
(a super-block is 84-210 contiguous bytes of one row, already one sequential run), so the layer
costs exactly the GGUF tensor's bytes, and the decode engine copies them into its huge-page arena
like any packed layer (`WEIGHTS`). The drivers, plans and `native` interface are UniformQ's; the
entry points are the kernel table's kquant rows: int8 activations (x rounded to s8 per 32-block,
integer dots) where the int8 switch is on, as the decode engine runs by default, else fp32.
"""

from __future__ import annotations

import ctypes

from ...formats.kquant import KQuant
from ...formats.packing import BLOCK
from .uniform import PackedUniform, entry_point
from .uniform import prepare as _prepare


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
