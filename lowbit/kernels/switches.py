"""The kernels' process-wide choices, kept in one place (set through `lowbit.kernels`).

    reference   every matmul on the pure-torch oracle: use_reference(); $LOWBIT_KERNELS=reference
    int8        UniformQ GEMVs and GEMMs on activations rounded to int8 per 32-block (the kernel
                table's "int8" rows): set_int8_activations(); $LOWBIT_INT8_ACT=1
    isa         the CPU kernels' instruction set: cpu/isa.selected() ($LOWBIT_ISA, read when asked)
    threads     the kernels' pool: cpu/threads.set_threads() ($LOWBIT_THREADS)
The environment is read by lowbit/settings.py, once here at import. Switching the reference path
bumps `generation`, so prepared layers (nn.QuantLinear) are rebuilt; the int8 switch is read per call
(and by the engine when it installs its layers), so `int8_activations_set` scopes it to a with-block.
"""

import contextlib

from .. import settings

_state = {"reference": settings.reference_kernels(), "int8": settings.int8_activations(), "generation": 0}


def use_reference(on: bool = True) -> None:
    """Route every call to the reference kernel (on=True) or back to the kernel table."""
    _state["reference"] = on
    _state["generation"] += 1


def reference() -> bool:
    return _state["reference"]


def set_int8_activations(on: bool = True) -> None:
    """UniformQ GEMVs and GEMMs on int8 activations (on) or fp32 (off, the default: exact x)."""
    _state["int8"] = on


def int8_activations() -> bool:
    return _state["int8"]


@contextlib.contextmanager
def int8_activations_set(on: bool):
    """set_int8_activations(on) inside the with-block; the previous choice again after it."""
    before = _state["int8"]
    _state["int8"] = on
    try:
        yield
    finally:
        _state["int8"] = before


def generation() -> int:
    """Changes whenever the choice of kernel may have changed: prepared layers must be rebuilt."""
    return _state["generation"]
