"""The performance model: tile sizes and thread count from cache sizes, vector width and threads.

Like QIGen's mem_model, it is a few explicit inequalities, not a search:

GEMV (one token) streams every weight once, so it is bandwidth-bound: each thread takes a contiguous
band of output rows (its bytes are one sequential stream) and the kernel walks `GEMV_ROWS` rows at a
time so each activation vector loaded from L1 feeds that many rows. Threads are only woken for
matrices big enough to pay for the wake-up (`MIN_BYTES_PER_THREAD`).

GEMM (many tokens) is compute-bound: a tile of NB rows × KC columns of W is dequantized to fp32 once
and reused by every token. With an MR × NR register-blocked micro-kernel (MR tokens, NR rows, MR·NR
vector accumulators, which the ISA's register file fixes):
  - the micro-kernel's activation panel MR × KC stays in L1:      MR·KC·4 ≤ L1 / 2
  - the dequantized W tile NB × KC stays in L2 across all tokens:  NB·KC·4 ≤ L2 / 2
  - KC is a multiple of 32 (a packing block), NB of NR, and NB is shrunk so every thread has work.
"""

from __future__ import annotations

from dataclasses import dataclass

from .isa import CPU

VECTOR_LANES = {"avx512vnni": 16, "avx512": 16, "avx2": 8, "scalar": 8}
MICRO_TILE = {"avx512vnni": (4, 4), "avx512": (4, 4), "avx2": (4, 3), "scalar": (2, 2)}  # (MR, NR)
GEMV_ROWS = 4
MIN_BYTES_PER_THREAD = 64 * 1024


@dataclass(frozen=True)
class Plan:
    threads: int
    nb: int  # GEMM: rows of W dequantized per tile
    kc: int  # GEMM: columns per tile (multiple of 32)


def plan(cpu: CPU, isa: str, n: int, k_padded: int, weight_bytes: int, m: int, threads: int) -> Plan:
    mr, nr = MICRO_TILE[isa]
    if m == 1:
        return Plan(max(1, min(threads, weight_bytes // MIN_BYTES_PER_THREAD)), GEMV_ROWS, k_padded)
    kc = max(32, min(k_padded, (cpu.l1d // 2) // (4 * mr) // 32 * 32))
    nb = max(nr, (cpu.l2 // 2) // (4 * kc) // nr * nr)
    per_thread = -(-n // threads)
    nb = min(nb, -(-per_thread // nr) * nr)
    return Plan(threads, nb, kc)
