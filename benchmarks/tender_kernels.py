"""Tender's integer kernel (kernels/cpu/c/tender.h) vs our weight-only int8 kernels on SmolLM2's shapes (issue 17).

Per shape (N×K of SmolLM2-135M's linears) and rows m (1: decode; 128 and 512: prefill), the W·A·
kernel on per-channel weights (W4-row, W8-row; the reference's weights) and on W4-g128, with Tender
activations at G = 8 (channel groups drawn as a calibration would leave them: a few loud channels in the
top groups), next to the weight-only UniformQ kernels on int8 activations per 32-block (W4-g32,
W8-g32: what `generate` runs). Best wall time of `--reps` calls, each kernel called as the layer calls
it (Python wrapper included). Prefill rows give int8 GOP/s (2·m·N·K / time) and the share of the
cores' int8 multiply-add peak measured in the same run (benchmarks/kernel_speed.int8_peak, times threads).

    python benchmarks/tender_kernels.py [--threads 1 2] [--rows 1 128 512] [--reps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from kernel_speed import int8_peak
from lowbit import kernels
from lowbit.formats import UniformQ
from lowbit.formats.activation import ActQ
from lowbit.kernels.cpu import isa, tender, uniform

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down


def spec(k: int, groups: int = 8, seed: int = 0) -> ActQ:
    """A Tender spec as calibration leaves it: channel maxima log-normal, groups by the thresholds."""
    g = torch.Generator().manual_seed(seed)
    maxima = torch.exp(torch.randn(k, generator=g) * 1.2)
    tmax = float(maxima.max())
    group = torch.clamp(torch.ceil(torch.log2(maxima / tmax) + groups - 1), 0, groups - 1)
    order = torch.argsort(group, stable=True)
    return ActQ("tender", 8, k, groups, 1, torch.zeros(k), order.to(torch.int32),
                group[order].to(torch.uint8), maxima[order])


def best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 128, 512])
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    peak = int8_peak()
    print(f"ISA {isa.selected()}; int8 multiply-add peak of one core: {peak:.0f} GOP/s\n")
    print("| threads | N×K | m | tender W4-row | tender W8-row | tender W4-g128 | int8 W4-g32 | int8 W8-g32 | "
          "W4-row / W4-g32 | W8-row / W8-g32 | tender W4-row GOP/s (% peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    kernels.set_int8_activations(True)
    for t in a.threads:
        kernels.set_threads(t)
        for n, k in SHAPES:
            w, act = torch.randn(n, k), spec(k)
            layers = {"t4": tender.prepare(UniformQ.from_float(w, 4, -1, True), act),
                      "t8": tender.prepare(UniformQ.from_float(w, 8, -1, True), act),
                      "t4g": tender.prepare(UniformQ.from_float(w, 4, 128, True), act),
                      "u4": uniform.prepare(UniformQ.from_float(w, 4, 32, True)),
                      "u8": uniform.prepare(UniformQ.from_float(w, 8, 32, True))}
            for m in a.rows:
                x = torch.randn(m, k)
                s = {name: best(lambda f=f: f(x), a.reps if m < 512 else max(3, a.reps // 4)) for name, f in layers.items()}
                gops = 2 * m * n * k / s["t4"] / 1e9
                rate = f"{gops:.0f} ({100 * gops / (peak * t):.0f}%)" if m > 1 else "—"
                print(f"| {t} | {n}×{k} | {m} | " + " | ".join(f"{s[q] * 1e3:.3f}" for q in layers)
                      + f" | {s['t4'] / s['u4']:.2f} | {s['t8'] / s['u8']:.2f} | {rate} |", flush=True)


if __name__ == "__main__":
    main()
