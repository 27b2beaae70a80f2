"""TEQ (Cheng et al. 2023): trainable equivalent transformation. Per group of linears sharing an input
(as in AWQ), learn per-channel scales s with Adam on the block's output MSE against the float block,
the layers computing Q(W·diag(s))·(x/s) with straight-through rounding; then fold 1/s into the
producer exactly as AWQ does and round to nearest.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import UniformQ
from ..formats.uniform import fake_quantize
from .awq import fold_scales, shared_inputs
from .config import MethodConfig


@dataclass(frozen=True)
class TEQ(MethodConfig):
    steps: int = field(default=200, metadata={"help": "optimisation steps per block"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per optimisation step"})
    seed: int = field(default=0, metadata={"help": "seed of the batch order"})
    name = "teq"
    needs_calib = True


CONFIG = TEQ


class _Scaled(nn.Module):
    def __init__(self, linear: nn.Linear, s: nn.Parameter, spec: TEQ):
        super().__init__()
        self.linear, self.s, self.spec = linear, s, spec

    def forward(self, x):
        w = fake_quantize(self.linear.weight.detach().float() * self.s, self.spec.bits, self.spec.group_size,
                          self.spec.sym)
        return F.linear(x / self.s.to(x.dtype), w.to(x.dtype), self.linear.bias)


def quantize_block(block: nn.Module, targets: dict[str, nn.Linear], stats, spec: TEQ, *,
                   inputs, kwargs, fp_outputs) -> dict:
    groups = [(producer, consumers, nn.Parameter(torch.ones(targets[consumers[0]].in_features)))
              for producer, consumers in shared_inputs(block, targets)]
    if spec.steps > 0 and groups:
        _train(block, targets, groups, spec, inputs, kwargs, fp_outputs)
    with torch.no_grad():
        for producer, consumers, s in groups:
            fold_scales(producer, [targets[n] for n in consumers], s.detach())
    return {name: UniformQ.from_float(m.weight.detach(), spec.bits, spec.group_size, spec.sym)
            for name, m in targets.items()}


def _train(block, targets, groups, spec, inputs, kwargs, fp_outputs):
    scales = [s for _, _, s in groups]
    for _, consumers, s in groups:
        for n in consumers:
            block.set_submodule(n, _Scaled(targets[n], s, spec))
    frozen = [(p, p.requires_grad) for p in block.parameters() if all(p is not s for s in scales)]
    for p, _ in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(scales, lr=spec.lr)
    gen = torch.Generator().manual_seed(spec.seed)
    try:
        for _ in range(spec.steps):
            idx = torch.randperm(len(inputs), generator=gen)[: spec.batch_size].tolist()
            with torch.enable_grad():
                out = block(torch.cat([inputs[i] for i in idx]), **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                loss = F.mse_loss(out.float(), torch.cat([fp_outputs[i] for i in idx]).float())
                opt.zero_grad()
                loss.backward()
            opt.step()
            with torch.no_grad():
                for s in scales:
                    s.clamp_(min=1e-2)
    finally:
        for name, m in targets.items():
            block.set_submodule(name, m)
        for p, was in frozen:
            p.requires_grad_(was)
