"""Triton kernels vs torch fp16 F.linear on Llama-2-7B matrix shapes, one CUDA GPU (issue #6).

Per shape (N×K) and batch: the GPU time of our kernel (UniformQ 4-bit g128 asym, CodebookQ 4-bit and
3-bit per-row), of torch F.linear on the fp16 weight, the speedup, and GB/s over the bytes the kernel
must move (packed weights + scales/zeros/codebooks + activations in and out) against the device's
measured copy bandwidth. Times are medians of triton.testing.do_bench, which flushes the L2 cache
before every call (a 4-bit 4096×4096 weight, 8 MB, would otherwise sit in the H100's 50 MB L2).
`--candidates` also times other decode-kernel layouts and K splits at batch 1 (the best one shown).

    python benchmarks/gpu_kernels.py [--batches 1 16 128] [--shapes 0 1 2] [--candidates]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from lowbit.formats import CodebookQ, UniformQ
from lowbit.formats.packing import packed_words
from lowbit.kernels.gpu.triton_linear import TritonLinear, gemv_config

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K) = (out, in)


def random_qtensor(fmt: str, n: int, k: int, dev) -> UniformQ | CodebookQ:
    """Random codes and parameters built on the GPU: timing needs the layout, not a real weight."""
    kind, bits = fmt.split("-")[0], int(fmt.split("-")[1][0])
    words = torch.randint(-2**31, 2**31, (n, packed_words(k, bits)), dtype=torch.int64, device=dev)
    qweight = words.to(torch.int32)
    if kind == "uniform":
        groups = -(-k // 128)
        return UniformQ(qweight, (torch.rand(n, groups, device=dev) * 0.01).half(),
                        torch.randint(0, 2**bits, (n, groups), dtype=torch.uint8, device=dev), bits, 128, (n, k))
    return CodebookQ(qweight, torch.randn(n, 1, 2**bits, device=dev).half(), bits, -1, (n, k))


def gpu_bytes(lin: TritonLinear, m: int, x_size: int) -> int:
    tensors = [lin.qweight, lin.scales if not lin.codebook else lin.table] + \
        ([lin.zeros] if lin.zeros is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors) + x_size * 2 * m + lin.n * 2 * m


def bench(fn) -> float:
    """Median µs of `fn` (do_bench flushes the L2 cache before every call)."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def copy_bandwidth(dev) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    a = torch.empty(2**29, dtype=torch.float16, device=dev)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3)


# decode-kernel layouts tried at batch 1 next to the default: (rows per program, blocks per K step, warps)
CANDIDATES = {False: [(256, 1, 2), (256, 2, 2), (128, 1, 1), (128, 2, 1), (512, 2, 4)],
              True: [(64, 1, 2), (128, 1, 4), (32, 1, 1)]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    ap.add_argument("--formats", nargs="+", default=["uniform-4bit-g128", "codebook-4bit-row",
                                                     "codebook-3bit-row", "uniform-3bit-g128"])
    ap.add_argument("--shapes", type=int, nargs="+", default=[0, 1, 2], help="indices into SHAPES")
    ap.add_argument("--candidates", action="store_true", help="also time CANDIDATES × splits at batch 1")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bw = copy_bandwidth(dev)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s; do_bench medians, L2 flushed before each call")
    print("| format | N×K | batch | ours µs | torch fp16 µs | speedup | ours GB/s | % of copy bw | best tried |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, fmt in itertools.product(args.shapes, args.formats):
        n, k = SHAPES[i]
        lin = TritonLinear(random_qtensor(fmt, n, k, dev))
        w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        for m in args.batches:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ours = bench(lambda lin=lin, x=x: lin(x))
            ref = bench(lambda x=x, w=w: F.linear(x, w))
            best = ""
            if args.candidates and m == 1:
                auto = gemv_config(m, n, lin.blocks, lin.codebook, lin.sms)["SPLIT"]
                tried = {}
                for (bn, nblk, warps), split in itertools.product(CANDIDATES[lin.codebook], (1, 8, 16)):
                    cfg = {"BN": bn, "NBLK": nblk, "num_warps": warps, "SPLIT": split}
                    tried[(bn, nblk, warps, split)] = bench(lambda lin=lin, x=x, cfg=cfg: lin(x, **cfg))
                cfg, us = min(tried.items(), key=lambda kv: kv[1])
                best = f"{us:.1f} µs at BN,NBLK,warps,SPLIT={cfg} (default split {auto})"
            gbs = gpu_bytes(lin, m, k) / (ours * 1e-6) / 1e9
            print(f"| {fmt} | {n}×{k} | {m} | {ours:.1f} | {ref:.1f} | {ref / ours:.2f}× | {gbs:.0f} | "
                  f"{100 * gbs * 1e9 / bw:.0f}% | {best} |", flush=True)


if __name__ == "__main__":
    main()
