"""Generated CPU kernels vs torch on SmolLM2-135M and Llama-2-7B matrix shapes (issue #4).

For each thread count: a STREAM-like read of a 1 GiB buffer gives this run's DRAM bandwidth; then
per shape and batch: our time, bytes moved (packed weights + scales + zero points + activations in
and out), GB/s and % of that bandwidth, next to torch F.linear fp32/bf16 and torch's int4 CPU
kernel (`_weight_int4pack_mm_for_cpu`, 4-bit asym, same group) at the same threads. Batch 1 is
timed with fp32 activations and with int8 activations (`act`, see kernels/cpu/uniform.py).
Batch 128 is compute-bound: its GB/s only says how far from the memory limit it is, so no % is given.

A second table times the CodebookQ (LUT) kernels against the UniformQ kernel of the same bits (the
first of --bits) in the same run, shape by shape: tables per row (GANQ's format) and per group.

    python benchmarks/kernels.py [--threads 1 2] [--bits 4 3 2] [--group 128] [--quick]
                                 [--tables uniform codebook]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from lowbit.eval.bench import bandwidth
from lowbit.formats import CodebookQ, UniformQ
from lowbit.kernels.cpu import codebook, isa, threads, uniform

SMOL = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
LLAMA = [(4096, 4096), (11008, 4096), (4096, 11008)]


def timeit(fn, min_time: float = 0.3, reps: int = 5) -> float:
    """Median seconds per call over `reps` runs of enough calls to last `min_time`."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    calls = max(1, int(min_time / max(once, 1e-6)))
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls)
    return statistics.median(runs)


def int4pack(w: torch.Tensor, group: int):
    """torch's int4 CPU kernel on the same weights (4-bit asym, its own packing), or None."""
    try:
        n, k = w.shape
        qt = UniformQ.from_float(w, 4, group, False)
        codes = qt.codes().to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        s = qt.scales.float().t()
        z = (-(qt.zeros.float().t() - 8) * s)  # torch's form: w = (q - 8)·s + z
        sz = torch.stack([s, z], -1).contiguous()
        fn = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)  # noqa: E731
        fn(torch.randn(1, k))
        return fn
    except (RuntimeError, AttributeError):
        return None


def random_codebook(shape: tuple[int, int], bits: int, group: int) -> CodebookQ:
    n, k = shape
    groups = 1 if group == -1 else -(-k // group)
    return CodebookQ.from_indices(torch.randint(0, 2**bits, shape), torch.randn(n, groups, 2**bits) / k**0.5,
                                  bits, group)


def codebook_table(packed: dict, luts: dict, bits: int, group: int, batches: list[int], bw: float) -> None:
    """LUT GEMV/GEMM (tables per row and per group) vs the UniformQ kernel, timed back to back."""
    print(f"\n{bits}-bit CodebookQ (LUT) vs UniformQ g{group} sym, same run\n")
    print(f"| shape (N×K) | batch | uniform ms | LUT per-row ms | LUT / uniform | LUT GB/s | % of DRAM bw | "
          f"LUT g{group} ms | LUT g{group} / uniform |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, (rows, groups) in luts.items():
        p = packed[(shape, bits)]
        for m in batches:
            x = torch.randn(m, shape[1])
            base, lut, lutg = (timeit(lambda q=q, x=x: q(x)) for q in (p, rows, groups))
            moved = rows.bytes + 4 * m * sum(shape)
            print(f"| {shape[0]}×{shape[1]} | {m} | {base * 1e3:.3f} | {lut * 1e3:.3f} | {lut / base:.2f}× | "
                  f"{moved / lut / 1e9:.1f} | {f'{100 * moved / lut / bw:.0f}%' if m == 1 else '—'} | "
                  f"{lutg * 1e3:.3f} | {lutg / base:.2f}× |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes and 4096x4096 only")
    ap.add_argument("--tables", nargs="+", choices=["uniform", "codebook"], default=["uniform", "codebook"])
    args = ap.parse_args()
    shapes = SMOL + (LLAMA[:1] if args.quick else LLAMA)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = isa.detect()
    print(f"commit {commit}, ISA {isa.selected()}, {cpu.cores} physical cores, L1d {cpu.l1d >> 10} KiB, "
          f"L2 {cpu.l2 >> 10} KiB, torch {torch.__version__}, group {args.group}, sym")
    weights = {shape: torch.randn(shape) / shape[1] ** 0.5 for shape in shapes}
    packed = {(shape, bits): uniform.prepare(UniformQ.from_float(w, bits, args.group, True))
              for shape, w in weights.items() for bits in args.bits}
    luts = {shape: tuple(codebook.prepare(random_codebook(shape, args.bits[0], g)) for g in (-1, args.group))
            for shape in shapes} if "codebook" in args.tables else {}
    for t in args.threads:
        threads.set_threads(t)
        torch.set_num_threads(t)
        bw = bandwidth(t)
        print(f"\n### {t} thread{'s' * (t > 1)}: STREAM-like read {bw / 1e9:.1f} GB/s\n")
        if "codebook" in args.tables:
            codebook_table(packed, luts, args.bits[0], args.group, args.batches, bw)
        if "uniform" not in args.tables:
            continue
        print("| shape (N×K) | batch | bits | act | ours ms | bytes moved | GB/s | % of DRAM bw | torch fp32 ms | "
              "torch bf16 ms | torch int4 ms | bf16 / ours |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for shape, w in weights.items():
            n, k = shape
            wb = w.bfloat16()
            i4 = int4pack(w, args.group)
            for m in args.batches:
                x = torch.randn(m, k)
                xb = x.bfloat16()
                fp32 = timeit(lambda: F.linear(x, w))
                bf16 = timeit(lambda: F.linear(xb, wb))
                int4 = timeit(lambda: i4(x)) if i4 is not None else None
                for bits, act in [(b, a) for b in args.bits for a in ("fp32", "int8")] if m == 1 \
                        else [(args.bits[0], "fp32")]:
                    p = packed[(shape, bits)]
                    uniform.set_int8_activations(act == "int8")
                    ours = timeit(lambda: p(x))
                    uniform.set_int8_activations(False)
                    moved = p.bytes + 4 * m * (k + n)
                    print(f"| {n}×{k} | {m} | {bits} | {act} | {ours * 1e3:.3f} | {moved / 1e6:.2f} MB | "
                          f"{moved / ours / 1e9:.1f} | {f'{100 * moved / ours / bw:.0f}%' if m == 1 else '—'} | "
                          f"{fp32 * 1e3:.3f} | {bf16 * 1e3:.3f} | {'n/a' if i4 is None else f'{int4 * 1e3:.3f}'} | "
                          f"{bf16 / ours:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
