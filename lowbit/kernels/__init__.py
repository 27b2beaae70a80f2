"""The kernel registry: a QTensor and a device -> the row of the kernel table (table.py) it runs.

`prepare(qt, device)` (`prepare_act(qt, act, device)` for W·A· layers) builds the chosen row's layout of the weights once (at load time, cached by
QuantLinear) and returns a callable `(x, bias) -> y`; anything without a row (or whose row declines,
e.g. without a C compiler) runs the reference kernel, so every format always works, only at
different speeds. The process-wide switches live in switches.py: `use_reference()` (or
LOWBIT_KERNELS=reference) forces the reference everywhere (tests, benchmarks),
`set_int8_activations()` picks the int8 rows (GEMV and GEMM), `set_threads()` sizes the CPU
kernels' pool. `describe_table()` and `kernel_for(qt)` say what runs natively on this machine.
"""

import torch

from ..formats import QTensor
from ..formats.activation import ActQ
from . import reference, switches, table
from .cpu import tender
from .cpu.threads import set_threads
from .switches import generation, set_int8_activations, use_reference

Bound = table.Bound


def prepare(qt: QTensor, device: str) -> Bound:
    """`linear` bound to `qt`, with whatever the chosen kernel precomputes done now, once."""
    row = None if switches.reference() else table.select(qt, device)
    bound = None if row is None else row.prepare(qt)
    return bound if bound is not None else lambda x, bias=None: reference.linear(x, qt, bias)


def prepare_act(qt: QTensor, act: ActQ, device: str) -> Bound:
    """A W·A· layer (weights `qt`, input quantized by `act`) bound: the integer kernel (cpu/tender.py)
    where this CPU and the act method have one, else the fake-quantized input through `prepare(qt)`."""
    if not switches.reference() and device == "cpu":
        bound = tender.prepare(qt, act)
        if bound is not None:
            return bound
    weights = prepare(qt, device)
    return lambda x, bias=None: weights(act.fake_quantize(x).to(x.dtype), bias).reshape(*x.shape[:-1], qt.shape[0])


def linear(x: torch.Tensor, qt: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One-off call (prepares every time): for callers without a place to keep the prepared layer."""
    return prepare(qt, x.device.type)(x, bias)


def kernel_for(qt: QTensor, device: str = "cpu") -> str:
    """The name of the table row `qt` runs on `device` on this machine now, or "reference"."""
    row = None if switches.reference() else table.select(qt, device)
    return row.name if row is not None and row.available() else "reference"


def describe_table() -> list[dict]:
    """Every row of the kernel table: kind, bits, isa, activations, symbol, device, and whether this
    machine runs it (`available`)."""
    return [{"kind": r.kind, "bits": r.bits, "isa": r.isa, "activations": r.activations, "symbol": r.symbol,
             "device": r.device, "available": r.available()} for r in table.ROWS]


__all__ = ["Bound", "describe_table", "generation", "kernel_for", "linear", "prepare", "prepare_act", "reference",
           "set_int8_activations", "set_threads", "use_reference"]
