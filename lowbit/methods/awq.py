"""AWQ (Lin et al. 2024): protect the weights that meet large activations by scaling input channels.

Per group of linears sharing an input (q/k/v; o; gate/up; down), search s = mean|x|^α over a grid of α
for the scaling that minimises the group's output error after quantization, ‖Q(W·diag(s))·(x/s) − Wx‖²
(measured on the linears' own outputs over a sample of calibration tokens); fold 1/s exactly into the
operation that produces x (the preceding RMSNorm/LayerNorm weight, or the rows of the preceding
linear); then search each layer's clipping range per group on its output error (q/k excluded, as in
the reference implementation).
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from ..formats import UniformQ
from ..formats.uniform import clip_search, effective_group, grouped
from .config import MethodConfig

# (input producer, consumers) inside a decoder block; the first match of each entry that exists is used.
GROUPS = [
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("self_attn.v_proj", ["self_attn.o_proj"]),
    ("pre_feedforward_layernorm|post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("mlp.up_proj", ["mlp.down_proj"]),
]
NO_CLIP = ("q_proj", "k_proj")  # attention scores are too sensitive to clipped q/k outliers
CLIP_TOKENS = 512


@dataclass(frozen=True)
class AWQ(MethodConfig):
    grid: int = field(default=20, metadata={"help": "scale exponents tried: α ∈ {0, 1/grid, ..., (grid-1)/grid}"})
    clip: bool = field(default=True, metadata={"help": "search a clipping range per group after scaling"})
    name = "awq"
    needs_calib = True


CONFIG = AWQ


def fold_scales(producer: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> None:
    """x → x/s at the producer, W → W·diag(s) at the consumers: the float function is unchanged."""
    with torch.no_grad():
        if isinstance(producer, nn.Linear):
            producer.weight.div_(s[:, None])
            if producer.bias is not None:
                producer.bias.div_(s)
        elif type(producer).__name__.startswith("Gemma"):  # Gemma norms scale by (1 + weight)
            producer.weight.copy_((1 + producer.weight) / s - 1)
        else:
            producer.weight.div_(s)
            if getattr(producer, "bias", None) is not None:
                producer.bias.div_(s)
        for m in consumers:
            m.weight.mul_(s[None, :])


def _quantize_dequantize(w: torch.Tensor, spec: AWQ) -> torch.Tensor:
    return UniformQ.from_float(w, spec.bits, spec.group_size, spec.sym).dequantize()


def search_scale(x: torch.Tensor, x_abs_mean: torch.Tensor, weights: list[torch.Tensor], spec: AWQ) -> torch.Tensor:
    w = torch.cat(weights).float()
    reference = x @ w.T
    best, best_s = float("inf"), torch.ones_like(x_abs_mean)
    for i in range(spec.grid):
        s = x_abs_mean.pow(i / spec.grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = ((x @ (_quantize_dequantize(w * s, spec) / s).T - reference) ** 2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s


def _producer(block: nn.Module, names: str):
    for name in names.split("|"):
        try:
            return block.get_submodule(name)
        except AttributeError:
            continue
    return None


def shared_inputs(block: nn.Module, targets: dict[str, nn.Linear]):
    """(producer, consumer names) for each input that the targeted linears of `block` share (GROUPS):
    the module whose output x they all read, so x/s folds into it. Skipped: a producer the block does
    not have, a group with no targeted consumer, and a linear producer whose outputs are not its
    consumers' inputs (v_proj → o_proj under grouped-query attention: the channels do not line up)."""
    for producer_names, consumer_names in GROUPS:
        producer = _producer(block, producer_names)
        consumers = [n for n in consumer_names if n in targets]
        if producer is None or not consumers:
            continue
        if isinstance(producer, nn.Linear) and producer.out_features != targets[consumers[0]].in_features:
            continue
        yield producer, consumers


def fold_shared_inputs(block: nn.Module, targets: dict[str, nn.Linear], stats: dict, scales) -> None:
    """For each shared input (`shared_inputs`): s = scales(its statistics, the consumers' weights),
    x/s folded into the producer and W·s into the consumers (`fold_scales`), the statistics rescaled."""
    for producer, consumers in shared_inputs(block, targets):
        s = scales(stats[consumers[0]], [targets[n].weight.detach() for n in consumers])
        fold_scales(producer, [targets[n] for n in consumers], s)
        for n in consumers:  # the inputs these layers see are now x / s
            stats[n].rescale_inputs(s)


def _output_error(x: torch.Tensor, group_size: int):
    """Per (row, group) error of the layer's output over tokens x: Σ_t (Σ_{j∈g} Δw_j x_tj)²."""
    xg, _ = grouped(x, effective_group(group_size, x.shape[1]))  # [T, G, g]

    def error(wg, dq):
        return torch.cat([torch.einsum("ngk,tgk->ngt", d, xg).pow(2).sum(-1)
                          for d in (dq - wg).split(256)])
    return error


def quantize_block(block: nn.Module, targets: dict[str, nn.Linear], stats: dict, spec: AWQ, **_) -> dict:
    """Scale and fold, then clip-search and quantize every targeted linear: {name: UniformQ}."""
    fold_shared_inputs(block, targets, stats, lambda st, weights: search_scale(st.inputs(), st.abs_mean, weights, spec))
    out = {}
    for name, m in targets.items():
        w = m.weight.detach()
        shrink = None
        if spec.clip and not name.endswith(NO_CLIP):
            x = stats[name].inputs()[:CLIP_TOKENS]
            shrink = clip_search(w, spec.bits, spec.group_size, spec.sym, _output_error(x, spec.group_size))
        out[name] = UniformQ.from_float(w, spec.bits, spec.group_size, spec.sym, shrink=shrink)
    return out
