"""What Tender's channel order costs the integer kernel on grouped weights (issue 17): padding and per-call time.

Since 5850ebe the fitting orders a layer's channels by (weight group, activation group, channel), so that
every weight group keeps its column set and Tender's weights are the weight-only model's (methods/tender.py).
The kernel (kernels/cpu/tender.py) lays out each weight group as runs of one activation group, each run
padded to whole units (4 positions; 8 for codes of <= 4 bits) and the row to 16: sorted by group alone
(the order before), a weight group held one or two groups' runs; now it holds every group its columns have.

Quantizes SmolLM2-135M (RTN W4-g128, Tender A8 at each G, `--calib`, `--samples` x 512 tokens), then per G:
(1) the positions the kernel pads (kp − K summed over every layer) and its runs, both orders; (2) one
block's gate_proj (576→1536) and down_proj (1536→576) in both orders, called alternately in one process
at `--threads` threads: per call, the median over `--reps` rounds of the calling thread's CPU time
(time.thread_time: a loaded machine moves it less than wall time; at 1 thread the kernel runs there) for
decode (m = 1) and prefill (m = `--rows`).

    python benchmarks/tender_layout.py [--groups 8 16] [--calib pydoc] [--samples 8] [--layer 15] [--rows 128] [--reps 30]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import lowbit
from common import start
from lowbit import kernels
from lowbit.formats.activation import ActQ
from lowbit.kernels.cpu import tender
from lowbit.nn import ActQuantLinear


def by_group_alone(act: ActQ) -> ActQ:
    """The same channels and groups in the order before 5850ebe: sorted by group alone (stable)."""
    perm = act.perm.long()
    natural = {}
    for name in ("group", "bias", "maxima"):
        natural[name] = torch.empty_like(getattr(act, name))
        natural[name][perm] = getattr(act, name)
    order = torch.sort(natural["group"], stable=True).indices
    return ActQ("tender", act.bits, act.in_features, act.groups, act.chunk, natural["bias"][order],
                order.to(torch.int32), natural["group"][order], natural["maxima"][order])


def per_call(fns: dict, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median CPU seconds per call of each fn(x), the fns called in turn each round."""
    for fn in fns.values():
        fn(x)
    t0 = time.thread_time()
    fns[next(iter(fns))](x)
    inner = max(1, int(0.02 / max(time.thread_time() - t0, 1e-6)))  # about 20 ms of calls per round
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.thread_time()
            for _ in range(inner):
                fn(x)
            times[name].append((time.thread_time() - t0) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--calib", default="pydoc")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--layer", type=int, default=15, help="the block whose gate_proj and down_proj are timed")
    ap.add_argument("--rows", type=int, default=128, help="prefill rows")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    src, _ = start(f"RTN W4-g128 A8 tender; calibration {a.calib}, {a.samples} x 512 tokens; kernel threads {a.threads}")
    for groups in a.groups:
        cfg = lowbit.RTN(bits=4, group_size=128, act_bits=8, act_groups=groups)
        q = lowbit.quantize(copy.deepcopy(src.model), cfg, a.calib, tokenizer=src.tokenizer, calib_samples=a.samples,
                            progress=False)
        layers = {n: m for n, m in q.model.named_modules() if isinstance(m, ActQuantLinear)}
        count = {"now": [0, 0, 0], "alone": [0, 0, 0]}  # K, padded positions, runs
        for m in layers.values():
            for order, act in (("now", m.act), ("alone", by_group_alone(m.act))):
                packed = tender.prepare(m.qtensor, act)
                count[order] = [c + d for c, d in zip(count[order], (packed.k, packed.kp - packed.k, len(packed.runs)))]
        k = count["now"][0]
        print(f"\nG{groups}: {len(layers)} layers, {k} input positions in all; padded: by weight group then group "
              f"{count['now'][1]} ({100 * count['now'][1] / k:.1f}%, {count['now'][2]} runs), by group alone "
              f"{count['alone'][1]} ({100 * count['alone'][1] / k:.1f}%, {count['alone'][2]} runs)")
        print("| layer | N×K | m | by weight group, then group (µs CPU) | by group alone (µs CPU) | ratio |\n|---|---|---|---|---|---|")
        kernels.set_threads(a.threads)
        for name in ("mlp.gate_proj", "mlp.down_proj"):
            m = layers[f"model.layers.{a.layer}.{name}"]
            fns = {"now": tender.prepare(m.qtensor, m.act), "alone": tender.prepare(m.qtensor, by_group_alone(m.act))}
            n, kk = m.qtensor.shape
            for rows in (1, a.rows):
                t = per_call(fns, torch.randn(rows, kk), a.reps)
                print(f"| {a.layer}.{name} | {n}×{kk} | {rows} | {t['now'] * 1e6:.1f} | {t['alone'] * 1e6:.1f} | "
                      f"{t['now'] / t['alone']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
