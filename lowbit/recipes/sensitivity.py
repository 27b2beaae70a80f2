"""Sensitivity: the loss each candidate adds at each layer, predicted from calibration statistics.

For a layer W with calibration inputs X (H = XXᵀ, what the block runner already gathers for GPTQ) and
a candidate's quantized Ŵ, ΔW = W − Ŵ:

    loss(layer, candidate) = a(block) · p(layer) · tr(ΔW · H · ΔWᵀ) / tokens

tr(ΔW H ΔWᵀ)/tokens = mean over tokens of ‖ΔW x‖², the squared error the candidate adds to the layer's
output per token (the quantity GPTQ and GANQ minimise: it ranks a layer's candidates against each
other). p is the layer's propagation: how much of an error at this layer's output reaches the block's
output (the residual stream), measured once per layer on PROPAGATION_SAMPLES windows as
‖ΔY_block‖² / ‖ΔW x‖² with the layer alone rounded to REFERENCE: an error in v_proj reaches the
residual through attention and o_proj 4-10x larger, one in gate_proj ~3x, the last block's up_proj
60-90x, one in q_proj through the softmax 11-14x smaller, and o_proj/down_proj write the residual
directly (p ~ 1). a is the block's amplification: the KL divergence of the model's output per unit of
squared error at the block's output (per token), measured once per block on AMPLIFICATION_SAMPLES
windows with the block's layers all rounded to REFERENCE and every later block float, so the loss is
in nats of KLD. Without a, layers of different blocks were compared by the absolute size of their
errors in the residual stream, whose typical ‖h‖² grows ~300x from SmolLM2's first block to its last:
an early block's error counted as cheap, where the later blocks read it through their norms at full
relative size and amplify it (a falls ~10x over the first 9 blocks there). The recipes put 2-bit rows
in the early blocks and 3-4 bits in the late ones, and at 2.5 bpw that model scored ppl 32,799 where
uniform W2-g64 scores ~8,600 (BENCHMARKS.md, issue 18).
Across layers the sum is the recipe's predicted loss: errors of different layers treated as
independent and additive, the first-order assumption of every mixed-precision allocator from HAWQ to
llama.cpp's imatrix.
Each candidate is made by its own method on the layer's float inputs (the float model's, block after
block: what a layer's error costs with the rest exact), so the loss is that of the QTensor the recipe
would store. Streaming: one decoder block, its inputs and its Hessians at a time, plus one stream of
AMPLIFICATION_SAMPLES windows per block carried (block i rounded, the rest float) to the output; a
lazy model's block is read before and dropped (to meta) after. The work is shared as far as the maths allows:
  - one H per distinct layer input (q/k/v read one tensor, gate/up another): 3 Hessians a block, not 7;
  - the float block runs once (its outputs are the next block's inputs: nothing is quantized);
  - GPTQ candidates of the layers that share an H are one stacked GPTQ pass (methods/gptq.py
    quantize_many: rows are independent under one H⁻¹), up to STACK weights at a time, so its
    Python-bound column loop runs once per input, not once per layer and candidate (bit-identical to
    quantizing each alone);
  - the losses of a stack are one matmul: the row sums of (ΔW H) ∘ ΔW, summed per layer;
  - the propagation runs the block once per layer on a few windows (its layer's output error by a hook);
  - every block's amplification stream advances through each later block once, on AMPLIFICATION_SAMPLES windows.
benchmarks/recipes.py checks the proxy against the model-level KL divergence of quantizing one
layer alone (Spearman rank correlation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tqdm.auto import tqdm

from ..calib.runner import LayerStats, calibration_batches
from ..errors import LowbitError
from ..methods import METHODS, RTN, MethodConfig
from ..methods.gptq import quantize_many
from ..models import LazyBlocks
from ..models.blocks import capture_inputs, decoder_layers, finish_forward, run_block
from .candidates import fits, name
from .plan import block_prefix

STACK = 2**24  # weights quantized in one stacked GPTQ pass (64 MB of fp32 per copy; a 7B layer goes alone)
PROPAGATION_SAMPLES = 4  # calibration windows that measure each layer's propagation to the block output
AMPLIFICATION_SAMPLES = 2  # windows that carry each block's rounded output to the model's logits
REFERENCE = RTN(bits=3, group_size=-1, sym=False)  # the rounding that measures it (fits every layer)


@dataclass
class Sensitivity:
    shapes: dict[str, tuple[int, int]]  # layer name -> [out, in], in the model's order
    loss: dict[str, dict[str, float]]  # layer name -> candidate token -> predicted loss (fitting ones only)
    tokens: int  # calibration tokens behind every number
    propagation: dict[str, float]  # layer name -> p, a factor inside its losses
    amplification: dict[str, float] = field(default_factory=dict)  # layer name -> a of its block, the other factor

    def raw(self, layer: str, candidate: str) -> float:
        """The candidate's loss without the two factors: tr(ΔW H ΔWᵀ)/tokens, what apply measures."""
        return self.loss[layer][candidate] / self.propagation.get(layer, 1.0) / self.amplification.get(layer, 1.0)

    def to_dict(self) -> dict:
        return {"shapes": {n: list(s) for n, s in self.shapes.items()}, "loss": self.loss, "tokens": self.tokens,
                "propagation": self.propagation, "amplification": self.amplification}


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


def shared_stats(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict,
                 names: dict[int, str]) -> tuple[list[tuple[list[str], LayerStats]], list[torch.Tensor]]:
    """Run the float block once over the samples: the statistics of each distinct input of the linears
    in `names` (module id -> name), with the layers that read it ([names], stats), and the outputs."""
    groups: dict[str, tuple[list[str], LayerStats]] = {}
    reader: dict[str, str] = {}  # layer -> the first layer that read the same input (its group's key)
    last: list = [None, None]  # the input tensor the previous hooked layer read, and that layer

    def hook(module, args):
        layer, x = names[id(module)], args[0]
        if layer not in reader:  # first sample: a layer reading the very tensor its predecessor read shares
            reader[layer] = reader[last[1]] if last[0] is x else layer
            if reader[layer] == layer:
                groups[layer] = ([], LayerStats(torch.zeros(x.shape[-1], x.shape[-1]), torch.zeros(x.shape[-1])))
            groups[reader[layer]][0].append(layer)
        last[:] = [x, layer]
        if reader[layer] == layer:
            groups[layer][1].add(x)

    hooks = [m.register_forward_pre_hook(hook) for m in block.modules() if id(m) in names]
    try:
        outputs = run_block(block, inputs, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return list(groups.values()), outputs


def _stacks(specs: list[MethodConfig], rows: int, cols: int) -> list[tuple[MethodConfig, ...]]:
    """GPTQ specs in runs that share one quantize_many call: same damp, block size and act order, at
    most STACK weights (rows × cols × specs) at a time (one spec at least)."""
    runs: list[list[MethodConfig]] = []
    for spec in specs:
        run = runs[-1] if runs else None
        if run and (run[0].damp, run[0].block_size, run[0].act_order) == (spec.damp, spec.block_size, spec.act_order) \
                and (len(run) + 1) * rows * cols <= STACK:
            run.append(spec)
        else:
            runs.append([spec])
    return [tuple(r) for r in runs]


def group_losses(weights: list[torch.Tensor], stats: LayerStats,
                 specs: tuple[MethodConfig, ...]) -> list[dict[str, float]]:
    """The loss of every spec (each fitting all `weights`) on each of `weights`, layers that share
    `stats` (one input): a dict per layer, candidate token -> loss."""
    w = torch.cat([x.detach().float() for x in weights]) if len(weights) > 1 else weights[0].detach().float()
    bounds = torch.tensor([0] + [x.shape[0] for x in weights]).cumsum(0).tolist()
    out: list[dict[str, float]] = [{} for _ in weights]

    def record(run: tuple[MethodConfig, ...], dequantized: list[torch.Tensor]) -> None:
        dw = torch.cat(dequantized) - w.repeat(len(run), 1) if len(run) > 1 else dequantized[0] - w
        per_row = ((dw @ stats.hessian) * dw).sum(1) / max(stats.tokens, 1)
        for c, spec in enumerate(run):
            offset = c * w.shape[0]
            for i in range(len(weights)):
                out[i][name(spec)] = float(per_row[offset + bounds[i]: offset + bounds[i + 1]].sum())

    gptq = [s for s in specs if s.name == "gptq"]
    for run in _stacks(gptq, *w.shape):
        record(run, [qt.dequantize() for qt in quantize_many(w, stats, run)])
    for spec in specs:
        if spec.name != "gptq":
            record((spec,), [torch.cat([METHODS[spec.name].quantize(x, stats, spec).dequantize() for x in weights])])
    return out


def propagation(block: nn.Module, module: nn.Linear, inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                kwargs: dict) -> float:
    """‖ΔY_block‖² / ‖ΔW x‖² over `inputs` with `module` alone rounded to REFERENCE (`outputs`: the float
    block's): the share of one layer's output error that reaches the block's output."""
    w = module.weight.data
    rounded = _reference(w)
    layer_err = torch.zeros((), dtype=torch.float64)

    def hook(mod, args, out):
        layer_err.add_(((out - nn.functional.linear(args[0], w, mod.bias)).double() ** 2).sum())

    handle = module.register_forward_hook(hook)
    module.weight.data = rounded
    try:
        rounded_out = run_block(block, inputs, kwargs)
    finally:
        module.weight.data = w
        handle.remove()
    block_err = sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(rounded_out, outputs))
    return float(block_err / layer_err) if layer_err > 0 else 1.0


def _reference(w: torch.Tensor) -> torch.Tensor:
    """`w` rounded to REFERENCE, in its own dtype: the error that propagation and amplification measure with."""
    return METHODS[REFERENCE.name].quantize(w, None, REFERENCE).dequantize().to(w.dtype)


def _rounded(block: nn.Module, modules: list[nn.Linear], inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """The block's outputs on `inputs` with `modules` (its linears) all rounded to REFERENCE."""
    weights = [m.weight.data for m in modules]
    try:
        for m, w in zip(modules, weights):
            m.weight.data = _reference(w)
        return run_block(block, inputs, kwargs)
    finally:
        for m, w in zip(modules, weights):
            m.weight.data = w


def _kld(model: nn.Module, ids: list[torch.Tensor], reference: list[torch.Tensor], final: list[torch.Tensor]) -> float:
    """Mean KL divergence per token of the model's output from its last block's `final` states against
    the `reference` log-probabilities, over the windows `ids`."""
    total = tokens = 0.0
    for window, ref, h in zip(ids, reference, final):
        logq = torch.log_softmax(finish_forward(model, window, h).logits[0].float(), -1)
        total += float((ref.exp() * (ref - logq)).sum())
        tokens += ref.shape[0]
    return total / max(tokens, 1)


@torch.no_grad()
def measure(model: nn.Module, tokenizer, text: str, candidates: tuple[MethodConfig, ...],
            layers: list[str] | None = None, samples: int = 32, seq_len: int = 512, progress: bool = True,
            lazy: LazyBlocks | None = None) -> Sensitivity:
    """The predicted loss of every candidate that fits each of `layers` (default: every linear inside
    the decoder blocks), from `samples` windows of `seq_len` tokens of `text`. The model is unchanged
    (a `lazy` model's blocks are read one at a time and go back to meta)."""
    names = block_linears(model) if layers is None else list(layers)
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise LowbitError(f"sensitivity: {missing[0]} is not a linear layer inside the model's decoder blocks")
    by_id = {id(modules[n]): n for n in names}
    shapes = {n: tuple(modules[n].weight.shape) for n in names}
    loss: dict[str, dict[str, float]] = {n: {} for n in names}
    factor: dict[str, float] = {}
    tokens = 0
    batches = calibration_batches(tokenizer, text, samples, seq_len)
    inputs, kwargs = capture_inputs(model, batches)
    blocks = decoder_layers(model)
    wanted = [[m for m in block.modules() if id(m) in by_id] for block in blocks]
    last = max(i for i, w in enumerate(wanted) if w) if any(wanted) else -1
    few, amp = slice(0, PROPAGATION_SAMPLES), slice(0, AMPLIFICATION_SAMPLES)
    streams: dict[int, list[torch.Tensor]] = {}  # block -> its rounded output carried on through the float blocks
    errors: dict[int, float] = {}  # block -> squared error per token at its output, rounded
    for i, block in enumerate(tqdm(blocks if last >= 0 else [], desc="sensitivity", unit="block", disable=not progress)):
        if lazy is not None:
            lazy.load(i)
        for k in streams:
            streams[k] = run_block(block, streams[k], kwargs[i])
        if not wanted[i]:
            inputs = run_block(block, inputs, kwargs[i])
        else:
            groups, outputs = shared_stats(block, inputs, kwargs[i], by_id)
            for members, stats in groups:
                cols = shapes[members[0]][1]
                fitting = tuple(s for s in candidates if fits(s, cols))
                stacked = sum(shapes[n][0] for n in members) * cols <= STACK
                for part in [members] if stacked else [[n] for n in members]:
                    for n, found in zip(part, group_losses([modules[n].weight for n in part], stats, fitting)):
                        factor[n] = propagation(block, modules[n], inputs[few], outputs[few], kwargs[i])
                        loss[n].update({c: factor[n] * v for c, v in found.items()})
                tokens = max(tokens, stats.tokens)
            del groups
            streams[i] = _rounded(block, wanted[i], inputs[amp], kwargs[i])
            errors[i] = sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(streams[i], outputs[amp])) \
                / sum(x.shape[0] * x.shape[1] for x in outputs[amp])
            inputs = outputs
        if i == last:
            inputs = inputs[amp]  # past the last wanted block only the amplification windows go on
        if lazy is not None:  # back to meta: the next read of this block is from the shards again
            block.to("meta")
            lazy.loaded.discard(i)
    gain: dict[str, float] = {}
    if streams:
        ids = batches[amp]
        reference = [torch.log_softmax(finish_forward(model, w, h).logits[0].float(), -1) for w, h in zip(ids, inputs)]
        for i, final in streams.items():
            a = _kld(model, ids, reference, final) / errors[i] if errors[i] > 0 else 0.0
            for n in (by_id[id(m)] for m in wanted[i]):
                gain[n] = a
                loss[n] = {c: a * v for c, v in loss[n].items()}
    return Sensitivity(shapes, loss, tokens, factor, gain)
