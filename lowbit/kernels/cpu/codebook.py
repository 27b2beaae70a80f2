"""CodebookQ on the CPU through the generated kernels: a PackedUniform whose dequantization is a lookup.

The indices are packed like UniformQ codes, so the layer keeps the same repacked codes, plans and
calls; the C reads the fp16 codebooks [N, G, 2^b] through the pointer that carries UniformQ's scales
and turns each group's table into registers once (`lb_linear_lut_b{bits}`, see codegen.py). Sparse
outliers go along as CSR (values widened to fp32 once here) and each thread adds its band's rows
after the dense part. There is no int8-activation variant: the tables are fp16, so activations stay
fp32 whatever `set_int8_activations` says.
"""

from __future__ import annotations

import ctypes

import torch

from ...formats import CodebookQ
from .. import reference
from .uniform import PackedUniform
from .uniform import prepare as _prepare


class PackedCodebook(PackedUniform):
    """A CodebookQ in the SIMD layout of one ISA, callable as linear(x, bias). Built once per layer."""

    WEIGHTS = ("qweight", "scales", "orp", "ocol", "oval")

    def __init__(self, qt: CodebookQ, isa: str, lib: ctypes.CDLL):
        self._layout(qt, isa)
        self.scales = qt.codebook.to(torch.float16).contiguous()  # the tables, where UniformQ has scales
        self.zeros, self.zdef, self.qfn = None, 0, None
        self.orp = self.ocol = self.oval = None
        if qt.has_outliers:
            self.orp = qt.outlier_rowptr.to(torch.int32).contiguous()
            self.ocol = qt.outlier_cols.to(torch.int32).contiguous()
            self.oval = qt.outlier_values.to(torch.float32).contiguous()
        self.fn = getattr(lib, f"lb_linear_lut_b{qt.bits}")

    def _call(self, m: int, bias: torch.Tensor | None, int8: bool | None = None):
        fn, args = super()._call(m, bias, int8)
        if self.orp is not None:
            args.orp, args.ocol, args.oval = self.orp.data_ptr(), self.ocol.data_ptr(), self.oval.data_ptr()
        return fn, args


def prepare(qt: CodebookQ, isa: str | None = None) -> PackedCodebook | None:
    """The packed layer for the best ISA this CPU runs (or `isa`); None when no kernel can be built."""
    return _prepare(qt, isa, PackedCodebook)


def linear(x: torch.Tensor, qt: CodebookQ, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One-off call (repacks every time): for callers without a place to keep the packed layer."""
    packed = prepare(qt)
    return packed(x, bias) if packed is not None else reference.linear(x, qt, bias)
