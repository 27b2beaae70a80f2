"""Unquantized layers (fp16 weights) on the CPU through the generated kernels.

The decode engine runs a float model (a source scored for KL divergence, `lowbit generate` of a
model left in float, a head kept as stored) with the same drivers as a quantized one: the GEMV
streams fp16 rows and converts them in registers, and the GEMM converts a tile of rows to fp32 once
and reuses it for every token through the register-blocked fp32 micro-kernels (codegen._float16),
instead of one dot product per token and row. Rows are zero-padded to whole 32-column blocks, the
stride every kernel expects of x.
"""

from __future__ import annotations

import ctypes

import torch

from ...formats.packing import BLOCK
from . import codegen
from .uniform import PackedUniform
from .uniform import prepare as _prepare


class PackedFloat16(PackedUniform):
    """fp16 weights [N, K] as the float16 kernel reads them, callable as linear(x, bias)."""

    WEIGHTS = ("qweight",)

    def __init__(self, weight: torch.Tensor, isa: str, lib: ctypes.CDLL):
        n, k = weight.shape
        self.isa, self.n, self.k = isa, n, k
        self.nblocks, self.groups = -(-k // BLOCK), 1
        self.bpg = self.nblocks
        self.qweight = torch.nn.functional.pad(weight.detach().to(torch.float16), (0, self.nblocks * BLOCK - k)).contiguous()
        self._plans = {}
        self.fn, self.qfn = getattr(lib, codegen.entry(isa, codegen.FLOAT16, 16, "fp32").symbol), None

    def _weights(self) -> dict[str, int | None]:
        return {"qw": self.qweight.data_ptr()}


def prepare(weight: torch.Tensor, isa: str | None = None) -> PackedFloat16 | None:
    """The packed layer for the best ISA this CPU runs (or `isa`); None when no kernel can be built."""
    return _prepare(weight, isa, PackedFloat16)
