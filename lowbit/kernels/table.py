"""The kernel table, in the spirit of ggml's type_traits: one row per (format kind, bits, ISA,
activations) with the kernel's symbol and the step that prepares a layer for it.

The rows are not written here: they are the generators' own lists, so a new entry point is a new row
with nothing else to edit. CPU rows: `codegen.entries(isa)` (what the generated library for `isa`
exports: UniformQ on fp32 and int8 activations, CodebookQ on fp32 or, AVX2's 4-bit tables, int16)
for every ISA of `isa.ISA_FLAGS`, best first; GPU rows: `gpu.ENTRIES` (Triton). A row's `prepare(qt,
isa)` builds the layer in the row's layout once, callable as (x, bias) -> y, or returns None (no
compiler): the registry (kernels/__init__.py) then runs the reference.

Which row a QTensor runs (`select`): its kind and bits on the device's ISA (CPU: `isa.selected()`,
the best this CPU runs or $LOWBIT_ISA; CUDA: Triton where it is installed); of those, the int8 row
when the int8 switch is on (kernels/switches.py), else the other one. The activations name what the
codes meet, in the GEMV (one token) and the GEMM (several) alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..formats import QTensor
from . import gpu, switches
from .cpu import build, codebook, codegen, isa as isa_mod, kquant, uniform

Bound = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
PREPARE: dict[tuple[str, str], Callable[[QTensor, str], Bound | None]] = {
    ("cpu", "uniform"): uniform.prepare, ("cpu", "codebook"): codebook.prepare, ("cpu", "kquant"): kquant.prepare,
    ("cuda", "uniform"): gpu.prepare, ("cuda", "codebook"): gpu.prepare}


@dataclass(frozen=True)
class Row:
    kind: str  # the QTensor kind (formats.KINDS)
    bits: int
    isa: str  # a CPU ISA (cpu/isa.py) or "triton"
    activations: str  # fp32, int8, int16-T16 (codegen.ACTIVATIONS) or float (Triton: x's own dtype)
    symbol: str  # the C entry point (void symbol(lb_args *)) or the Triton kernels
    device: str  # the torch device type whose tensors it multiplies

    @property
    def name(self) -> str:
        return f"{self.kind}-b{self.bits}-{self.isa}-{self.activations}"

    def prepare(self, qt: QTensor) -> Bound | None:
        return PREPARE[self.device, self.kind](qt, self.isa)

    def available(self) -> bool:
        """Whether this machine runs it: the CPU has the ISA and a C compiler is there; or Triton and a GPU."""
        if self.device == "cpu":
            return isa_mod.detect().supports(self.isa) and build.compiler() is not None
        return gpu.AVAILABLE and torch.cuda.is_available()


ROWS: tuple[Row, ...] = (
    tuple(Row(e.kind, e.bits, isa, e.activations, e.symbol, "cpu") for isa in isa_mod.ISA_FLAGS for e in codegen.entries(isa))
    + tuple(Row(e.kind, e.bits, gpu.ISA, e.activations, e.symbol, "cuda") for e in gpu.ENTRIES))


def device_isa(device: str) -> str | None:
    """The ISA whose rows run on `device` here: the CPU's selected one, Triton on CUDA, else None."""
    if device == "cpu":
        return isa_mod.selected()
    return gpu.ISA if device == "cuda" and gpu.AVAILABLE else None


def rows(kind: str, bits: int, isa: str | None) -> list[Row]:
    return [r for r in ROWS if (r.kind, r.bits, r.isa) == (kind, bits, isa)]


def select(qt: QTensor, device: str) -> Row | None:
    """The row `qt` runs on `device` now (see the module's notes), or None: the reference."""
    found = [r for r in rows(qt.kind, qt.bits, device_isa(device)) if r.activations != "tender"]
    int8 = [r for r in found if r.activations == "int8"]
    rest = [r for r in found if r.activations != "int8"]
    return (int8 if switches.int8_activations() and int8 else rest or [None])[0]
