"""Applying a Plan to a model: every named layer replaced by its quantized form, in place.

Two passes, both in the model's module order:
1. Calibrated (if any layer's spec needs calibration): the block runner (calib/runner.py) goes
   through the decoder blocks; in each, the plan's layers are grouped by spec and each group goes to
   its method: layer-wise methods (`quantize(W, stats, spec)`: rtn, gptq, ganq) one layer at a time,
   so a block may mix them freely; block-wise methods (`quantize_block`: awq, teq, signround) transform
   the whole block (they fold or train scales across its layers), so a plan that uses one gives it
   every quantized layer inside the blocks, with one spec.
2. Everything else (a plan without calibration, or layers outside the blocks): each layer rounded
   by its spec with no statistics; a lazy model's blocks are read one at a time as the walk gets to them.
`apply` returns each calibrated layer's measured loss: tr(ΔW H ΔWᵀ)/tokens on the inputs the layer gets
in the quantized model (the blocks before it quantized), the quantity a recipe predicts (sensitivity.py)
on float inputs; the recipe report (recipe_report.py) sets the two side by side.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calib.runner import calibration_batches, quantize_blocks
from ..errors import LowbitError
from ..methods import METHODS, MethodConfig, quantize_weight, tender
from ..models import LazyBlocks, check_finite
from ..nn import ActQuantLinear, QuantEmbedding, QuantLinear, embedding_scale
from .plan import Plan, block_prefix
from .sensitivity import output_error


def replace(model: nn.Module, name: str, module: nn.Module, qt) -> None:
    if isinstance(module, nn.Embedding):
        model.set_submodule(name, QuantEmbedding(qt, module.padding_idx, module.weight.dtype, embedding_scale(module)))
    else:
        model.set_submodule(name, QuantLinear(qt, module.bias))


def _blockwise(spec: MethodConfig) -> bool:
    return hasattr(METHODS[spec.name], "quantize_block")


def block_quantizer(specs: dict[int, MethodConfig], losses: dict[int, float] | None = None,
                    pending: dict[str, nn.Module] | None = None):
    """The block runner's step for the layers in `specs` (id(module) -> spec): quantize each group of
    one spec with its method, replace the layers, return their relative output errors (and put each
    layer's output_error into `losses`, by the id of the float module it replaced). Specs that
    quantize activations too have them fitted (methods/tender.py): SmoothQuant's scales folded into
    the block first, then each layer's ActQ around its weight method (W's columns rotated before it
    quantizes them, or its codes permuted after: Fit.quantize).
    With `pending` (a dict that `finished` empties after the runner passed the block's outputs on), a
    Tender layer goes in as its weight-only self (Ŵ in the input order, its own bias) and its W·A· form
    waits there: the next block's inputs are then the weight-only model's, so a calibrated method
    (GPTQ) fits every block's weights, and they come out, bit for bit, as the weight-only model's with
    its columns moved; Tender's ranges are measured on those inputs too. Fitting on inputs that passed
    through activation-quantized blocks gave other GPTQ weights and a worse model (SmolLM2 W4-g128
    A8-tender G8: +3.09% over A16 against +1.05% with the A16 weights, BENCHMARKS.md)."""

    def run(block, inputs, kwargs, fp_outputs, stats):
        mine = {name: m for name, m in block.named_modules() if id(m) in specs}
        groups = {}
        for name, m in mine.items():
            groups.setdefault(specs[id(m)], {})[name] = m
        for spec, group in groups.items():
            if _blockwise(spec):
                tender.check_blockwise(spec)
            if spec.quantizes_acts and spec.act_method == "smoothquant":
                tender.smooth_block(block, group, stats, spec)
        qts, fits = {}, {}
        for spec, group in groups.items():
            method = METHODS[spec.name]
            if _blockwise(spec):
                qts.update(method.quantize_block(block, group, stats, spec, inputs=inputs, kwargs=kwargs,
                                                 fp_outputs=fp_outputs))
                if spec.quantizes_acts:
                    fits.update({name: tender.fit(m.weight.detach(), stats[name], spec) for name, m in group.items()})
                continue
            for name, m in group.items():
                if spec.quantizes_acts:
                    fits[name] = tender.fit(m.weight.detach(), stats[name], spec)
                    qts[name] = fits[name].quantize(method, spec)
                else:
                    qts[name] = method.quantize(m.weight.detach(), stats[name], spec)
        errors = {}
        for name, qt in qts.items():
            fitted = fits.get(name)
            w, layer_stats = (mine[name].weight.detach(), stats[name]) if fitted is None \
                else (fitted.weight, fitted.stats)
            w_hat = qt.dequantize()
            errors[name] = layer_stats.relative_error(w, w_hat)
            if losses is not None:
                losses[id(mine[name])] = output_error(w, w_hat, layer_stats)
            if fitted is None:
                replace(block, name, mine[name], qt)
                continue
            act, bias = fitted.finish(qt, mine[name].bias)
            if pending is not None and fitted.source is not None:  # Tender: the weight-only layer until finished
                pending[name] = ActQuantLinear(qt, act, bias)
                replace(block, name, mine[name], fitted.weight_only(qt))
            else:
                block.set_submodule(name, ActQuantLinear(qt, act, bias))
        return errors
    return run


def finished(pending: dict[str, nn.Module]):
    """The block runner's `finish` for a block_quantizer with `pending`: its W·A· layers go in."""
    def finish(block: nn.Module) -> None:
        for name, layer in pending.items():
            block.set_submodule(name, layer)
        pending.clear()
    return finish


def _check(model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
    """The plan's modules in the model's order, after checking that each exists and its spec fits."""
    modules = {name: m for name, m in model.named_modules() if name in plan.layers}
    missing = [name for name in plan.layers if name not in modules]
    if missing:
        raise LowbitError(f"the plan names {missing[0]}, which the model does not have")
    for name, m in modules.items():
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            raise LowbitError(f"the plan names {name}, a {type(m).__name__}: only linear layers and the "
                              "input embedding are quantized")
        cols, group = m.weight.shape[1], plan.layers[name].group_size
        if group > cols:
            raise LowbitError(f"group size {group} does not fit layer {name} with "
                              f"{cols} input features (use a smaller group or -1 for whole rows)")
    return modules


def _calibrated(model: nn.Module, plan: Plan) -> tuple[dict[str, MethodConfig], bool]:
    """The layers the block runner quantizes (name -> spec), and whether it trains to the float
    model's outputs; a LowbitError for a plan it cannot run."""
    prefix = block_prefix(model)
    outside = [n for n, s in plan.layers.items() if s.needs_calib and not n.startswith(prefix)]
    if outside:
        raise LowbitError(f"the plan gives {plan.layers[outside[0]].name} to {outside[0]}, outside the "
                          "decoder blocks: calibrated methods run only inside them (use rtn there)")
    inside = {n: s for n, s in plan.layers.items() if n.startswith(prefix)}
    blockwise = [s for s in dict.fromkeys(inside.values()) if _blockwise(s)]
    if blockwise and len(set(inside.values())) > 1:
        others = ", ".join(sorted({f"{s.name} {s.scheme}" for s in inside.values() if s != blockwise[0]}))
        raise LowbitError(f"the plan mixes {blockwise[0].name} with {others} inside the decoder blocks: "
                          f"{blockwise[0].name} transforms whole blocks and takes one spec for all their layers")
    return inside, any(s.fp_targets for s in inside.values())


def _tied_pair(modules: dict[str, nn.Module], plan: Plan, head, embed) -> dict[str, str]:
    """{head: embedding, embedding: head} when both are in the plan with one spec and hold the same
    weight (tie_word_embeddings): quantized once, the two layers share one QTensor (io stores it once,
    as llama.cpp stores a tied output); else {}."""
    names = {m: n for n, m in modules.items()}
    if head is None or embed is None or head not in names or embed not in names \
            or head.weight is not embed.weight or plan.layers[names[head]] != plan.layers[names[embed]]:
        return {}
    return {names[head]: names[embed], names[embed]: names[head]}


def apply(model: nn.Module, plan: Plan, *, tokenizer=None, text: str | None = None, calib_samples: int = 128,
          calib_seq_len: int = 512, lazy: LazyBlocks | None = None, checkpoint=None,
          progress: bool = True) -> dict[str, float]:
    """Quantize `model` in place by `plan`; the measured loss of every layer the block runner quantized
    (name -> tr(ΔW H ΔWᵀ)/tokens; none for a resumed run's finished blocks). Calibrated specs need the
    model's `tokenizer` and the calibration `text` (`calib_samples` windows of `calib_seq_len` tokens).
    `lazy`: the loader of a lazy model (models/lazy.py). `checkpoint` (io.BlockCheckpoint): each finished
    block is written there and leaves memory (a calibrated run resumes from it)."""
    check_finite(model)  # a lazy model's files were checked as it was loaded
    modules = _check(model, plan)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    unties = any(m is head or m is embed for m in modules.values())
    tied = _tied_pair(modules, plan, head, embed)
    names = list(modules)
    del modules  # from here on modules are named, not held: a replaced layer's float weights must be freed at once
    measured = {}
    if plan.needs_calib:
        if tokenizer is None:
            first = next(s for s in plan.specs if s.needs_calib)
            raise LowbitError(f"{first.name} needs calibration text: pass the model's tokenizer")
        inside, fp_targets = _calibrated(model, plan)
        batches = calibration_batches(tokenizer, text, calib_samples, calib_seq_len)
        ids = {id(model.get_submodule(n)): n for n in inside}
        losses, pending = {}, {}
        quantize_blocks(model, batches, block_quantizer({i: inside[n] for i, n in ids.items()}, losses, pending),
                        progress, checkpoint, fp_targets, lazy, finished(pending))
        measured = {ids[i]: loss for i, loss in losses.items()}
        names = [n for n in names if n not in inside]
    if lazy is not None and checkpoint is not None:
        lazy.on_finish = checkpoint.keep  # each rounded block goes to disk and leaves memory
    rest = Plan({n: plan.layers[n] for n in names}) if names else None
    shared = {}  # a tied head's or embedding's QTensor, for its twin
    for name in tqdm(names, desc=f"quantizing {rest.summary() if rest else ''}", unit="layer",
                     disable=not progress or not names):
        if lazy is not None:
            lazy.need(name)  # rounding block by block: one float block in memory at a time
        m = model.get_submodule(name)
        if name in tied and tied[name] in shared:
            qt = shared[tied[name]]  # the tied twin was rounded already: the same tensors, stored once
        else:
            with torch.no_grad():
                qt = quantize_weight(m.weight.detach(), None, plan.layers[name])
            if name in tied:
                shared[name] = qt
        replace(model, name, m, qt)
        del m, qt
    if lazy is not None:
        lazy.close(checkpoint)
    if unties and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # head and embedding are now stored separately
    return measured
