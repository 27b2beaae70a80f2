"""The report of a recipe run (`lowbit quantize --target-bpw/--target-size/--target-tps`, or `--recipe FILE`):
every layer's choice beside what was predicted for it and what was measured.

Per decoder-block linear layer:
- choice: its spec (METHOD:SCHEME), and bits per weight: its exact stored bytes (cost.py), what
  `lowbit inspect` prints;
- predicted loss: the sensitivity pass's tr(ΔW H ΔWᵀ)/tokens (sensitivity.py), the layer quantized alone
  on the float model's inputs (for a recipe file: the value its `# predicted loss` note carries, written
  by `lowbit recipe`; none for a layer without one);
- measured loss: the same quantity from the block runner as it quantized the layer (recipes/apply.py), on
  the inputs the quantized model really gives it (every block before it quantized) and by the method's own
  rounding of those statistics: the error accumulated upstream shows as measured/predicted above 1;
- predicted decode µs: the cost model's share of one token's time (quantx.decode_seconds: bytes over this
  machine's bandwidth, fused groups as one matmul).
For the model: predicted tokens/s (the cost model: the layers' matmuls and the head, nothing else, so an
upper bound) and measured tokens/s (bench's decode of the saved model, when the command's check runs).
The numbers go into quantization_config["recipe"] (the record of how the model was made) and the
markdown into recipe_report.md in the output directory.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..atomic_file import atomic_write_text
from .candidates import name
from .cost import bits_per_weight, this_machine
from .plan import Plan
from .quantx import decode_seconds
from .sensitivity import block_linears


def predict(model: nn.Module, plan: Plan, losses: dict[str, float]) -> dict:
    """The predicted half of the report, before `plan` is applied to the float `model`: per block linear
    its choice, bpw, predicted loss (`losses`, None where absent) and decode µs; the model's tokens/s."""
    layers = {n: plan.layers[n] for n in block_linears(model) if n in plan.layers}
    seconds, total = decode_seconds(model, plan.layers, this_machine())
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in layers}
    return {"tokens_per_s": 1 / total, "layers": {
        n: {"choice": name(spec), "bpw": bits_per_weight(spec, shapes[n]), "weights": shapes[n][0] * shapes[n][1],
            "predicted_loss": losses.get(n), "measured_loss": None, "predicted_us": 1e6 * seconds[n]}
        for n, spec in layers.items()}}


def measured(report: dict, losses: dict[str, float]) -> dict:
    """`report` with the block runner's measured losses filled in."""
    for n, row in report["layers"].items():
        row["measured_loss"] = losses.get(n)
    return report


def render(recipe: dict, decode_tps: float | None = None) -> str:
    """Markdown of quantization_config["recipe"] (its "report" from `predict` and `measured`): the budget,
    the totals predicted and measured, one row per layer."""
    report = recipe["report"]
    rows = report["layers"]
    target = recipe.get("target") or {"recipe file": recipe.get("file")}
    bpw = sum(r["bpw"] * r["weights"] for r in rows.values()) / max(sum(r["weights"] for r in rows.values()), 1)
    pred = [r["predicted_loss"] for r in rows.values() if r["predicted_loss"] is not None]
    meas = [r["measured_loss"] for r in rows.values() if r["measured_loss"] is not None]
    lines = [f"# lowbit recipe: {len(rows)} layers", "",
             "target: " + ", ".join(f"{k} {v}" for k, v in target.items()),
             f"bits per weight (decoder blocks' linear layers, stored bytes): {bpw:.3f}",
             f"loss, tr(ΔW H ΔWᵀ)/tokens summed over the layers: predicted {_num(sum(pred)) if pred else '—'} "
             f"({len(pred)} layers), measured {_num(sum(meas)) if meas else '—'} ({len(meas)} layers)",
             f"decode tokens/s: predicted {report['tokens_per_s']:.0f} (cost model: the linear layers and the head), "
             + (f"measured {decode_tps:.0f} (the saved model, bench)" if decode_tps else
                "measured — (run without --no-check to measure)"), "",
             "| layer | choice | bpw | predicted loss | measured loss | measured / predicted | predicted decode µs |",
             "|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        p, m = r["predicted_loss"], r["measured_loss"]
        ratio = f"{m / p:.2f}" if p and m is not None else "—"
        lines.append(f"| {n} | {r['choice']} | {r['bpw']:.3f} | {_num(p)} | {_num(m)} | {ratio} | "
                     f"{r['predicted_us']:.3g} |")
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def write(path: str | Path, recipe: dict, decode_tps: float | None = None) -> Path:
    """Write the report atomically (a reader sees the old file or the new one)."""
    atomic_write_text(path, render(recipe, decode_tps))
    return Path(path)
