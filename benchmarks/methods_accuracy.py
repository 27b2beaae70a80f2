"""Calibrated methods vs RTN on the embedded SmolLM2-135M: perplexity, KLD and quantization time.

Same calibration data (built-in calibration split), same held-out evaluation text (ctx 512) for all.
Usage: python benchmarks/methods_accuracy.py [--schemes W3-g128 W4-g128] [--methods rtn gptq awq ...]
       [--samples 32] [--seq-len 512] [--max-windows N] [--signround-iters 200] [--teq-steps 200]
       [--ganq-iters 10] [--ganq-outlier-ratio 0] [--no-kld]      (ganq runs per-row or per-group codebooks: W3-row)
"""

import argparse

import lowbit
from _setup import add_options, quantize_and_score
from common import start
from lowbit.eval import evaluate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", nargs="+", default=["W3-g128", "W4-g128"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq", "teq", "signround"])
    add_options(ap)
    ap.add_argument("--signround-iters", type=int, default=200)
    ap.add_argument("--teq-steps", type=int, default=200)
    ap.add_argument("--ganq-iters", type=int, default=10)
    ap.add_argument("--ganq-outlier-ratio", type=float, default=0.0)
    a = ap.parse_args()
    src, text = start(f"calibration {a.samples} x {a.seq_len} tokens; signround iters {a.signround_iters}; "
                      f"teq steps {a.teq_steps}; ganq iters {a.ganq_iters}, outliers {a.ganq_outlier_ratio}; "
                      f"eval windows {a.max_windows or 'all'}")
    print("| scheme | method | ppl | KLD (nats/tok) | bits/weight | quantize s |\n|---|---|---|---|---|---|",
          flush=True)
    for scheme in a.schemes:
        bits, group = int(scheme.split("-")[0][1:]), scheme.split("-")[1]
        group = -1 if group == "row" else int(group[1:])
        for method in a.methods:
            extra = {"signround": {"iters": a.signround_iters}, "teq": {"steps": a.teq_steps},
                     "ganq": {"iters": a.ganq_iters, "outlier_ratio": a.ganq_outlier_ratio}}.get(method, {})
            cfg = lowbit.methods.config_for(method, bits=bits, group_size=group, **extra)
            q, r, took = quantize_and_score(src, text, cfg, a)
            bpw = q.size().quantized_bpw
            kld = "-" if a.no_kld else f"{r.kld:.5f}"
            print(f"| {scheme} | {method} | {r.ppl:.4f} | {kld} | {bpw:.3f} | {took:.0f} |", flush=True)
            del q
    if a.no_kld:
        r = evaluate(src.model, src.tokenizer, text, max_windows=a.max_windows, progress=False)
    print(f"source ppl {r.source_ppl or r.ppl:.4f} on {r.tokens} tokens")


if __name__ == "__main__":
    main()
