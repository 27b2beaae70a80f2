"""What a decode batch of B sequences costs against one (issue 20: 8 clients >= 4x one stream), in CPU time.

Two tables, both on one thread and timed by the calling thread's CPU clock (the kernels' pool runs a
one-thread job inline), so a busy machine changes them less than wall time:
  1. the int8 kernels at M rows (codegen._tileq up to 32, the GEMM past it) on SmolLM2's linear shapes
     (W4 g32 and row, sym, and the 8-bit 49152x576 head): microseconds a call and GMAC/s (the weights
     stay in cache: this is the kernels' compute, not DRAM);
  2. the engine's batched decode step at B = 1, 2, 4, 8, 16 sequences (ctx ~140, int8 activations, 8-bit
     head, fp16 KV) on MODEL: ms per step and per row. A 4x aggregate at 8 clients needs the 8-row step
     at <= 2x the one-row step (wall time, 2 threads: serve_load.py measures that).

    python benchmarks/batch_decode.py MODEL [--rows 1 2 4 8 16 32 64] [--batches 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch

import lowbit
from lowbit.formats import UniformQ
from lowbit.kernels.cpu import threads, uniform
from lowbit.runtime.engine import Segment, load_decoder

SHAPES = [(960, 576, 4, 32), (3072, 576, 4, 32), (576, 1536, 4, 32), (3072, 576, 4, -1), (49152, 576, 8, -1)]
KERNEL = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def cpu_seconds(fn, calls: int, rounds: int = 5) -> float:
    """Best of `rounds` of `calls` calls: this thread's CPU seconds per call."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - t0) / calls)
    return best


def kernels(rows: list[int]) -> None:
    print("| shape (N×K) bits group | " + " | ".join(f"M={m}" for m in rows) + " |")
    print("|---|" + "---|" * len(rows))
    g = torch.Generator().manual_seed(0)
    for n, k, bits, group in SHAPES:
        packed = uniform.prepare(UniformQ.from_float(torch.randn(n, k, generator=g), bits, group, True))
        cells = []
        for m in rows:
            x, y = torch.randn(m, packed.nblocks * 32), torch.empty(m, packed.n)
            addr, args = packed.native(m, int8=True)
            args.x, args.y = x.data_ptr(), y.data_ptr()
            call = KERNEL(addr)
            t = cpu_seconds(lambda: call(ctypes.addressof(args)), max(3, int(2e8 / (n * k * m))))
            cells.append(f"{t * 1e6:.1f} us, {n * k * m / t / 1e9:.0f} GMAC/s")
        print(f"| {n}×{k} b{bits} g{group} | " + " | ".join(cells) + " |", flush=True)


def steps(model_dir: str, batches: list[int], ctx: int = 140) -> None:
    model = lowbit.load(model_dir).model
    eng = load_decoder(model, max_context=1024, threads=1, slots=max(batches), int8_activations=True, head_bits=8)
    for s in range(max(batches)):
        eng.step([Segment(s, 0, list(range(1000, 1000 + ctx)), 1)])
    pos = ctx
    print("\n| B | ms per step | ms per row | step / one row's |\n|---|---|---|---|")
    one = None
    for b in batches:
        def step():
            nonlocal pos
            eng.step([Segment(s, pos, [5], 1) for s in range(b)])
            pos += 1
        t = cpu_seconds(step, 10, rounds=3)
        one = one or t
        print(f"| {b} | {t * 1e3:.2f} | {t / b * 1e3:.2f} | {t / one:.2f}× |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    a = ap.parse_args()
    threads.set_threads(1)
    kernels(a.rows)
    steps(a.model, a.batches)


if __name__ == "__main__":
    main()
