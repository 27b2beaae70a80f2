"""Fitting activation quantizers (formats/activation.py) from calibration statistics, for any weight method.

Per linear layer, from the block runner's statistics of its input x (each channel's min and max, H = Σ xxᵀ):

  tender       b = (max + min)/2 per channel, m = (max − min)/2 = max |x − b|, TMax = max m; or, where
               it rounds the calibration sample's outputs x·Wᵀ better (`centred`), b = 0 and m = max |x|
               (the reference centres only the norms' outputs, q/k/v's and gate/up's inputs: o_proj's
               and down_proj's are heavy-tailed around 0, and centring their rare extremes moves every
               other row away from 0, where the top group rounds it coarsely); channel k
               goes to group g = #{i < G−1 : m_k > TMax / 2^(G−1−i)} (the reference's thresholds
               T_i = TMax/2^(G−1−i), so group g holds T_(g−1) < m ≤ T_g); the channels are sorted by
               (weight group of the input order, activation group, channel): every weight group keeps
               its own column set, each of its activation groups one run inside it (what the integer
               kernel lays out anyway: kernels/cpu/tender.py). The weight method quantizes W in the
               input order, as the weight-only model does, and its codes are permuted after (`Fit`):
               each group's scale, zero point or codebook stays, so Ŵ is the weight-only model's Ŵ
               with its columns moved, whatever the method, given the same statistics (GPTQ's error
               feedback, too, runs in the input order; and the block runner passes the weight-only
               outputs on, recipes/apply.py, so later blocks get the weight-only model's inputs). Sorting by group alone mixed columns of different weight groups
               (W4-g128 GPTQ A8: +5.8% over A16, BENCHMARKS.md). b·Ŵᵀ is added to the layer's bias:
               with float activations the layer is then exactly the weight-only one,
               x·Ŵᵀ = (x − b)·Ŵᵀ + b·Ŵᵀ.
  hadamard     W's columns rotated by the orthonormal Hadamard matrix (W·H, H's order = in_features)
               before the weight method runs (H becomes HᵀΣxxᵀH); x·H online; per-token rounding.
  per-tensor   the calibrated max |x| per channel (its max is the static scale's range).
  per-token, per-block32: nothing to fit.
  smoothquant  per block, before any weight is quantized (`smooth_block`): for each input shared by
               linears (AWQ's groups: the norms feeding q/k/v and gate/up, v → o, up → down), channel
               scales s = max|x|^α / max|W|^(1−α) with α searched on a grid for the least output error
               of the fake-quantized layers (per-token activations, RTN weights in the spec's format)
               on the calibration sample; x/s folded into the producer (norm weight or rows), W·s into
               the consumers: the float function is unchanged. Then per-token rounding.

Block-wise weight methods (awq, teq, signround) transform and quantize whole blocks themselves, so
nothing can be folded into W's columns before them: with them only the activation methods that leave
W alone (per-token, per-block32, per-tensor) are accepted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError
from ..formats import CodebookQ, UniformQ
from ..formats.activation import ActQ
from ..formats.hadamard import hadamard
from ..formats.packing import pack
from ..formats.uniform import effective_group, group_params, grouped, quantize_codes
from .awq import fold_shared_inputs
from .config import MethodConfig

ALPHAS = [i / 20 for i in range(1, 20)]  # SmoothQuant's migration strength, searched per group
SEARCH_TOKENS = 512
WEIGHT_PRESERVING = ("per-token", "per-block32", "per-tensor")  # methods that leave W's columns alone


@dataclass
class Fit:
    """A layer's fitted activation quantizer before its weights are quantized: `weight` and `stats`
    in the stored channel order (what the layer's weight error is measured on), the ActQ's tensors,
    and for Tender the input-order `source` (weight, stats) that the weight method quantizes."""
    weight: torch.Tensor
    stats: object
    act: ActQ
    source: tuple | None = None

    def quantize(self, method, spec: MethodConfig):
        """The layer's QTensor in the stored order by weight `method` (module docstring)."""
        if self.source is None:
            return method.quantize(self.weight, self.stats, spec)
        return columns_permuted(method.quantize(*self.source, spec), self.act.perm.long())

    def weight_only(self, qt):
        """The stored-order `qt` of a Tender layer back in the input order: the weight-only model's QTensor."""
        return columns_permuted(qt, torch.argsort(self.act.perm.long()))

    def finish(self, qt, bias: torch.Tensor | None) -> tuple[ActQ, torch.Tensor | None]:
        """(the ActQ, the layer's new bias): Tender's b·Ŵᵀ folded into the bias, with the quantized Ŵ
        (nothing to fold where b = 0)."""
        if self.act.bias is None or not bool(self.act.bias.any()):
            return self.act, bias
        folded = qt.dequantize() @ self.act.bias
        return self.act, folded if bias is None else bias.detach().float() + folded


def columns_permuted(qt, perm: torch.Tensor):
    """`qt` (UniformQ or CodebookQ) with stored column j = column perm[j], where `perm` keeps every
    weight group's column set: only the codes (and sparse outliers) move; a LowbitError otherwise."""
    n, k = qt.shape
    g = effective_group(qt.group_size, k)
    if not torch.equal(perm // g, torch.arange(k) // g):
        raise LowbitError(f"the channel order moves columns between weight groups of {g}")
    if isinstance(qt, UniformQ):
        return dataclasses.replace(qt, qweight=pack(qt.codes()[:, perm], qt.bits))
    if isinstance(qt, CodebookQ):
        return CodebookQ.from_indices(qt.indices()[:, perm], qt.codebook, qt.bits, qt.group_size,
                                      qt.outliers_dense()[:, perm] if qt.has_outliers else None)
    raise LowbitError(f"Tender activations need uniform or codebook weights, not {qt.kind}")


def _permuted(stats, perm: torch.Tensor):
    return dataclasses.replace(stats, hessian=stats.hessian[perm][:, perm], abs_sum=stats.abs_sum[perm],
                               sample=[x[:, perm] for x in stats.sample], ch_min=stats.ch_min[perm],
                               ch_max=stats.ch_max[perm])


def _rotated(stats, h: torch.Tensor):
    sample = [x @ h for x in stats.sample]
    rows = sum(x.shape[0] for x in sample)
    abs_sum = sum(x.abs().sum(0) for x in sample) * (stats.tokens / rows) if rows else stats.abs_sum
    return dataclasses.replace(stats, hessian=h.T @ stats.hessian @ h, abs_sum=abs_sum, sample=sample,
                               ch_min=None, ch_max=None)


def groups_of(maxima: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Each channel's Tender group (int64 [K]) from its max |x − b| against T_i = TMax / 2^(G−1−i)."""
    tmax = maxima.max()
    thresholds = tmax / torch.exp2(torch.arange(n_groups - 1, 0, -1, dtype=torch.float32))  # T_0 … T_(G−2)
    return (maxima[:, None] > thresholds[None, :]).sum(1)


def tender_act(bias: torch.Tensor, maxima: torch.Tensor, spec: MethodConfig) -> ActQ:
    """Tender's ActQ from each channel's bias and max |x − bias|: groups, channels sorted by (weight
    group of `spec`, activation group, channel)."""
    group = groups_of(maxima, spec.act_groups)
    k = len(maxima)
    weight_group = torch.arange(k) // effective_group(spec.group_size, k)
    perm = torch.sort(weight_group * spec.act_groups + group, stable=True).indices
    return ActQ("tender", spec.act_bits, len(maxima), spec.act_groups, spec.act_chunk, bias[perm].contiguous(),
                perm.int(), group[perm].to(torch.uint8), maxima[perm].contiguous())


def centred(w: torch.Tensor, stats, spec: MethodConfig) -> ActQ:
    """Tender's ActQ with the channels centred (b = (max + min)/2) or not (b = 0), whichever gives the
    smaller output error ‖(x̂ + b − x)·Wᵀ‖ on the calibration sample (float W; module docstring)."""
    lo, hi = stats.ch_min, stats.ch_max
    options = [tender_act((hi + lo) / 2, (hi - lo) / 2, spec),
               tender_act(torch.zeros_like(lo), torch.maximum(hi.abs(), lo.abs()), spec)]
    x = stats.inputs()[:SEARCH_TOKENS]
    if len(x) == 0:
        return options[0]
    w = w.float()

    def error(act: ActQ) -> float:
        restored = torch.empty_like(x)
        restored[:, act.perm.long()] = act.fake_quantize(x) + act.bias
        return float((((restored - x) @ w.T) ** 2).sum())
    return min(options, key=error)


def fit(w: torch.Tensor, stats, spec: MethodConfig) -> Fit:
    """The activation quantizer of one layer (weight `w` [N, K], its input's statistics) by `spec`."""
    k = w.shape[1]
    act = ActQ(spec.act_method, spec.act_bits, k, spec.act_groups, spec.act_chunk)
    if spec.act_method == "tender":
        act = centred(w, stats, spec)
        perm = act.perm.long()
        return Fit(w[:, perm], _permuted(stats, perm), act, (w, stats))
    if spec.act_method == "hadamard":
        h = hadamard(k)
        return Fit(w.float() @ h, _rotated(stats, h), act)
    if spec.act_method == "per-tensor":
        act.maxima = torch.maximum(stats.ch_max.abs(), stats.ch_min.abs())
    return Fit(w, stats, act)


def check_blockwise(spec: MethodConfig) -> None:
    """A LowbitError for activations a block-wise weight method cannot take (module docstring)."""
    if spec.quantizes_acts and spec.act_method not in WEIGHT_PRESERVING:
        raise LowbitError(f"{spec.act_method} activations transform W's columns before the weights are quantized; "
                          f"{spec.name} quantizes whole blocks itself: use rtn, gptq or ganq weights with them "
                          f"(or {', '.join(WEIGHT_PRESERVING)} activations)")


def _fake_tokens(x: torch.Tensor, bits: int) -> torch.Tensor:
    return ActQ("per-token", bits, x.shape[1]).fake_quantize(x)


def _rtn_dequantized(w: torch.Tensor, spec: MethodConfig) -> torch.Tensor:
    """UniformQ.from_float(w, …).dequantize() without packing the codes and unpacking them again: the
    same numbers (integer codes, fp16-representable scales), for a search that tries many scales."""
    n, k = w.shape
    wg, _ = grouped(w, effective_group(spec.group_size, k))
    s, z = group_params(wg, spec.bits, spec.sym)
    return ((quantize_codes(wg, s[..., None], z[..., None], spec.bits) - z[..., None]) * s[..., None]).reshape(n, -1)[:, :k]


def search_smoothing(x: torch.Tensor, x_max: torch.Tensor, weights: list[torch.Tensor], spec: MethodConfig) -> torch.Tensor:
    """SmoothQuant's scales s [K] for inputs x (sample rows) of the linears `weights`, α searched."""
    w = torch.cat(weights).float()
    reference = x @ w.T
    w_max = w.abs().amax(0).clamp(min=1e-5)
    best, best_s = float("inf"), torch.ones_like(x_max)
    for alpha in ALPHAS:
        s = (x_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
        wq = _rtn_dequantized(w * s, spec)
        err = ((_fake_tokens(x / s, spec.act_bits) @ wq.T - reference) ** 2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s


def smooth_block(block: nn.Module, targets: dict[str, nn.Linear], stats: dict, spec: MethodConfig) -> None:
    """SmoothQuant's scales folded into the block in place (module docstring); `stats` follow."""
    def scales(st, weights):
        x_max = torch.maximum(st.ch_max.abs(), st.ch_min.abs())
        return search_smoothing(st.inputs()[:SEARCH_TOKENS], x_max, weights, spec)
    fold_shared_inputs(block, targets, stats, scales)
