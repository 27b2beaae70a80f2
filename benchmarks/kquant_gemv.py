"""Per-call speed of the K-quant int8 GEMV (kernels/cpu/c/kquant.h) at TinyLlama-1.1B's shapes (issue 19).

Each kernel is called as the decode engine calls it (one token, int8 activations: the C entry from
prefilled Args through ctypes, no Python wrapper), on weights rotated through copies totalling more
than --mib MiB so every call streams them from DRAM, as a decode step does. Per type and shape: the
best and median wall µs per call over --reps rounds, the median CPU µs (the process's CPU time per
call: on a shared machine it leaves out the time the kernel was not running), and GB/s of weight bytes
at the median wall time. A Q8_0 layer (UniformQ 8-bit g32 sym, the engine's fastest streaming kernel)
of each shape runs in the same process as the yardstick: the last column is the K-quant's bytes per
CPU second over Q8_0's, which a loaded machine moves far less than either number alone. Blocks are llama.cpp's K-quants of random rows (io/kquants.quantize)
repeated to the shape.

    python benchmarks/kquant_gemv.py [--threads 1 2] [--types Q4_K Q5_K Q6_K] [--shapes 2048x2048 ...]
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch: weights in huge pages, as the engine's arena

import argparse  # noqa: E402
import ctypes  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from gguf import GGMLQuantizationType as GGML  # noqa: E402

from lowbit.formats import KQuant, UniformQ  # noqa: E402
from lowbit.formats.kquant import TYPES  # noqa: E402
from lowbit.io.kquants import quantize  # noqa: E402
from lowbit.kernels.cpu import kquant, threads, uniform  # noqa: E402

SHAPES = ["2048x2048", "5632x2048", "2048x5632", "32000x2048"]  # q/o, gate/up, down, head


def layer(qtype: str, n: int, k: int, seed: int):
    """A packed layer of n×k: K-quant blocks of 64 random rows repeated, or Q8_0 (qtype "Q8_0")."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, k, generator=g) * 0.02
    if qtype == "Q8_0":
        qt = UniformQ.from_float(w, 8, 32, sym=True)
        qt = UniformQ(qt.qweight.repeat(-(-n // 64), 1)[:n], qt.scales.repeat(-(-n // 64), 1)[:n], None, 8, 32, (n, k))
        return uniform.prepare(qt)
    blocks = torch.from_numpy(quantize(w, GGML[qtype])[0]).repeat(-(-n // 64), 1)[:n].contiguous()
    return kquant.prepare(KQuant(blocks, qtype, (n, k)))


def time_calls(packs: list, k: int, reps: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds per call (CPU: this process's, all its threads), one per round; a round
    calls every copy once."""
    x = torch.randn(k)
    calls = []
    for p in packs:
        fn, args = p._call(1, None, True)
        y = torch.empty(p.n)
        args.x, args.y = x.data_ptr(), y.data_ptr()
        calls.append((fn, ctypes.byref(args), y))
    for fn, a, _ in calls:
        fn(a)
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        for fn, a, _ in calls:
            fn(a)
        wall.append((time.perf_counter() - t) / len(calls))
        cpu.append((time.process_time() - c) / len(calls))
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--types", nargs="+", default=["Q4_K", "Q5_K", "Q6_K"], choices=list(TYPES))
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--mib", type=int, default=192, help="weights each timing rotates through (> the L3)")
    a = ap.parse_args()
    print("| threads | shape | type | best µs | median µs | median CPU µs | GB/s | vs Q8_0 |\n|---|---|---|---|---|---|---|---|")
    for nthr in a.threads:
        threads.set_threads(nthr)
        for shape in a.shapes:
            n, k = map(int, shape.split("x"))
            rate = {}
            for qtype in ["Q8_0", *a.types]:
                first = layer(qtype, n, k, 0)
                copies = [first] + [layer(qtype, n, k, i) for i in range(1, max(2, (a.mib << 20) // first.bytes + 1))]
                t, cpu = time_calls(copies, k, a.reps)
                rate[qtype] = first.bytes / statistics.median(cpu)
                vs = "" if qtype == "Q8_0" else f"{rate[qtype] / rate['Q8_0']:.2f}"
                print(f"| {nthr} | {shape} | {qtype} | {min(t) * 1e6:.0f} | {statistics.median(t) * 1e6:.0f} | "
                      f"{statistics.median(cpu) * 1e6:.0f} | {first.bytes / statistics.median(t) / 1e9:.1f} | {vs} |", flush=True)
                del copies, first


if __name__ == "__main__":
    main()
