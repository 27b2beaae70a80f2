"""Activation quantization on the embedded SmolLM2-135M (issue 17): Tender vs the baselines, ppl and KLD.

Every row quantizes the source's decoder-block linears with the same weights method and format and
the same calibration text, then scores the held-out text (ctx 512) against the float source. Rows:
the weight-only model (A16) for each weight format, then each activation setting on it: Tender at
each G, and the baselines per-token, per-tensor, per-block32, smoothquant, hadamard. The last column
compares with the A16 row of the same weights (the issue's targets: W8A8-tender within 1% of W8,
W4A8-tender within 2% of W4 A16, W4A4-tender ahead of smoothquant and per-token).

Usage: python benchmarks/act_accuracy.py [--weights W8-g128 W4-g128 W4-row] [--acts 8 4] [--groups 4 8 12 16]
       [--baselines per-token per-tensor per-block32 smoothquant hadamard] [--method rtn|gptq]
       [--chunk 1] [--calib pydoc|prose|mixed|FILE] [--samples 32] [--seq-len 512] [--max-windows N] [--no-kld]
       [--a16 W4-row=23.5616 ...] [--same-weights]
The issue's table: the defaults (rtn), then `--method gptq --weights W4-g128 --acts 8 4 --baselines`; its
rows were calibrated on pydoc (`--calib pydoc`; lowbit's default became mixed at f8d3735). Tender's
weights are the A16 row's weights with their columns moved within each weight group (methods/tender.py),
for a calibrated weight method (GPTQ) too: the block runner passes the weight-only outputs on
(recipes/apply.py). `--same-weights` scores each Tender row a second time ("same W") with the A16 model's
own weights put in (columns moved, b·Ŵᵀ folded again): the same numbers since 196cf86, a check of that.
"""

import argparse

import lowbit
from _setup import add_options, quantize_and_score
from common import start
from lowbit.eval import evaluate
from lowbit.methods.tender import Fit, columns_permuted
from lowbit.models import fingerprint
from lowbit.nn import ActQuantLinear
from lowbit.recipes import scheme_fields


def rows(a) -> list[tuple[str, dict]]:
    """(weights, act fields) for every row, A16 first for each weight format."""
    out = []
    for weights in a.weights:
        if weights not in a.a16:
            out.append((weights, {}))
        for bits in a.acts:
            if weights.startswith("W8") and bits == 4:
                continue  # W8A4 is in no one's table
            for g in a.groups:
                out.append((weights, {"act_bits": bits, "act_method": "tender", "act_groups": g, "act_chunk": a.chunk}))
            out += [(weights, {"act_bits": bits, "act_method": m}) for m in a.baselines]
    return out


def put_weights(q, a16) -> None:
    """Every Tender layer of `q` given the weight-only model `a16`'s weights (columns moved as the layer
    stores them, its bias b·Ŵᵀ folded again), its activation quantizer kept."""
    for name, m in list(q.model.named_modules()):
        if isinstance(m, ActQuantLinear) and m.act_meta["method"] == "tender":
            ref, act = a16.model.get_submodule(name), m.act
            qt = columns_permuted(ref.qtensor, act.perm.long())
            act, bias = Fit(None, None, act).finish(qt, ref.bias)
            q.model.set_submodule(name, ActQuantLinear(qt, act, bias))


def _measured(item: str) -> tuple[str, float]:
    weights, _, ppl = item.partition("=")
    try:
        return weights, float(ppl)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{item!r} is not WEIGHTS=PPL (e.g. W4-row=23.5616)") from None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", nargs="+", default=["W8-g128", "W8-row", "W4-g128", "W4-row"])
    ap.add_argument("--acts", nargs="+", type=int, default=[8, 4], help="activation bits (W8 rows skip 4)")
    ap.add_argument("--groups", nargs="*", type=int, default=[4, 8, 12, 16])
    ap.add_argument("--baselines", nargs="*", default=["per-token", "per-tensor", "per-block32", "smoothquant", "hadamard"])
    ap.add_argument("--method", default="rtn", help="weights method (rtn, gptq, ...)")
    ap.add_argument("--chunk", type=int, default=1, help="Tender rows per run-time TMax (0: calibrated)")
    ap.add_argument("--same-weights", action="store_true", help="score each Tender row again on the A16 row's weights")
    ap.add_argument("--a16", nargs="*", type=_measured, default=[], metavar="WEIGHTS=PPL",
                    help="the A16 ppl of weights measured before (same options): their A16 row is not run again")
    add_options(ap)
    a = ap.parse_args()
    a.a16 = dict(a.a16)
    src, text = start(f"weights {a.method}; calibration {a.calib or 'default'}, {a.samples} x {a.seq_len} tokens; "
                      f"eval windows {a.max_windows or 'all'}")
    print("| weights | acts | method | G | ppl | KLD (nats/tok) | vs A16 ppl | quantize s |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    a16, models = dict(a.a16), {}
    for weights, acts in rows(a):
        cfg = lowbit.methods.config_for(a.method, **scheme_fields(weights), **acts)
        q, r, took = quantize_and_score(src, text, cfg, a)
        a16.setdefault(weights, r.ppl)
        scored = [(acts.get("act_method", "-"), r)]
        if not acts and a.same_weights:
            models[weights] = q
        elif acts.get("act_method") == "tender" and weights in models:
            put_weights(q, models[weights])
            scored.append(("tender, same W", evaluate(q.model, src.tokenizer, text, max_windows=a.max_windows, progress=False,
                                                      source=None if a.no_kld else src.model, source_key=fingerprint(src.source))))
        for method, r in scored:
            kld = "-" if a.no_kld else f"{r.kld:.5f}"
            print(f"| {weights} | A{acts.get('act_bits', 16)} | {method} | {acts.get('act_groups', '-')} | {r.ppl:.4f} | {kld} | "
                  f"{100 * (r.ppl / a16[weights] - 1):+.2f}% | {took:.0f} |", flush=True)
        del q
    print(f"{r.tokens} tokens scored in {r.windows} windows" + ("" if a.no_kld else f"; source ppl {r.source_ppl:.4f}"))


if __name__ == "__main__":
    main()
