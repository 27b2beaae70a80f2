"""Block-by-block calibration (GPTQ's sequential scheme), memory bounded by one decoder block.

1. Tokenize the calibration text into `n_samples` windows of `seq_len` tokens.
2. Run the model once with every decoder block replaced by a recorder: this captures block 0's input
   hidden states per sample and, per block, the keyword arguments the model passes it (masks,
   rotary embeddings, which differ between sliding and full attention blocks).
3. For each block i: run it in float over the samples while hooks gather, per linear layer, the
   statistics a method needs (H = Σ x xᵀ, mean |x|, each channel's min and max, a sample of inputs);
   NaN or Inf among them is refused (nothing is fitted to them); let the method quantize the
   block's linears; re-run the quantized block to produce block i+1's inputs; then `finish` the block
   (a W·A· model's Tender layers take their activation quantizers only here, recipes/apply.py: the
   stream stays the weight-only model's, so its weights are fitted, and come out, as that model's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LowbitError
from ..models import LazyBlocks
from ..models.blocks import capture_inputs, decoder_layers, run_block

SAMPLE_TOKENS = 2048  # input rows kept per layer for methods that search on activations (AWQ, TEQ)


@dataclass
class LayerStats:
    """What calibration measured at one linear layer's input (K = in_features)."""
    hessian: torch.Tensor  # Σ x xᵀ over all calibration tokens, fp32 [K, K]
    abs_sum: torch.Tensor  # Σ |x| per input channel [K]
    tokens: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)  # up to SAMPLE_TOKENS rows of x
    ch_min: torch.Tensor | None = None  # min and max of x per input channel [K] (activation ranges)
    ch_max: torch.Tensor | None = None

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.empty(0, self.hessian.shape[0])

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if not bool(torch.isfinite(x).all()):
            raise LowbitError("the calibration activations hold NaN or Inf: the float model overflows on the "
                              "calibration text (check the source's weights, or use other text)")
        lo, hi = x.amin(0), x.amax(0)
        self.ch_min = lo if self.ch_min is None else torch.minimum(self.ch_min, lo)
        self.ch_max = hi if self.ch_max is None else torch.maximum(self.ch_max, hi)
        self.hessian.addmm_(x.T, x)
        self.abs_sum += x.abs().sum(0)
        self.tokens += x.shape[0]
        kept = sum(s.shape[0] for s in self.sample)
        if kept < SAMPLE_TOKENS:
            self.sample.append(x[: SAMPLE_TOKENS - kept].clone())

    def rescale_inputs(self, s: torch.Tensor) -> None:
        """The layer's inputs became x / s (AWQ folding): update the statistics to match."""
        self.hessian /= s[:, None] * s[None, :]
        self.abs_sum /= s
        if self.ch_min is not None:
            self.ch_min, self.ch_max = self.ch_min / s, self.ch_max / s
        self.sample = [x / s for x in self.sample]

    def relative_error(self, w: torch.Tensor, w_hat: torch.Tensor) -> float:
        """‖(W − Ŵ)X‖ / ‖WX‖ over all calibration tokens, computed from H alone."""
        dw = (w - w_hat).float()
        num = (dw @ self.hessian * dw).sum()
        den = (w.float() @ self.hessian * w.float()).sum()
        return (num / den).clamp(min=0).sqrt().item() if den > 0 else 0.0


def calibration_batches(tokenizer, text: str, n_samples: int, seq_len: int) -> list[torch.Tensor]:
    """`n_samples` windows of `seq_len` tokens, spread evenly over the text (deterministic)."""
    if n_samples < 1 or seq_len < 2:
        raise LowbitError(f"need at least one calibration sample of 2+ tokens (got {n_samples} × {seq_len})")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    windows = len(ids) // seq_len
    if windows == 0:
        raise LowbitError(f"calibration text is too short: {len(ids)} tokens, need {seq_len} per sample")
    if windows < n_samples:
        raise LowbitError(f"calibration text has {len(ids)} tokens: enough for {windows} samples of "
                          f"{seq_len}, not {n_samples} (use fewer samples, shorter ones, or more text)")
    starts = torch.linspace(0, windows - 1, n_samples).round().long() * seq_len
    return [ids[s: s + seq_len].unsqueeze(0) for s in starts.tolist()]


@torch.no_grad()
def gather_stats(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> tuple[dict[str, LayerStats], list]:
    """Run the float block over the samples; per linear layer, the statistics of its inputs."""
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    stats = {name: LayerStats(torch.zeros(m.in_features, m.in_features), torch.zeros(m.in_features))
             for name, m in linears.items()}
    hooks = [m.register_forward_pre_hook(lambda mod, args, s=stats[name]: s.add(args[0]))
             for name, m in linears.items()]
    try:
        outputs = run_block(block, inputs, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return stats, outputs


BlockQuantizer = Callable[[nn.Module, list, dict, list, dict], dict]


def quantize_blocks(model: nn.Module, batches: list[torch.Tensor], quantize_block: BlockQuantizer,
                    progress: bool = True, checkpoint=None, fp_targets: bool = False,
                    lazy: LazyBlocks | None = None,
                    finish: Callable[[nn.Module], None] | None = None) -> dict[str, float]:
    """Quantize the model block by block. `quantize_block(block, inputs, kwargs, targets, stats)`
    replaces the block's linears in place and returns {layer name: ‖WX−ŴX‖/‖WX‖}; the returned
    errors add, per block, "i.block": the relative error of the quantized block's output. `inputs`
    come from the blocks already quantized (GPTQ's sequential order); `targets` are the float block's
    outputs on them, or with `fp_targets` the float model's own outputs (a second, float stream of
    activations, as auto-round's enable_quanted_input: a block trained to them also undoes the error
    of the blocks before it). A lazy model (its loader `lazy`, models/lazy.py) has each block's float
    weights read just before the block is quantized. `finish(block)`, if given, runs after the block's
    outputs were passed on and before it is checkpointed.
    With a `checkpoint` (io.BlockCheckpoint), each finished block is written there and dropped from
    memory (its tensors on meta): io.save writes the model from those files, the checkpoint's `reload` brings
    them back to run it."""
    layers = decoder_layers(model)
    inputs, layer_kwargs = capture_inputs(model, batches)
    fp_inputs = inputs if fp_targets else None
    resumed = checkpoint.restore(layers) if checkpoint is not None else None
    start = 0
    if resumed:
        start, inputs, stored_fp = resumed
        fp_inputs = (stored_fp if stored_fp is not None else inputs) if fp_targets else None
    errors = {}
    bar = tqdm(list(enumerate(layers))[start:], desc="quantizing blocks", unit="block", disable=not progress,
               initial=start, total=len(layers))
    for i, block in bar:
        if lazy is not None:
            lazy.load(i)
        stats, fp_outputs = gather_stats(block, inputs, layer_kwargs[i])
        targets = run_block(block, fp_inputs, layer_kwargs[i]) if fp_targets else fp_outputs
        block_errors = quantize_block(block, inputs, layer_kwargs[i], targets, stats)
        errors.update({f"{i}.{k}": v for k, v in block_errors.items()})
        inputs = run_block(block, inputs, layer_kwargs[i])
        errors[f"{i}.block"] = relative_error(fp_outputs, inputs)
        if finish is not None:
            finish(block)
        fp_inputs = targets if fp_targets else None
        if lazy is not None:
            lazy.finish(i)
        if checkpoint is not None:
            checkpoint.save(i, block, inputs, fp_inputs)  # the block leaves memory: io.save writes it from its file
        worst = max(block_errors, key=block_errors.get) if block_errors else None
        bar.set_postfix_str((f"worst layer {worst} {block_errors[worst]:.4f}, " if worst else "")
                            + f"block output {errors[f'{i}.block']:.4f}")
        del stats, fp_outputs, targets  # one block's statistics at a time (GPTQ's Hessians: K² floats per layer)
    return errors


def relative_error(reference: list[torch.Tensor], approx: list[torch.Tensor]) -> float:
    """‖Ŷ − Y‖ / ‖Y‖ over all samples."""
    num = sum(((a.float() - r.float()) ** 2).sum() for r, a in zip(reference, approx))
    den = sum((r.float() ** 2).sum() for r in reference)
    return float((num / den).sqrt()) if den > 0 else 0.0
