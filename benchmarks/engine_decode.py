"""Native decode engine vs HF eager fp32 vs the same quantized model through QuantLinear (issue #5).

SmolLM2-135M quantized W4 g32 sym (RTN) in process. For each thread count, tokens/s of prefill
(pp128, pp512: one forward over the prompt from an empty cache) and decode (tg128: 128 single-token
steps from an empty cache, as llama-bench counts them), median of --reps runs, all three paths in
the same run so the ratios hold on a noisy machine. HF paths decode with their own KV cache
(`past_key_values`), one Python forward per token. The engine's per-op profile of one tg run and the
process's peak RSS are printed at the end.

`--random` builds SmolLM2-135M's shapes with random weights instead (speed does not depend on the
values), for machines without the embedded model. `--head-bits 8` rounds the tied fp head to 8 bits,
as llama.cpp's Q4_0 file stores it (Q8_0 output).

    python benchmarks/engine_decode.py [--threads 1 2] [--reps 3] [--hf-tokens 32] [--kv fp16] [--head-bits 8]
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import torch
from common import start

import lowbit
from lowbit.runtime.engine import load_decoder

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=100000.0, tie_word_embeddings=True)


def median_rate(tokens: int, run, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times)


def engine_rates(eng, ids: torch.Tensor, reps: int) -> dict[str, float]:
    def prefill(n):
        eng.truncate(0)
        eng.forward(ids[:n])

    def decode():
        eng.truncate(0)
        for t in ids[:128].tolist():
            eng.forward([t])

    prefill(64)  # warm the caches and the pool
    return {"pp128": median_rate(128, lambda: prefill(128), reps),
            "pp512": median_rate(512, lambda: prefill(512), reps),
            "tg128": median_rate(128, decode, reps)}


def hf_rates(model, ids: torch.Tensor, reps: int, decode_tokens: int) -> dict[str, float]:
    @torch.inference_mode()
    def prefill(n):
        model(ids[None, :n], use_cache=False)

    @torch.inference_mode()
    def decode():
        out = model(ids[None, :1], use_cache=True)
        for t in ids[1:decode_tokens].tolist():
            out = model(torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)

    prefill(16)
    return {"pp128": median_rate(128, lambda: prefill(128), reps),
            "pp512": median_rate(512, lambda: prefill(512), reps),
            "tg128": median_rate(decode_tokens, decode, reps)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hf-tokens", type=int, default=32, help="decode steps timed for the HF paths (slow)")
    ap.add_argument("--kv", default="fp16", help="engine KV cache dtype: fp32, fp16, bf16")
    ap.add_argument("--head-bits", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--random", action="store_true", help="SmolLM2-135M shapes, random weights")
    args = ap.parse_args()
    details = f"engine vs HF, W4-g32-sym RTN, kv {args.kv}, head {args.head_bits or 'fp16'}, median of {args.reps}"
    if args.random:
        from transformers import LlamaConfig, LlamaForCausalLM

        print(f"# random weights in SmolLM2-135M shapes; {details}")
        fp = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).eval()
    else:
        fp = start(details)[0].model
    q = lowbit.quantize(copy.deepcopy(fp), lowbit.RTN(bits=4, group_size=32), progress=False).model
    ids = torch.randint(0, fp.config.vocab_size, (512,), generator=torch.Generator().manual_seed(0))
    rows = []
    for n in args.threads:
        torch.set_num_threads(n)
        t0 = time.perf_counter()
        eng = load_decoder(q, max_context=1024, threads=n, kv_dtype=args.kv, head_bits=args.head_bits)
        build_s = time.perf_counter() - t0
        rates = {"engine": engine_rates(eng, ids, args.reps)}
        eng.profile(True)
        eng.truncate(0)
        for t in ids[:128].tolist():
            eng.forward([t])
        prof = eng.profile()
        del eng
        if not args.skip_hf:
            rates["HF eager fp32"] = hf_rates(fp, ids, args.reps, args.hf_tokens)
            rates["HF + QuantLinear W4"] = hf_rates(q, ids, args.reps, args.hf_tokens)
        base = rates.get("HF eager fp32")
        for path, r in rates.items():
            ratio = " | ".join(f"{r[k] / base[k]:.1f}×" for k in r) if base else "— | — | —"
            rows.append(f"| {path} | {n} | {r['pp128']:.0f} | {r['pp512']:.0f} | {r['tg128']:.1f} | {ratio} |")
        total = sum(prof.values())
        print(f"threads {n}: engine build {build_s:.1f} s; tg128 profile (ms/token, share): "
              + ", ".join(f"{k} {v / 128 * 1e3:.3f} ({v / total:.0%})" for k, v in prof.items()))
    print("\n| path | threads | pp128 tok/s | pp512 tok/s | tg128 tok/s | vs HF eager (pp128 / pp512 / tg128) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\npeak RSS of this process (fp32 source + quantized HF model + engine): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
