"""The automatic flow: try methods in order of cost within a time budget, keep the one whose
quantized model is closest to the source (KL divergence) on held-out calibration text.

The calibration text is split once: the last 10 % (at a paragraph boundary) is kept for the selection
and never used to fit; the rest feeds the calibrated methods.
"""

import copy
import time
from dataclasses import dataclass

from ..eval import evaluate
from ..methods import METHODS, MethodConfig

HOLDOUT = 0.1
SELECT_WINDOWS = 8
# expected cost relative to GPTQ on the same model and data (measured on SmolLM2, 2 cores)
COST_VS_GPTQ = {"rtn": 0.02, "gptq": 1.0, "awq": 1.0, "teq": 3.0, "signround": 6.0}


@dataclass(frozen=True)
class Auto(MethodConfig):
    budget_minutes: float = 30.0
    candidates: tuple[str, ...] = ("rtn", "gptq", "awq", "teq", "signround")
    name = "auto"
    needs_calib = True


def split_holdout(text: str) -> tuple[str, str]:
    """(fitting part, selection part) of the calibration text."""
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - HOLDOUT)))
    cut = cut if cut > 0 else int(len(text) * (1 - HOLDOUT))
    return text[:cut], text[cut:]


def select(model, config: Auto, tokenizer, text: str, quantize, progress: bool = True, **options):
    """Quantize copies of `model` with each candidate method that fits the budget; return the best
    quantized model, with the comparison table in `lowbit_info["auto"]`."""
    fit, held_out = split_holdout(text)
    source = copy.deepcopy(model)
    start, rows, best, gptq_s = time.perf_counter(), [], None, None
    for name in config.candidates:
        elapsed = time.perf_counter() - start
        guess = COST_VS_GPTQ[name] * gptq_s if gptq_s else 0.0
        if rows and elapsed + guess > config.budget_minutes * 60:
            rows.append({"method": name, "skipped": f"expected {guess / 60:.1f} min, over the budget"})
            continue
        spec = METHODS[name].CONFIG(bits=config.bits, group_size=config.group_size, sym=config.sym)
        t = time.perf_counter()
        q = quantize(copy.deepcopy(source), spec, tokenizer=tokenizer, calib_text=fit, progress=progress,
                     **options)
        took = time.perf_counter() - t
        gptq_s = took if name == "gptq" else gptq_s
        r = evaluate(q, tokenizer, held_out, max_windows=SELECT_WINDOWS, source=source, progress=False)
        rows.append({"method": name, "ppl": r.ppl, "kld": r.kld, "seconds": took})
        if best is None or r.kld < best[1]:
            best = (q, r.kld, spec)
        else:
            del q
    q, _, spec = best
    q.lowbit_info["method"] = spec.to_dict()
    q.lowbit_info["auto"] = {"rows": rows, "chosen": spec.name, "budget_minutes": config.budget_minutes,
                             "selection_tokens": r.tokens}
    return q


def report(info: dict) -> str:
    """Markdown table of the selection (written into the output directory)."""
    lines = [f"# lowbit auto: chose {info['chosen']}", "",
             f"Held-out calibration text, {info['selection_tokens']} tokens; budget {info['budget_minutes']} min.",
             "", "| method | ppl | KLD vs source | quantize s |", "|---|---|---|---|"]
    for row in info["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['method']} | — | — | skipped: {row['skipped']} |")
        else:
            lines.append(f"| {row['method']} | {row['ppl']:.4f} | {row['kld']:.5f} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
