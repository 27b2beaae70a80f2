"""What this CPU can run: instruction-set flags, cache sizes and physical cores, read once.

Linux exposes all of it under /proc and /sys; elsewhere we assume nothing (scalar code, typical
caches, os.cpu_count() threads) rather than guess an ISA that might fault.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from ... import settings

# Best first. Each ISA needs all of its flags (as /proc/cpuinfo spells them).
ISA_FLAGS = {
    "avx512vnni": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "fma", "f16c"),
    "avx2": ("avx2", "fma", "f16c"),
    "scalar": (),
}


@dataclass(frozen=True)
class CPU:
    flags: frozenset[str]
    l1d: int  # bytes, per core
    l2: int  # bytes, per core
    cores: int  # physical cores available to this process

    def supports(self, isa: str) -> bool:
        return set(ISA_FLAGS[isa]) <= self.flags

    @property
    def best_isa(self) -> str:
        return next(isa for isa in ISA_FLAGS if self.supports(isa))


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cache_size(level: int, kind: str, default: int) -> int:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")) if base.is_dir() else ():
        try:
            if int((idx / "level").read_text()) == level and (idx / "type").read_text().strip() in kind:
                text = (idx / "size").read_text().strip()
                return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
        except (OSError, ValueError):
            continue
    return default


def _physical_cores(info: str) -> int:
    """Distinct (physical id, core id) pairs among the CPUs we may run on; SMT siblings count once."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores, cpu, phys = set(), None, "0"
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            cpu, phys = int(value), "0"
        elif key == "physical id":
            phys = value
        elif key == "core id" and cpu in allowed:
            cores.add((phys, value))
    return max(1, min(len(cores) or len(allowed), len(allowed)))


@functools.lru_cache(maxsize=None)
def detect() -> CPU:
    info = _cpuinfo()
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    return CPU(frozenset(flags), _cache_size(1, "Data", 32 * 1024), _cache_size(2, "Unified", 512 * 1024),
               _physical_cores(info))


def selected() -> str:
    """The ISA to run: $LOWBIT_ISA if set (it must be one this CPU supports), else the best one."""
    want = settings.isa()
    if not want:
        return detect().best_isa
    if want not in ISA_FLAGS or not detect().supports(want):
        raise ValueError(f"LOWBIT_ISA={want!r}: this CPU runs {[i for i in ISA_FLAGS if detect().supports(i)]}")
    return want
