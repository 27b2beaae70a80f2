"""How many threads the generated kernels use: $LOWBIT_THREADS, else the physical cores.

Every loaded kernel library has its own pool (see c/pool.h); `set_threads` resizes all of them.
"""

from __future__ import annotations

import ctypes

from ... import settings
from .isa import detect

_threads: int | None = None
_libs: list[ctypes.CDLL] = []


def get() -> int:
    global _threads
    if _threads is None:
        _threads = max(1, settings.threads() or detect().cores)
    return _threads


def set_threads(n: int) -> None:
    """Use `n` threads (the caller included) from now on."""
    global _threads
    _threads = max(1, int(n))
    for lib in _libs:
        lib.lb_set_threads(_threads, -1)


def apply(lib: ctypes.CDLL) -> None:
    """Size a freshly loaded library's pool (once per library)."""
    if lib not in _libs:
        _libs.append(lib)
        lib.lb_set_threads(get(), -1)
