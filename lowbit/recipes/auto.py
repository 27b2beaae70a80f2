"""The automatic recipe: try methods in order of cost within a time budget, keep the one whose
quantized model is closest to the source (KL divergence) on held-out calibration text.

The calibration text is split once: the last 10 % (at a paragraph boundary) is kept for the selection
and never used to fit; the rest feeds the calibrated methods. The result is a Plan (the winner's
uniform plan) with its report; the winner's quantized model comes with it, so it is not made twice.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from torch import nn

from ..errors import LowbitError
from ..eval import evaluate
from ..formats import check_spec
from ..methods import METHODS
from .apply import apply
from .plan import Plan

HOLDOUT = 0.1
SELECT_WINDOWS = 8
# expected cost relative to GPTQ on the same model and data (measured on SmolLM2, 2 cores)
COST_VS_GPTQ = {"rtn": 0.02, "gptq": 1.0, "awq": 1.0, "teq": 3.0, "signround": 6.0}


@dataclass(frozen=True)
class Auto:
    """Which method, chosen by measurement: the candidates' shared format, the budget, the candidates."""
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    budget_minutes: float = field(default=30.0, metadata={"help": "time budget in minutes"})
    candidates: tuple[str, ...] = field(default=("rtn", "gptq", "awq", "teq", "signround"),
                                        metadata={"help": "methods to try, cheapest first"})
    name = "auto"
    needs_calib = True  # its candidates include calibrated methods: it reads calibration text

    def __post_init__(self):
        check_spec(self.bits, self.group_size)
        unknown = [c for c in self.candidates if c not in COST_VS_GPTQ]
        if unknown or not self.candidates:
            raise LowbitError(f"auto candidates must be some of {', '.join(COST_VS_GPTQ)}, got "
                              f"{', '.join(self.candidates) or 'none'}")


@dataclass
class Choice:
    plan: Plan
    model: nn.Module  # the winner, quantized
    report: dict  # rows (method, ppl, kld, seconds or skipped), chosen, budget_minutes, selection_tokens


def split_holdout(text: str) -> tuple[str, str]:
    """(fitting part, selection part) of the calibration text."""
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - HOLDOUT)))
    cut = cut if cut > 0 else int(len(text) * (1 - HOLDOUT))
    return text[:cut], text[cut:]


def select(model: nn.Module, auto: Auto, tokenizer, text: str, progress: bool = True, *, lm_head: bool = False,
           embeddings: bool = False, **calibration) -> Choice:
    """Quantize copies of `model` with each candidate method that fits the budget (`calibration`:
    calib_samples, calib_seq_len for `apply`); the one closest to `model` on the held-out text wins."""
    if tokenizer is None:
        raise LowbitError("auto measures candidates on text: pass the model's tokenizer")
    fit, held_out = split_holdout(text)
    source = copy.deepcopy(model)
    start, rows, best, gptq_s = time.perf_counter(), [], None, None
    for name in auto.candidates:
        elapsed = time.perf_counter() - start
        guess = COST_VS_GPTQ[name] * gptq_s if gptq_s else 0.0
        if rows and elapsed + guess > auto.budget_minutes * 60:
            rows.append({"method": name, "skipped": f"expected {guess / 60:.1f} min, over the budget"})
            continue
        spec = METHODS[name].CONFIG(bits=auto.bits, group_size=auto.group_size, sym=auto.sym)
        t = time.perf_counter()
        q = copy.deepcopy(source)
        plan = Plan.uniform(q, spec, lm_head, embeddings)
        apply(q, plan, tokenizer=tokenizer, text=fit, progress=progress, **calibration)
        took = time.perf_counter() - t
        gptq_s = took if name == "gptq" else gptq_s
        r = evaluate(q, tokenizer, held_out, max_windows=SELECT_WINDOWS, source=source, progress=False)
        rows.append({"method": name, "ppl": r.ppl, "kld": r.kld, "seconds": took})
        if best is None or r.kld < best[0]:
            best = (r.kld, name, plan, q)
        del q
    _, chosen, plan, q = best
    return Choice(plan, q, {"rows": rows, "chosen": chosen, "budget_minutes": auto.budget_minutes,
                            "selection_tokens": r.tokens})


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
