"""RTN accuracy on the embedded SmolLM2-135M: perplexity, KLD, size and bits per weight per scheme.

Evaluates every window of the built-in held-out split (ctx 512, disjoint windows) against the source.
Usage: python benchmarks/rtn_accuracy.py [--schemes W8-g128 W4-g128 ...] [--max-windows N]
"""

import argparse
import copy
import time


import lowbit
from common import start
from lowbit.eval import evaluate, model_size
from lowbit.recipes import scheme_fields


def parse(scheme: str) -> lowbit.RTN:
    """'W4-g128[-asym][-clip]' -> RTN config: a scheme string (recipes/scheme.py), `-clip` for mse_clip."""
    return lowbit.RTN(**scheme_fields(scheme.removesuffix("-clip")), mse_clip=scheme.endswith("-clip"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", nargs="+", default=["W8-g128", "W4-g32", "W4-g128", "W4-g128-clip",
                                                      "W3-g128", "W3-g128-clip", "W2-g64-clip"])
    ap.add_argument("--max-windows", type=int)
    ap.add_argument("--ctx", type=int, default=512)
    a = ap.parse_args()
    src, text = start()
    base = evaluate(src.model, src.tokenizer, text, a.ctx, max_windows=a.max_windows, progress=False)
    print(f"source: ppl {base.ppl:.4f} on {base.tokens} tokens ({base.windows} windows of {a.ctx})")
    print("| scheme | ppl | Δppl | KLD (nats/tok) | bpw (quantized layers) | model bytes | quantize s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| fp32 source | {base.ppl:.4f} | — | 0 | 32 | {model_size(src.model).total_bytes:,} | — |")
    for scheme in a.schemes:
        t = time.perf_counter()
        q = lowbit.quantize(copy.deepcopy(src.model), parse(scheme), progress=False)
        took = time.perf_counter() - t
        r = evaluate(q.model, src.tokenizer, text, a.ctx, max_windows=a.max_windows, source=src.model, progress=False)
        size = q.size()
        print(f"| RTN {scheme} | {r.ppl:.4f} | {100 * (r.ppl / base.ppl - 1):+.2f}% | {r.kld:.5f} | "
              f"{size.quantized_bpw:.3f} | {size.total_bytes:,} | {took:.1f} |", flush=True)
        del q


if __name__ == "__main__":
    main()
