"""Fair method numbers (issue 18, item 0): ours vs the reference implementation on the same grid, scored in
and out of domain.

GPTQ vs llm-compressor (0.14.0.1) at W4/W3/W2 g64 and TEQ vs Intel Neural Compressor (3.10) at W4/W3 g128,
every side asymmetric: 2^b levels, an integer zero point, a min-max range that holds 0 (ours
formats.uniform.group_params; theirs compressed-tensors' calculate_qparams / INC's qdq_weight_asym). The
earlier rows (BENCHMARKS.md, issue #3) compared each side's own "sym", which are different grids (ours all
2^b levels as Q4_0, llm-compressor's 2^b - 1): not a comparison of the algorithms.

Both sides get the same float SmolLM2-135M (embedded default, saved as an HF directory for the peer), the
same calibration windows of the built-in pydoc split (reference_methods.stage), the head and embedding in
float, and are scored by lowbit.eval on the same held-out windows of pydoc (in domain) and prose (The
Devil's Dictionary: out of domain), perplexity and KLD against the source (recipes.score).
GPTQ, both sides: dampening 0.01 x mean diag(H), lazy blocks of 128 columns, no activation order, blocks in
sequence fed by the quantized blocks before them, every linear of a block from one float pass (neither is
true-sequential inside a block). TEQ, both sides: lr 1e-3, `--teq-steps` Adam steps on batches of 8
windows, scales on the same producer -> consumers pairs (norm -> q/k/v, norm -> gate/up, up -> down).
What cannot be matched, and why, is in BENCHMARKS.md ("Issue 18 item 0: fair method numbers").

Usage: python benchmarks/fair_methods.py [--methods gptq teq] [--gptq-schemes W4-g64 W3-g64 W2-g64]
       [--teq-schemes W4-g128 W3-g128] [--samples 64] [--seq-len 512] [--teq-samples 16] [--teq-seq-len 128]
       [--teq-steps 100] [--windows N]
Run it with OMP_NUM_THREADS=1 to give both sides one thread (the peer inherits the environment).
"""

import argparse
import copy
import time

import lowbit
from common import start
from lowbit.calib import load as load_text
from lowbit.eval import evaluate
from recipes import score
from reference_methods import PeerFailed, stage, theirs, with_weights


def scheme_of(text: str) -> tuple[int, int]:
    bits, group = text.split("-")
    return int(bits[1:]), int(group[1:])


def row(method: str, scheme: str, ours: dict, peer: dict | str, t_ours: float, t_peer: float | None) -> str:
    cells = [f"{scheme} asym", method]
    for domain in ("pydoc", "prose"):
        for metric, fmt in (("ppl", "{:.3f}"), ("kld", "{:.4f}")):
            mine = fmt.format(ours[domain][metric])
            cells.append(f"{mine} / " + (fmt.format(peer[domain][metric]) if isinstance(peer, dict) else "-"))
    cells.append(f"{t_ours:.0f} / " + (f"{t_peer:.0f}" if t_peer is not None else "-"))
    return "| " + " | ".join(cells) + " |" + ("" if isinstance(peer, dict) else f" peer failed: {peer}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["gptq", "teq"], choices=["gptq", "teq"])
    ap.add_argument("--gptq-schemes", nargs="+", default=["W4-g64", "W3-g64", "W2-g64"])
    ap.add_argument("--teq-schemes", nargs="+", default=["W4-g128", "W3-g128"])
    ap.add_argument("--samples", type=int, default=64, help="GPTQ calibration windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--teq-samples", type=int, default=16)
    ap.add_argument("--teq-seq-len", type=int, default=128)
    ap.add_argument("--teq-steps", type=int, default=100)
    ap.add_argument("--windows", type=int, help="evaluation windows of 512 tokens per corpus (default: all)")
    a = ap.parse_args()
    src, _ = start(f"GPTQ calibration {a.samples} x {a.seq_len}; TEQ calibration {a.teq_samples} x "
                   f"{a.teq_seq_len}, {a.teq_steps} steps; eval windows {a.windows or 'all'} per corpus; asym")
    texts = {"pydoc": load_text("eval", "pydoc"), "prose": load_text("eval", "prose")}
    print("| scheme | method | pydoc ppl ours / theirs | pydoc KLD | prose ppl | prose KLD | time s |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    sizes = {"gptq": (a.samples, a.seq_len, a.gptq_schemes, {}),
             "teq": (a.teq_samples, a.teq_seq_len, a.teq_schemes, {"steps": a.teq_steps, "batch_size": 8, "lr": 1e-3})}
    for method in a.methods:
        samples, seq_len, schemes, extra = sizes[method]
        work = stage(src, samples, seq_len)
        for scheme in schemes:
            bits, group = scheme_of(scheme)
            cfg = lowbit.methods.config_for(method, bits=bits, group_size=group, sym=False, **extra)
            t = time.perf_counter()
            q = lowbit.quantize(copy.deepcopy(src.model), cfg, tokenizer=src.tokenizer, calib_samples=samples,
                                calib_seq_len=seq_len, progress=False)
            t_ours = time.perf_counter() - t
            ours = score(q.model, src, texts, a.windows)
            del q
            try:
                weights, t_peer = theirs(method, bits, group, argparse.Namespace(iters=a.teq_steps), work / "model",
                                         work / "calib.safetensors", work, sym=False)
            except PeerFailed as e:
                print(row(method, scheme, ours, str(e), t_ours, None), flush=True)
                continue
            model = with_weights(src.model, weights)
            print(row(method, scheme, ours, score(model, src, texts, a.windows), t_ours, t_peer), flush=True)
            del model, weights
    floats = {d: evaluate(src.model, src.tokenizer, t, max_windows=a.windows, progress=False) for d, t in texts.items()}
    print("float source on the same windows: " + ", ".join(f"{d} ppl {r.ppl:.3f} ({r.tokens} tokens)"
                                                         for d, r in floats.items()))


if __name__ == "__main__":
    main()
