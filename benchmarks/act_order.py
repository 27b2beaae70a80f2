"""GPTQ act-order checkpoints on the native engine (issue 19): the cost of the input gather.

The embedded SmolLM2-135M, every decoder-block linear quantized W4 g32 asymmetric (round to nearest)
twice: in order, and act-order as GPTQ's `desc_act` lays it out: the columns in a random order (the
stand-in for decreasing diag(H); one order shared by q/k/v and one by gate/up, as their common input
gives them one H), a group closed every 32 columns of that order (UniformQ over W[:, perm], input
permutation perm). Each is exported with `--to gptq` (the second with desc_act: true and a scattered
g_idx) and imported back: the models lowbit runs from such files. Printed: the engine's last-token
logits against transformers' forward on each imported model (max |Δ| and the logit scale) and its
perplexity on the built-in held-out text (--windows of 512 tokens, fp32 activations), then
prefill (pp128) and decode (tg128) tokens/s of the two (the same bytes per token, one gather more),
interleaved in one run, the median of --reps, per thread count, with the process CPU seconds per
decoded token (wall rates on a shared machine move; CPU time moves less).

    python benchmarks/act_order.py [--threads 1 2] [--reps 5] [--windows 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import start

import lowbit
from lowbit.formats import UniformQ
from lowbit.io import write_gptq
from lowbit.nn import QuantLinear
from lowbit.runtime.engine import load_decoder


def quantized(model, act_order: bool, seed: int = 0):
    """A copy of `model` with its block linears W4 g32 asym, in order or act-order (see above)."""
    model, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
                      ("self_attn.o_proj",), ("mlp.down_proj",)):
            k = layer.get_submodule(group[0]).in_features
            perm = torch.randperm(k, generator=g).to(torch.int32) if act_order else None
            for name in group:
                m = layer.get_submodule(name)
                w = m.weight.detach().float()
                qt = UniformQ.from_float(w if perm is None else w[:, perm.long()], 4, 32, sym=False)
                layer.set_submodule(name, QuantLinear(qt, m.bias, None if perm is None else perm.clone()))
    return model


def measure(eng, ids: torch.Tensor) -> tuple[float, float, float]:
    """(pp128 tok/s, tg128 tok/s, process CPU seconds per decoded token) of one run."""
    eng.truncate(0)
    t0 = time.perf_counter()
    eng.forward(ids[:128])
    pp = 128 / (time.perf_counter() - t0)
    eng.truncate(0)
    t0, c0 = time.perf_counter(), time.process_time()
    for t in ids[:128].tolist():
        eng.forward([t])
    return pp, 128 / (time.perf_counter() - t0), (time.process_time() - c0) / 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--windows", type=int, default=8)
    a = ap.parse_args()
    src, text = start("W4 g32 asym, GPTQ export/import, act-order vs in order")
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for name, act in (("in order", False), ("act-order", True)):
            out = write_gptq(quantized(src.model, act), Path(tmp) / name, src.tokenizer)  # `export --to gptq`
            models[name] = lowbit.load(out)
            print(f"{name}: imported {models[name].info['imported']}")
    ids = torch.tensor(src.tokenizer(text[:4000]).input_ids[:128])
    for name, q in models.items():
        with torch.inference_mode():
            want = q.model(ids[None]).logits[0, -1]
        got = load_decoder(q.model, max_context=256, kv_dtype="fp32").forward(ids)
        ppl = q.evaluate(max_windows=a.windows, progress=False, exact=True).ppl
        print(f"{name}: engine vs transformers on a 128-token prompt, max |Δ logit| {(got - want).abs().max():.2e} "
              f"at logit scale {want.abs().max():.1f}; perplexity {ppl:.3f} ({a.windows} windows of 512)")
    print("| threads | model | pp128 tok/s | tg128 tok/s | CPU ms / decoded token |\n|---|---|---|---|---|")
    for threads in a.threads:
        engines = {name: load_decoder(q.model, max_context=256, threads=threads) for name, q in models.items()}
        results = {name: [] for name in engines}
        for _ in range(a.reps):  # interleaved, so both see the same machine
            for name, e in engines.items():
                results[name].append(measure(e, ids))
        for name, rows in results.items():
            pp, tg, cpu = (statistics.median(r[i] for r in rows) for i in range(3))
            print(f"| {threads} | {name} | {pp:.0f} | {tg:.0f} | {cpu * 1e3:.2f} |")


if __name__ == "__main__":
    main()
