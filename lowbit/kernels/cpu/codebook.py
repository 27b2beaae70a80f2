"""CodebookQ on the CPU through the generated kernels: a PackedUniform whose dequantization is a lookup.

The indices are packed like UniformQ codes, so the layer keeps the same repacked codes, plans and
calls; the C reads the codebooks [N, G, 2^b] (fp16, or T16 records: `t16`) through CodebookQ's own
block of lb_args (`lut`, c/args.h) and turns each group's table into registers once (the kernel
table's codebook rows, see codegen.py). Sparse outliers go along as CSR (values widened to fp32 once
here) and each thread adds its band's rows after the dense part. `set_int8_activations` does not
apply: the fp16 tables meet fp32 activations, and the T16 tables of AVX2's 4-bit GEMV meet x rounded
to int16 per 32-block (15 bits, see codegen; the row's activations say "int16-T16").
"""

from __future__ import annotations

import ctypes

import torch

from ...formats import CodebookQ
from .. import reference
from . import codegen
from .uniform import PackedUniform, entry_point
from .uniform import prepare as _prepare


def t16(codebook: torch.Tensor) -> torch.Tensor:
    """[N, G, 16] tables -> T16 records [N, G, T16_WORDS] (as int16 words): the low bytes of the
    entries rounded to int16 at scale max|T| / 2^14, their high bytes, then the fp32 scale."""
    t = codebook.float()
    scale = t.abs().amax(-1, keepdim=True) / 2**14
    v = torch.round(t / torch.where(scale > 0, scale, torch.ones_like(scale))).to(torch.int16)
    lo, hi = (v & 0xFF).to(torch.uint8), ((v >> 8) & 0xFF).to(torch.uint8)
    record = torch.cat([lo, hi, scale.contiguous().view(torch.uint8)], -1)
    assert record.shape[-1] == 2 * codegen.T16_WORDS
    return record.contiguous().view(torch.int16)


class PackedCodebook(PackedUniform):
    """A CodebookQ in the SIMD layout of one ISA, callable as linear(x, bias). Built once per layer."""

    WEIGHTS = ("qweight", "lut", "orp", "ocol", "oval")

    def __init__(self, qt: CodebookQ, isa: str, lib: ctypes.CDLL):
        self._layout(qt, isa)
        table16 = codegen.table16(isa, qt.bits)
        self.lut = t16(qt.codebook) if table16 else qt.codebook.to(torch.float16).contiguous()
        self.orp = self.ocol = self.oval = None
        if qt.has_outliers:
            self.orp = qt.outlier_rowptr.to(torch.int32).contiguous()
            self.ocol = qt.outlier_cols.to(torch.int32).contiguous()
            self.oval = qt.outlier_values.to(torch.float32).contiguous()
        self.fn, self.qfn = entry_point(lib, isa, qt, "int16-T16" if table16 else "fp32"), None

    def _weights(self) -> dict[str, int | None]:
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        return {"qw": self.qweight.data_ptr(), "lut": self.lut.data_ptr(), "orp": ptr(self.orp),
                "ocol": ptr(self.ocol), "oval": ptr(self.oval)}


def prepare(qt: CodebookQ, isa: str | None = None) -> PackedCodebook | None:
    """The packed layer for the best ISA this CPU runs (or `isa`); None when no kernel can be built."""
    return _prepare(qt, isa, PackedCodebook)


def linear(x: torch.Tensor, qt: CodebookQ, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One-off call (repacks every time): for callers without a place to keep the packed layer."""
    packed = prepare(qt)
    return packed(x, bias) if packed is not None else reference.linear(x, qt, bias)
