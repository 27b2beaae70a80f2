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
from ..formats.uniform import effective_group, group_params, quantize_codes
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


def _params(w_cols: torch.Tensor, spec: GPTQ):
    return group_params(w_cols, spec.bits, spec.sym)


def quantize(w: torch.Tensor, stats, spec: GPTQ) -> UniformQ:
    n, k = w.shape
    g = effective_group(spec.group_size, k)
    n_groups = -(-k // g)
    w = w.detach().float().clone()
    h = stats.hessian * (2.0 / max(stats.tokens, 1))  # a new tensor: stats stay as they are
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    scale = torch.zeros(n, n_groups)
    zero = torch.zeros(n, n_groups)
    if spec.act_order:  # static groups: every group's parameters from the original weights
        for j in range(n_groups):
            scale[:, j], zero[:, j] = _params(w[:, j * g:(j + 1) * g], spec)
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        perm = torch.arange(k)

    hinv = inverse_hessian_factor(h, spec.damp)
    del h  # only its inverse factor is used from here (K² floats: 0.5 GB for a 7B down_proj)
    q = torch.zeros_like(w)
    for i1 in range(0, k, spec.block_size):
        i2 = min(i1 + spec.block_size, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if not spec.act_order and col % g == 0:  # first column of a group: choose its range now
                ahead = torch.cat([w1[:, i:], w[:, i2:i2 + g]], dim=1)[:, :g]
                scale[:, grp], zero[:, grp] = _params(ahead, spec)
            s, z = scale[:, grp], zero[:, grp]
            qcol = (quantize_codes(w1[:, i], s, z, spec.bits) - z) * s
            q[:, i1 + i] = qcol
            e = (w1[:, i] - qcol) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    return UniformQ.from_params(q, scale, None if spec.sym else zero, spec.bits, spec.group_size)
