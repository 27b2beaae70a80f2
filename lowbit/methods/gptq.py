"""GPTQ (Frantar et al. 2022): quantize columns one at a time, pushing each column's rounding error
onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

H = 2XXᵀ (fp32 accumulation, Cholesky in fp64), dampened by `damp` × mean(diag H); lazy batch updates
of `block_size` columns; group scales chosen when the group's first column is reached (from the
error-updated weights). With `act_order`, columns are visited by decreasing diag(H); group scales are
then fixed up front from the original weights ("static groups") so the stored layout is unchanged.
"""

from dataclasses import dataclass, field

import torch

from ..formats import UniformQ
from ..formats.uniform import effective_group, group_params
from .config import MethodConfig


@dataclass(frozen=True)
class GPTQ(MethodConfig):
    damp: float = field(default=0.01, metadata={"help": "Hessian dampening, fraction of its mean diagonal"})
    block_size: int = field(default=128, metadata={"help": "columns per lazy batch update"})
    act_order: bool = field(default=False, metadata={"help": "visit columns by decreasing activation"})
    name = "gptq"
    needs_calib = True


CONFIG = GPTQ


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (dampened until positive definite). At most two K×K fp64
    matrices are alive at once (11008² fp64 is 0.97 GB): the dampening is added to the diagonal of
    one copy of H, which is freed once factored; the factor of the inverse overwrites the first factor."""
    h = h.to(torch.float64, copy=True)
    diag = h.diagonal()
    mean_diag = diag.mean().clamp(min=1e-12)
    original = diag.clone()
    for attempt in range(6):
        torch.add(original, mean_diag * damp * 10**attempt, out=diag)
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            del h, diag
            inverse = torch.cholesky_inverse(chol)
            torch.linalg.cholesky(inverse, upper=True, out=chol)
            del inverse
            return chol.float()
        del chol
    raise RuntimeError("GPTQ: Hessian is not positive definite even after heavy dampening")


def quantize(w: torch.Tensor, stats, spec: GPTQ) -> UniformQ:
    return quantize_many(w, stats, (spec,))[0]


def quantize_many(w: torch.Tensor, stats, specs: tuple[GPTQ, ...]) -> list[UniformQ]:
    """`w` quantized under each of `specs` (any bits, groups and symmetry; one damp, block size and
    act order) in one pass: GPTQ treats rows independently, all through the same H⁻¹, so the specs'
    copies of W are stacked along the rows and every column's step runs once for all of them (the
    recipe search's sensitivity pass: its per-column cost is Python's, not the rows')."""
    first = specs[0]
    if any((s.damp, s.block_size, s.act_order) != (first.damp, first.block_size, first.act_order) for s in specs):
        raise ValueError("quantize_many: the specs must share damp, block_size and act_order")
    n, k = w.shape
    groups = [effective_group(s.group_size, k) for s in specs]
    rows = [slice(c * n, (c + 1) * n) for c in range(len(specs))]
    w = w.detach().float().clone()
    h = stats.hessian * (2.0 / max(stats.tokens, 1))  # a new tensor: stats stay as they are
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    w = w.repeat(len(specs), 1) if len(specs) > 1 else w
    maxq = torch.cat([torch.full((n,), 2.0**s.bits - 1) for s in specs])
    scales = [torch.zeros(n, -(-k // g)) for g in groups]
    zeros = [torch.zeros(n, -(-k // g)) for g in groups]
    s_rows, z_rows = torch.zeros(len(maxq)), torch.zeros(len(maxq))  # each row's current group's scale and zero

    if first.act_order:  # static groups: every group's parameters from the original weights
        for spec, g, r, scale, zero in zip(specs, groups, rows, scales, zeros):
            for j in range(scale.shape[1]):
                scale[:, j], zero[:, j] = group_params(w[r, j * g:(j + 1) * g], spec.bits, spec.sym)
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        perm = torch.arange(k)

    hinv = inverse_hessian_factor(h, first.damp)
    del h  # only its inverse factor is used from here (K² floats: 0.5 GB for a 7B down_proj)
    q = torch.zeros_like(w)
    for i1 in range(0, k, first.block_size):
        i2 = min(i1 + first.block_size, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(len(maxq), i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            for spec, g, r, scale, zero in zip(specs, groups, rows, scales, zeros):
                if not first.act_order and col % g == 0:  # first column of a group: choose its range now
                    ahead = torch.cat([w1[r, i:], w[r, i2:i2 + g]], dim=1)[:, :g]
                    scale[:, col // g], zero[:, col // g] = group_params(ahead, spec.bits, spec.sym)
                if first.act_order or col % g == 0:
                    s_rows[r], z_rows[r] = scale[:, col // g], zero[:, col // g]
            codes = torch.minimum(torch.clamp(torch.round(w1[:, i] / s_rows) + z_rows, min=0), maxq)
            qcol = (codes - z_rows) * s_rows
            q[:, i1 + i] = qcol
            e = (w1[:, i] - qcol) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    return [UniformQ.from_params(q[r], scale, None if spec.sym else zero, spec.bits, spec.group_size)
            for spec, r, scale, zero in zip(specs, rows, scales, zeros)]
