"""Every environment variable lowbit reads, in one place, and the cache directory they point at.

    LOWBIT_CACHE      cache root (else $XDG_CACHE_HOME/lowbit, else ~/.cache/lowbit): the converted
                      default model, compiled kernels, tuned constants
    LOWBIT_KERNELS    "reference": every matmul runs the pure-torch oracle (tests, benchmarks)
    LOWBIT_ISA        the CPU kernels' instruction set (avx512vnni, avx512, avx2, scalar); default: the best
    LOWBIT_THREADS    threads of the generated kernels; default: the physical cores
    LOWBIT_INT8_ACT   1: UniformQ matmuls on int8 activations outside the engine too
    LOWBIT_EVAL_CACHE_MB  the most MiB that cached source scores of evaluations keep (eval/source_cache.py;
                      default 4096, least recently used removed first)
    CC                the C compiler for generated kernels (else cc, gcc or clang on PATH)

Read when asked (not at import), so a test or a caller that sets a variable sees it take effect.
"""

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("LOWBIT_CACHE"):
        return Path(os.environ["LOWBIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowbit"


def reference_kernels() -> bool:
    return os.environ.get("LOWBIT_KERNELS", "").lower() == "reference"


def isa() -> str | None:
    return os.environ.get("LOWBIT_ISA") or None


def threads() -> int | None:
    value = os.environ.get("LOWBIT_THREADS")
    return int(value) if value else None


def eval_cache_mb() -> float:
    return float(os.environ.get("LOWBIT_EVAL_CACHE_MB") or 4096)


def int8_activations() -> bool:
    return os.environ.get("LOWBIT_INT8_ACT", "") not in ("", "0")


def c_compiler() -> str | None:
    return os.environ.get("CC") or None
