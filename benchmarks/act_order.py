"""GPTQ act-order checkpoints on the native engine (issue 19): the cost of the input gather.

The embedded SmolLM2-135M quantized W4 g32 asymmetric (RTN; head and embedding left as they are),
exported with `--to gptq`, imported back (in order); then every block linear given a random input
permutation as GPTQ's act-order makes them (one shared by q/k/v, one by gate/up, as their common input
gives them one diag(H)), exported again (desc_act: true, scattered g_idx) and imported: the act-order
model lowbit runs. Printed: the engine's last-token logits against transformers' forward on the
imported models (max |Δ| and the logit scale), then prefill (pp128) and decode (tg128)
tokens/s of the in-order and act-order models (the same bytes per token, one gather more), interleaved in
one run, the median of --reps, per thread count, with the process CPU seconds per decoded token
(wall rates on a shared machine move; CPU time moves less).

    python benchmarks/act_order.py [--threads 1 2] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import start

import lowbit
from lowbit.runtime.engine import load_decoder


def permute_inputs(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj), (attn.o_proj,), (mlp.down_proj,)):
            perm = torch.randperm(group[0].in_features, generator=g).to(torch.int32)
            for m in group:
                m.in_perm = perm.clone()


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
    a = ap.parse_args()
    src, text = start("W4 g32 asym RTN, GPTQ export/import, act-order vs in order")
    q = lowbit.quantize("default", lowbit.RTN(bits=4, group_size=32, sym=False), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        plain = lowbit.load(q.export(Path(tmp) / "plain", to="gptq"))
        scattered = lowbit.load(q.export(Path(tmp) / "plain2", to="gptq"))
        permute_inputs(scattered.model)
        act = lowbit.load(scattered.export(Path(tmp) / "act", to="gptq"))
    print(f"imported: {plain.info['imported']} / {act.info['imported']}")
    ids = torch.tensor(src.tokenizer(text[:4000]).input_ids[:128])
    for name, model in (("in order", plain.model), ("act-order", act.model)):
        with torch.inference_mode():
            want = model(ids[None]).logits[0, -1]
        got = load_decoder(model, max_context=256, kv_dtype="fp32").forward(ids)
        print(f"engine vs transformers, {name} model, 128-token prompt: max |Δ logit| "
              f"{(got - want).abs().max():.2e} at logit scale {want.abs().max():.1f}")
    print("| threads | model | pp128 tok/s | tg128 tok/s | CPU ms / decoded token |\n|---|---|---|---|---|")
    for threads in a.threads:
        engines = {"in order": load_decoder(plain.model, max_context=256, threads=threads),
                   "act-order": load_decoder(act.model, max_context=256, threads=threads)}
        results = {name: [] for name in engines}
        for _ in range(a.reps):  # interleaved, so both see the same machine
            for name, e in engines.items():
                results[name].append(measure(e, ids))
        for name, rows in results.items():
            pp, tg, cpu = (statistics.median(r[i] for r in rows) for i in range(3))
            print(f"| {threads} | {name} | {pp:.0f} | {tg:.0f} | {cpu * 1e3:.2f} |")


if __name__ == "__main__":
    main()
