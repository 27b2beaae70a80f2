"""Generated CPU kernels vs torch on SmolLM2-135M and Llama-2-7B matrix shapes (issue #4).

For each thread count: a STREAM-like read of a 1 GiB buffer (the faster of torch's sum and the
kernel library's own sequential read, `lb_read`) gives this run's DRAM bandwidth; then per shape and
batch: our time, bytes moved (packed weights + scales + zero points + activations in and out), GB/s
and % of that bandwidth, next to torch F.linear fp32/bf16 and torch's int4 CPU
kernel (`_weight_int4pack_mm_for_cpu`, 4-bit asym, same group) at the same threads. Batch 1 is
timed with fp32 activations and with int8 activations (`act`, see kernels/cpu/uniform.py).
Batch 128 is compute-bound: its GB/s only says how far from the memory limit it is, so no % is given;
it is timed on fp32 activations and on int8 (the prefill GEMM: u8 codes × s8 activations, VNNI
`vpdpbusd` where the CPU has it), and the int8 GEMM's rate is given as a share of this core's int8
peak, measured in the same run (`lb_int8_peak`: independent chains of the GEMM's own instruction).

Ours is timed as the decode engine calls it: the C kernel straight from prefilled Args
(`PackedUniform.native`) through ctypes, no Python wrapper. llama.cpp's own matmul runs in the same
run for Q4_0 / Q4_K / Q8_0 (benchmarks/peers/ggml_matmul.c: ggml_mul_mat on the CPU backend, weights
repacked as llama.cpp's loader does; n/a where ggml refuses the shape, e.g. K not a multiple of 256
for Q4_K, or where its scratch venv is missing: `python benchmarks/vs_llamacpp.py --build-only`).

Batch-1 weights stay in the L3 cache when one matrix is re-run ("hot"), which a real decode step never
sees: with --cold every batch-1 time rotates through copies of the weights totalling more than 2× L3
(ours, torch's and ggml's alike), so GB/s is against DRAM. Batch 128 is always hot.

THP_MEM_ALLOC_ENABLE=1 is set before torch is imported, so torch puts tensors of 2 MiB and more in
transparent huge pages (this VM's THP is in madvise mode; reads run ~1.5× faster than on 4 KiB pages);
ggml's weight buffer is madvised the same way.

A second table times the CodebookQ (LUT) kernels against the UniformQ kernel of the same bits (the
first of --bits) in the same run, shape by shape: tables per row (GANQ's format) and per group.

    python benchmarks/kernel_speed.py [--threads 1 2] [--bits 4 3 2] [--group 128] [--quick | --shapes 4096x4096 ...]
                                 [--batches 1 128] [--cold] [--tables uniform codebook] [--no-llamacpp]
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch is imported: see the docstring

import argparse  # noqa: E402
import copy  # noqa: E402
import ctypes  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lowbit.eval.bench import bandwidth  # noqa: E402
from lowbit.formats import CodebookQ, UniformQ  # noqa: E402
from lowbit.formats.packing import BLOCK  # noqa: E402
from lowbit import kernels  # noqa: E402
from lowbit.kernels.cpu import build, codebook, isa, perf_model, threads, uniform  # noqa: E402
from peers import ggml_matmul  # noqa: E402  (benchmarks/peers/ggml_matmul.py)

SMOL = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
LLAMA = [(4096, 4096), (11008, 4096), (4096, 11008)]
GGML = ("q4_0", "q4_K", "q8_0")
KERNEL = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # void lb_linear_*(lb_args *)


def l3_bytes() -> int:
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError):
        size = 0
    return size if size > 0 else 32 << 20


def timeit(*fns, min_time: float = 0.3, reps: int = 5) -> float:
    """Median seconds per call over `reps` runs of enough calls to last `min_time`, cycling through
    `fns` in order (copies of one weight: with enough of them no call finds its weights in cache)."""
    for fn in fns:
        fn()
    t0 = time.perf_counter()
    for fn in fns:
        fn()
    rounds = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(rounds):
            for fn in fns:
                fn()
        runs.append((time.perf_counter() - t0) / (rounds * len(fns)))
    return statistics.median(runs)


def copies(nbytes: int, cold: bool) -> int:
    """How many copies of a weight to rotate through: 1 (hot), else enough to total more than 2× L3."""
    return max(2, 2 * l3_bytes() // nbytes + 1) if cold else 1


def clones(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    """t and n - 1 copies of it in fresh memory (huge pages for >= 2 MiB, see THP_MEM_ALLOC_ENABLE)."""
    return [t] + [t.clone() for _ in range(n - 1)]


def ours(p: uniform.PackedUniform, m: int, n: int, int8: bool) -> tuple[list, list]:
    """Calls of our C kernel on m tokens from prefilled Args, one per copy of the packed weights; and
    what they point at (keep it alive while calling)."""
    x, y = torch.randn(m, p.nblocks * BLOCK), torch.empty(m, p.n)
    kernels.set_int8_activations(int8)
    calls, alive = [], [x, y]
    for i in range(n):
        q = p
        if i:
            q = copy.copy(p)
            for attr in q.WEIGHTS:
                if getattr(q, attr) is not None:
                    setattr(q, attr, getattr(q, attr).clone())
        addr, args = q.native(m)
        args.x, args.y = x.data_ptr(), y.data_ptr()
        calls.append(functools.partial(KERNEL(addr), ctypes.addressof(args)))
        alive += [q, args]
    kernels.set_int8_activations(False)
    return calls, alive


def int4pack(w: torch.Tensor, group: int):
    """torch's int4 CPU kernel on the same weights (4-bit asym, its own packing): (call(x, packed),
    packed weights), or None."""
    try:
        k = w.shape[1]
        qt = UniformQ.from_float(w, 4, group, False)
        codes = qt.codes().to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        s = qt.scales.float().t()
        z = (-(qt.zeros.float().t() - 8) * s)  # torch's form: w = (q - 8)·s + z
        sz = torch.stack([s, z], -1).contiguous()
        fn = lambda x, packed: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)  # noqa: E731
        fn(torch.randn(1, k), packed)
        return fn, packed
    except (RuntimeError, AttributeError):
        return None


def torch_times(w: torch.Tensor, m: int, cold: bool, group: int) -> tuple[float, float, float | None]:
    """Seconds of torch F.linear fp32, bf16 and its int4 kernel (None without one) on m tokens."""
    x = torch.randn(m, w.shape[1])
    out = []
    for wt, xt in ((w, x), (w.bfloat16(), x.bfloat16())):
        ws = clones(wt, copies(wt.nbytes, cold))
        out.append(timeit(*(functools.partial(F.linear, xt, wi) for wi in ws)))
    i4 = int4pack(w, group)
    if i4 is None:
        return out[0], out[1], None
    fn, packed = i4
    ws = clones(packed, copies(packed.nbytes, cold))
    return out[0], out[1], timeit(*(functools.partial(fn, x, wi) for wi in ws))


def llamacpp(shape: tuple[int, int], t: int, batches: list[int], cold: bool) -> dict:
    """{type: {m: ms}} of llama.cpp's matmul (None where ggml refuses the shape); {} without the peer."""
    out = {}
    for qtype in GGML:
        r = ggml_matmul.measure(*shape, qtype, t, batches, 2 * l3_bytes() if cold else 0)
        if r is None:
            return {}
        out[qtype] = {"info": r.get("info", {})}
        for m in batches:
            run = r.get(m)
            out[qtype][m] = None if run is None else run["cold_ms" if cold and m == 1 else "hot_ms"]
    return out


def random_codebook(shape: tuple[int, int], bits: int, group: int) -> CodebookQ:
    n, k = shape
    groups = 1 if group == -1 else -(-k // group)
    return CodebookQ.from_indices(torch.randint(0, 2**bits, shape), torch.randn(n, groups, 2**bits) / k**0.5,
                                  bits, group)


def codebook_table(packed: dict, luts: dict, bits: int, group: int, batches: list[int], bw: float,
                   cold: bool) -> None:
    """LUT GEMV/GEMM (tables per row and per group) vs the UniformQ kernel (both on fp32 activations),
    timed back to back; with `cold`, batch 1 rotates through weight copies as in the uniform table."""
    print(f"\n{bits}-bit CodebookQ (LUT) vs UniformQ g{group} sym, same run, {'cold' if cold else 'hot'}\n")
    print(f"| shape (N×K) | batch | uniform ms | LUT per-row ms | LUT / uniform | LUT GB/s | % of DRAM bw | "
          f"LUT g{group} ms | LUT g{group} / uniform | uniform int8-act ms | LUT per-row / uniform int8-act |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, (rows, groups) in luts.items():
        p = packed[(shape, bits)]
        for m in batches:
            runs = [ours(q, m, copies(q.bytes, cold and m == 1), int8)
                    for q, int8 in ((p, False), (rows, False), (groups, False), (p, m == 1))]
            base, lut, lutg, base8 = (timeit(*calls) for calls, _ in runs)
            moved = rows.bytes + 4 * m * sum(shape)
            print(f"| {shape[0]}×{shape[1]} | {m} | {base * 1e3:.3f} | {lut * 1e3:.3f} | {lut / base:.2f}× | "
                  f"{moved / lut / 1e9:.1f} | {f'{100 * moved / lut / bw:.0f}%' if m == 1 else '—'} | "
                  f"{lutg * 1e3:.3f} | {lutg / base:.2f}× | {base8 * 1e3:.3f} | {lut / base8:.2f}× |", flush=True)


def int8_peak() -> float:
    """GOP/s of one core's int8 multiply-adds (2 ops each) with the GEMM's own instruction, best of 3."""
    lib = build.load(isa.selected())
    fn = getattr(lib, "lb_int8_peak", None) if lib is not None else None
    if fn is None:
        return float("nan")
    fn.restype, fn.argtypes = ctypes.c_longlong, [ctypes.c_longlong]
    steps, lanes = 20_000_000, perf_model.VECTOR_LANES[isa.selected()]
    fn(1000)
    best = min(_thread_seconds(fn, steps) for _ in range(3))
    return steps * 12 * 4 * lanes * 2 / best / 1e9


def _thread_seconds(fn, *args) -> float:
    t0 = time.thread_time()
    fn(*args)
    return time.thread_time() - t0


def ms(sec: float | None) -> str:
    return "n/a" if sec is None else f"{sec * 1e3:.3f}"


def uniform_table(packed: dict, weights: dict, args, t: int, bw: float) -> None:
    """Ours (fp32 and int8 activations at batch 1) next to torch and llama.cpp, per shape and batch."""
    peak = int8_peak()
    print(f"int8 multiply-add peak of one core ({isa.selected()}): {peak:.0f} GOP/s\n")
    print("| shape (N×K) | batch | bits | act | ours ms | bytes moved | GB/s | % of DRAM bw (batch 1) / rate | torch fp32 ms | "
          "torch bf16 ms | torch int4 ms | llama.cpp Q4_0 ms | Q4_K ms | Q8_0 ms | bf16 / ours | ours / Q4_0 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    buffers = {}
    for shape, w in weights.items():
        n, k = shape
        peer = {} if args.no_llamacpp else llamacpp(shape, t, args.batches, args.cold)
        for qtype, r in peer.items():
            buffers[qtype] = r["info"].get("buffer", r["info"].get("error", "?"))
        for m in args.batches:
            cold = args.cold and m == 1
            fp32, bf16, int4 = torch_times(w, m, cold, args.group)
            ggml = [peer.get(q, {}).get(m) for q in GGML]
            ggml = [None if v is None else v / 1e3 for v in ggml]
            for bits, act in [(b, a) for b in args.bits for a in ("fp32", "int8")] if m == 1 \
                    else [(args.bits[0], "fp32"), (args.bits[0], "int8")]:
                p = packed[(shape, bits)]
                if act == "int8" and p.qfn is None:
                    continue
                calls, alive = ours(p, m, copies(p.bytes, cold), act == "int8")
                sec = timeit(*calls)
                del calls, alive
                moved = p.bytes + 4 * m * (k + n)
                ratio = f"{sec / ggml[0]:.2f}×" if bits == 4 and ggml[0] else "—"
                gops = 2 * m * n * k / sec / 1e9
                share = f"{100 * moved / sec / bw:.0f}%" if m == 1 else \
                    f"{gops:.0f} GOP/s, {100 * gops / (peak * t):.0f}% of int8 peak" if act == "int8" else f"{gops:.0f} GFLOP/s"
                print(f"| {n}×{k} | {m} | {bits} | {act} | {ms(sec)} | {moved / 1e6:.2f} MB | "
                      f"{moved / sec / 1e9:.1f} | {share} | "
                      f"{ms(fp32)} | {ms(bf16)} | {ms(int4)} | {' | '.join(ms(v) for v in ggml)} | "
                      f"{bf16 / sec:.2f}× | {ratio} |", flush=True)
    if buffers:
        print("\nllama.cpp buffers: " + ", ".join(f"{q} {b}" for q, b in buffers.items()))
    elif not args.no_llamacpp:
        print(f"\nllama.cpp: n/a, no ggml under {ggml_matmul.PEERS / 'llamacpp'} "
              "(python benchmarks/vs_llamacpp.py --build-only builds it)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes and 4096x4096 only")
    ap.add_argument("--shapes", nargs="+", metavar="NxK", help="these shapes only, e.g. 4096x4096 11008x4096")
    ap.add_argument("--cold", action="store_true", help="batch 1 rotates through weight copies > 2x L3 (DRAM)")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp's matmul")
    ap.add_argument("--tables", nargs="+", choices=["uniform", "codebook"], default=["uniform", "codebook"])
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes \
        else SMOL + (LLAMA[:1] if args.quick else LLAMA)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = isa.detect()
    l3 = l3_bytes()
    print(f"commit {commit}, ISA {isa.selected()}, {cpu.cores} physical cores, L1d {cpu.l1d >> 10} KiB, "
          f"L2 {cpu.l2 >> 10} KiB, L3 {l3 >> 20} MiB, torch {torch.__version__}, group {args.group}, sym, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}; batch 1 "
          + (f"cold: rotating through weight copies > {2 * l3 >> 20} MiB" if args.cold else "hot: one weight, re-run"))
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
            codebook_table(packed, luts, args.bits[0], args.group, args.batches, bw, args.cold)
        if "uniform" in args.tables:
            uniform_table(packed, weights, args, t, bw)


if __name__ == "__main__":
    main()
