"""SignRound (Cheng et al. 2023, Intel auto-round): learn, per decoder block, rounding offsets
V ∈ [−0.5, 0.5] for every weight and per-group factors in [0, 1] on the range's max and min, by
signed gradient descent on the block's output MSE; then round once with what was learned.

As auto-round (enable_quanted_input): the block sees the quantized model's inputs and is trained to
the float model's own outputs (calib.runner's fp_targets), so it also corrects the blocks before it.
Both range factors matter there: in SmolLM2 block 11 writes a ~23,000 attention-sink activation
that dominates the MSE, and only a range that may narrow either end fits it (block loss 24 → 3.9).

Defaults follow auto-round: 200 iterations, lr = 1/iters decaying linearly to 0, batches of 8
samples, the best iterate (lowest loss) kept. With iters = 0 the result is exactly RTN.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import UniformQ
from ..formats.uniform import effective_group, fake_quantize, group_params, grouped
from .config import MethodConfig


@dataclass(frozen=True)
class SignRound(MethodConfig):
    iters: int = field(default=200, metadata={"help": "optimisation iterations per block"})
    lr: float | None = field(default=None, metadata={"help": "learning rate (None: 1 / iters)"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per optimisation step"})
    seed: int = field(default=0, metadata={"help": "seed of the batch order"})
    name = "signround"
    needs_calib = True
    fp_targets = True  # as auto-round (enable_quanted_input): quantized inputs, the float model's outputs


CONFIG = SignRound


class _Learnable(nn.Module):
    """Stands in for one linear during the search: quantize-dequantize with learnable V and factors."""

    def __init__(self, linear: nn.Linear, spec: SignRound):
        super().__init__()
        self.linear, self.spec = linear, spec
        w = linear.weight.detach().float()
        self.g = effective_group(spec.group_size, w.shape[1])
        n_groups = -(-w.shape[1] // self.g)
        self.v = nn.Parameter(torch.zeros_like(w))
        self.max_factor = nn.Parameter(torch.ones(w.shape[0], n_groups))
        self.min_factor = nn.Parameter(torch.ones(w.shape[0], n_groups))

    def params(self):
        """Per-group (scale, zero) under the learned range factors."""
        w = self.linear.weight.detach().float()
        wg, _ = grouped(w, self.g)
        return group_params(wg, self.spec.bits, self.spec.sym, self.max_factor, self.min_factor)

    def _columns(self, per_group: torch.Tensor, cols: int) -> torch.Tensor:
        """[N, G] -> [N, cols]: each group's value repeated over its columns."""
        return per_group.repeat_interleave(self.g, dim=1)[:, :cols]

    def dequantized(self) -> torch.Tensor:
        return fake_quantize(self.linear.weight.detach().float(), self.spec.bits, self.spec.group_size,
                             self.spec.sym, self.v, self.max_factor, self.min_factor)

    def forward(self, x):
        return F.linear(x, self.dequantized().to(x.dtype), self.linear.bias)

    def learnable(self) -> list[nn.Parameter]:
        return [self.v, self.max_factor, self.min_factor]

    def clamp_(self):
        """auto-round's bounds: V in [-0.5, 0.5], both range factors in [0, 1] (sym too: the larger
        narrowed end sets the scale, see group_params)."""
        with torch.no_grad():
            self.v.clamp_(-0.5, 0.5)
            self.max_factor.clamp_(0.0, 1.0)
            self.min_factor.clamp_(0.0, 1.0)

    def to_qtensor(self) -> UniformQ:
        with torch.no_grad():
            w = self.linear.weight.detach().float()
            scale, zero = self.params()
            return UniformQ.from_params(w + self.v * self._columns(scale, w.shape[1]), scale, None if self.spec.sym else zero,
                                        self.spec.bits, self.spec.group_size)


def quantize_block(block: nn.Module, targets: dict[str, nn.Linear], stats, spec: SignRound, *,
                   inputs, kwargs, fp_outputs) -> dict:
    learn = {name: _Learnable(m, spec) for name, m in targets.items()}
    for name, m in learn.items():
        block.set_submodule(name, m)
    try:
        if spec.iters > 0:
            _optimise(block, learn, spec, inputs, kwargs, fp_outputs)
        return {name: m.to_qtensor() for name, m in learn.items()}
    finally:
        for name, m in targets.items():
            block.set_submodule(name, m)


def _optimise(block, learn, spec, inputs, kwargs, fp_outputs):
    params = [p for m in learn.values() for p in m.learnable()]
    frozen = [p for p in block.parameters() if all(p is not q for q in params)]
    was = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    lr0 = spec.lr or 1.0 / spec.iters
    gen = torch.Generator().manual_seed(spec.seed)
    best_loss, best = float("inf"), None
    try:
        for step in range(spec.iters):
            idx = torch.randperm(len(inputs), generator=gen)[: spec.batch_size].tolist()
            x = torch.cat([inputs[i] for i in idx])
            y = torch.cat([fp_outputs[i] for i in idx])
            with torch.enable_grad():
                out = block(x, **kwargs)
                loss = F.mse_loss((out[0] if isinstance(out, tuple) else out).float(), y.float())
                loss.backward()
            if loss.item() < best_loss:
                best_loss = loss.item()
                best = [p.detach().clone() for p in params]
            lr = lr0 * (1 - step / spec.iters)
            with torch.no_grad():
                for p in params:
                    p -= lr * p.grad.sign()
                    p.grad = None
            for m in learn.values():
                m.clamp_()
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
    finally:
        for p, w in zip(frozen, was):
            p.requires_grad_(w)
