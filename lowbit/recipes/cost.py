"""What a candidate costs on one layer: exact bytes and bits per weight, and decode time on this machine.

Bytes are the format's own: the stored tensors its `layout` lists for the layer's shape (codes,
fp16 scales, uint8 zero points, fp16 codebooks; GANQ's outliers at its ratio: row pointers plus a column
and a value per kept weight), so bpw = 8 · bytes / (N · K) is what `lowbit inspect` will print.
A 4-bit g128 symmetric layer is 4 + 16/128 = 4.125 bpw, asymmetric 4 + 24/128 = 4.1875.

Decode time: one token's matmul (a GEMV) streams every weight byte once and is bandwidth-bound
(kernels/cpu/perf_model.py), so
    seconds = bytes / bandwidth(t),   t = the threads perf_model.plan wakes for this layer
(from the machine's cache sizes and its `lowbit tune` constants: a small layer runs on one thread), with
bandwidth(t) this machine's DRAM read rate on t threads, measured once (eval.bench.bandwidth).
Projections the engine fuses (q/k/v, gate/up: same UniformQ layout) are one matmul: their bytes
add into one stream, which may wake more threads than each would alone.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..eval.bench import bandwidth
from ..formats import KINDS
from ..formats.packing import BLOCK
from ..kernels.cpu import isa as isa_mod
from ..kernels.cpu import perf_model
from ..methods import MethodConfig

BANDWIDTH_GIB = 0.25  # buffer for the bandwidth measurement: far larger than any cache, a second to read


def meta(spec: MethodConfig, shape: tuple[int, int]) -> dict:
    """The stored meta a candidate gives a layer of `shape` (for its format's layout)."""
    if spec.name == "ganq":
        return {"kind": "codebook", "bits": spec.bits, "group_size": spec.group_size, "shape": list(shape),
                "outliers": spec.outlier_ratio > 0}
    return {"kind": "uniform", "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
            "shape": list(shape)}


def stored_bytes(spec: MethodConfig, shape: tuple[int, int]) -> int:
    """Exact bytes of the tensors a candidate stores for a layer of `shape` [out, in]."""
    m = meta(spec, shape)
    total = 0
    for fixed, dtype, required in KINDS[m["kind"]].layout(m).values():
        if required and fixed is not None:
            total += math.prod(fixed) * dtype.itemsize
    if m.get("outliers"):  # variable-length CSR: one int32 column and one fp16 value per kept weight
        total += round(spec.outlier_ratio * shape[0] * shape[1]) * (4 + 2)
    return total


def bits_per_weight(spec: MethodConfig, shape: tuple[int, int]) -> float:
    return 8 * stored_bytes(spec, shape) / (shape[0] * shape[1])


@dataclass(frozen=True)
class Machine:
    """This machine as the cost model sees it: its CPU, ISA, threads, and read bandwidth per thread count."""
    cpu: isa_mod.CPU
    isa: str
    threads: int
    bandwidth: tuple[float, ...]  # bytes/s reading on 1, 2, ... `threads` threads

    def seconds(self, nbytes: int, rows: int, cols: int) -> float:
        """Time of one token's matmul over `nbytes` of weights [rows, cols]."""
        padded = -(-cols // BLOCK) * BLOCK
        woken = perf_model.plan(self.cpu, self.isa, rows, padded, nbytes, 1, self.threads).threads
        return nbytes / self.bandwidth[woken - 1]


@functools.lru_cache(maxsize=None)
def this_machine(threads: int | None = None) -> Machine:
    """Measure this machine's bandwidth on 1..threads threads (default: the kernels' count), once per process."""
    from_torch = torch.get_num_threads()
    threads = threads or from_torch
    try:
        rates = tuple(bandwidth(t, BANDWIDTH_GIB) for t in range(1, threads + 1))
    finally:
        torch.set_num_threads(from_torch)
    return Machine(isa_mod.detect(), isa_mod.selected(), threads, rates)
