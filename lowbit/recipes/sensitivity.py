"""Sensitivity: the loss each candidate adds at each layer, predicted from calibration statistics.

For a layer W with calibration inputs X (H = XXᵀ, what the block runner already gathers for GPTQ) and
a candidate's quantized Ŵ, ΔW = W − Ŵ:

    loss(layer, candidate) = tr(ΔW · H · ΔWᵀ) / tokens = mean over tokens of ‖ΔW x‖²

the squared error the candidate adds to the layer's output, per token: the quantity GPTQ and GANQ
minimise, here used to rank the candidates of every layer against each other (across layers the
sum is the recipe's predicted loss: errors of different layers treated as independent and additive,
the first-order assumption of every mixed-precision allocator from HAWQ to llama.cpp's imatrix).
Each candidate is made by its own method on the layer's float inputs (the float model's, block after
block: what a layer's error costs with the rest exact), so the loss is that of the QTensor the recipe
would store. Streaming: the block runner holds one decoder block, its inputs and its layers'
Hessians at a time; the candidates' QTensors are dropped as soon as their loss is known.
benchmarks/recipes.py checks the proxy against the model-level KL divergence of quantizing one
layer alone (Spearman rank correlation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..calib.runner import LayerStats, calibration_batches, quantize_blocks
from ..errors import LowbitError
from ..methods import METHODS, MethodConfig
from ..models import LazyBlocks
from .candidates import fits, name
from .plan import block_prefix


@dataclass
class Sensitivity:
    shapes: dict[str, tuple[int, int]]  # layer name -> [out, in], in the model's order
    loss: dict[str, dict[str, float]]  # layer name -> candidate token -> predicted loss (fitting ones only)
    tokens: int  # calibration tokens behind every number

    def to_dict(self) -> dict:
        return {"shapes": {n: list(s) for n, s in self.shapes.items()}, "loss": self.loss, "tokens": self.tokens}


def output_error(w: torch.Tensor, w_hat: torch.Tensor, stats: LayerStats) -> float:
    """tr(ΔW H ΔWᵀ) / tokens: the mean squared output error the rounding adds per token."""
    dw = (w.float() - w_hat.float())
    return float((dw @ stats.hessian * dw).sum()) / max(stats.tokens, 1)


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rho of two equally long lists: Pearson's correlation of their ranks (ties averaged)."""
    def ranks(v):
        t = torch.tensor(v, dtype=torch.float64)
        r = torch.empty_like(t)
        r[t.argsort()] = torch.arange(len(t), dtype=torch.float64)
        for value in t.unique():  # ties share their mean rank
            r[t == value] = r[t == value].mean()
        return r - r.mean()
    ra, rb = ranks(a), ranks(b)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def block_linears(model: nn.Module) -> list[str]:
    """Every nn.Linear inside the decoder blocks, in the model's order."""
    prefix = block_prefix(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)]


@torch.no_grad()
def measure(model: nn.Module, tokenizer, text: str, candidates: tuple[MethodConfig, ...],
            layers: list[str] | None = None, samples: int = 32, seq_len: int = 512, progress: bool = True,
            lazy: LazyBlocks | None = None) -> Sensitivity:
    """The predicted loss of every candidate that fits each of `layers` (default: every linear inside
    the decoder blocks), from `samples` windows of `seq_len` tokens of `text`. The model is unchanged."""
    names = block_linears(model) if layers is None else list(layers)
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise LowbitError(f"sensitivity: {missing[0]} is not a linear layer inside the model's decoder blocks")
    by_id = {id(modules[n]): n for n in names}
    shapes = {n: tuple(modules[n].weight.shape) for n in names}
    loss: dict[str, dict[str, float]] = {n: {} for n in names}
    seen = []

    def step(block, inputs, kwargs, fp_outputs, stats):
        for local, m in block.named_modules():
            full = by_id.get(id(m))
            if full is None:
                continue
            w = m.weight.detach()
            for spec in candidates:
                if fits(spec, w.shape[1]):
                    qt = METHODS[spec.name].quantize(w, stats[local], spec)
                    loss[full][name(spec)] = output_error(w, qt.dequantize(), stats[local])
                    del qt
            seen.append(stats[local].tokens)
        return {}

    batches = calibration_batches(tokenizer, text, samples, seq_len)
    quantize_blocks(model, batches, step, progress, lazy=lazy)
    return Sensitivity(shapes, loss, max(seen, default=0))
