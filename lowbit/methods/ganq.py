"""GANQ (Zhao & Yuan, ICML 2025): non-uniform per-row codebooks fitted to the layer's output error.

With H = XXᵀ of the layer's calibration inputs (dampened) and H = LLᵀ (Cholesky, L lower), minimise
‖(W − Ŵ)L‖² over Ŵ[i, j] = T[i, g(j)][Q[i, j]] (a codebook of 2^b values per row, or per group of
columns) by alternating two steps, all rows at once:
  S-step: indices column by column from the last to the first; column j is rounded to the entry
          nearest W[:, j] + (1/L[j, j]) Σ_{u>j} R[:, u] L[u, j], R the residuals of the columns already
          assigned: each choice zeroes column j of RL given the later ones (GPTQ's error feedback,
          run back to front). Greedy, not exact.
  T-step: the exact least squares T_i = W_i H S_iᵀ (S_i H S_iᵀ)⁻¹ (S_i the one-hot of row i's
          indices); an entry no weight uses keeps its value.
Because the S-step is greedy an iterate can be worse than the one before: every row keeps its best
iterate, while the alternation goes on from the latest one (restarting from the best gets stuck at
once). With one codebook per row the columns are visited in the order of GPTQ's act order. Codebooks
start from a k-means (or quantile) grid of each row weighted by diag(H). With
`outlier_ratio` > 0 (GANQ★) the weights furthest from their row's mean are kept exactly, as the
format's sparse part, and left out of the fit.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import LowbitError
from ..formats import CodebookQ, check_codebook_spec
from ..formats.uniform import effective_group
from .config import MethodConfig
from .gptq import inverse_hessian_factor

BLOCK = 128  # columns per lazy residual update in the S-step
CHUNK = 2**24  # elements of the one-hot design held at once by the T-step
KMEANS_ITERS = 10
INITS = ("kmeans", "quantile")


@dataclass(frozen=True)
class GANQ(MethodConfig):
    bits: int = field(default=4, metadata={"help": "bits per weight"})
    group_size: int = field(default=-1, metadata={"help": "weights per codebook (ganq default -1: one per row, as in the paper)"})
    iters: int = field(default=10, metadata={"help": "alternating optimisation iterations"})
    damp: float = field(default=0.01, metadata={"help": "Hessian dampening, fraction of its mean diagonal"})
    outlier_ratio: float = field(default=0.0, metadata={"help": "fraction of weights kept exactly as sparse outliers (GANQ★: 0.005)"})
    init: str = field(default="kmeans", metadata={"help": "codebook initialisation: kmeans or quantile"})
    name = "ganq"
    needs_calib = True

    def __post_init__(self):
        check_codebook_spec(self.bits, self.group_size)
        if self.iters < 0:
            raise LowbitError(f"ganq iters must be 0 or more, got {self.iters}")
        if not 0.0 <= self.outlier_ratio < 0.5:
            raise LowbitError(f"ganq outlier ratio must be in [0, 0.5), got {self.outlier_ratio} (0.005 = 0.5%)")
        if self.init not in INITS:
            raise LowbitError(f"ganq init '{self.init}' is not one of {', '.join(INITS)}")

    @property
    def scheme(self) -> str:
        """e.g. 'W3-lut-row' or 'W4-lut-g128-o0.5%'."""
        group = "row" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits}-lut-{group}" + (f"-o{100 * self.outlier_ratio:g}%" if self.outlier_ratio else "")


CONFIG = GANQ


def damped_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower L with LLᵀ = H dampened until positive definite. GPTQ's helper gives the upper U with
    UᵀU = H'⁻¹ for the column-reversed H' = PHP; then H' = U⁻¹U⁻ᵀ, so L = P U⁻¹ P."""
    u = inverse_hessian_factor(h.flip(0, 1), damp).double()
    v = torch.linalg.solve_triangular(u, torch.eye(len(u), dtype=u.dtype), upper=True)
    return v.flip(0, 1)


def _kmeans(v: torch.Tensor, wt: torch.Tensor, levels: int, iters: int) -> torch.Tensor:
    """Weighted 1-D k-means of every row of v [R, n] (weights wt >= 0): sorted centroids [R, levels],
    started from weighted quantiles; Lloyd steps keep them sorted, an empty cluster keeps its value."""
    wt = torch.where(wt.sum(1, keepdim=True) > 0, wt, torch.ones_like(wt))
    sv, order = v.sort(1)
    cw = wt.gather(1, order).cumsum(1)
    target = (torch.arange(levels, dtype=v.dtype) + 0.5) / levels * cw[:, -1:]
    c = sv.gather(1, torch.searchsorted(cw, target).clamp(max=v.shape[1] - 1))
    for _ in range(iters):
        a = torch.searchsorted(((c[:, 1:] + c[:, :-1]) / 2).contiguous(), v)
        sums = torch.zeros_like(c).scatter_add_(1, a, v * wt)
        mass = torch.zeros_like(c).scatter_add_(1, a, wt)
        c = torch.where(mass > 0, sums / mass.clamp(min=1e-30), c)
    return c


def init_codebooks(w: torch.Tensor, wt: torch.Tensor, bits: int, g: int, kmeans: bool) -> torch.Tensor:
    """Codebooks [N, G, 2^bits] from each row's (group's) weights, weighted by wt [N, K]."""
    n, k = w.shape
    groups = -(-k // g)
    pad = groups * g - k
    v = F.pad(w, (0, pad)).reshape(n * groups, g)
    wt = F.pad(wt, (0, pad)).reshape(n * groups, g)  # padding has no weight
    return _kmeans(v, wt, 2**bits, KMEANS_ITERS if kmeans else 0).reshape(n, groups, 2**bits)


def row_objective(r: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """‖r_i L‖² per row of the residual r = W − Ŵ."""
    return (r @ chol).pow(2).sum(1)


def _nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(-1) - table).abs().argmin(-1)


def lookup(table: torch.Tensor, idx: torch.Tensor, g: int) -> torch.Tensor:
    """Ŵ[i, j] = T[i, j // g][idx[i, j]]."""
    n, groups, levels = table.shape
    flat = idx + (torch.arange(idx.shape[1]) // g * levels)
    return table.reshape(n, groups * levels).gather(1, flat)


def assign(w: torch.Tensor, table: torch.Tensor, g: int, keep: torch.Tensor):
    """Round-to-nearest indices [N, K] (BLOCK columns at a time) and residuals (zero where a weight
    is kept exactly)."""
    idx = torch.cat([_nearest(w[:, c0:c0 + BLOCK], table[:, torch.arange(c0, min(c0 + BLOCK, w.shape[1])) // g])
                     for c0 in range(0, w.shape[1], BLOCK)], dim=1)
    return idx, (w - lookup(table, idx, g)) * keep


def s_step(w: torch.Tensor, chol: torch.Tensor, table: torch.Tensor, g: int, keep: torch.Tensor):
    """Indices from the last column to the first, each nearest to W[:, j] + Σ_{u>j} R[:, u] L[u, j] / L[j, j];
    lazy updates: the residuals of a finished block of columns reach the earlier ones in one matmul."""
    n, k = w.shape
    wt, keep_t = w.T.contiguous(), keep.T.contiguous()  # columns as contiguous rows
    idx, res = torch.empty(k, n, dtype=torch.long), torch.zeros(k, n)
    inv_diag = 1.0 / chol.diagonal()
    threads = torch.get_num_threads()
    for j2 in range(k, 0, -BLOCK):
        j1 = max(j2 - BLOCK, 0)
        acc = chol[j2:, j1:j2].T @ res[j2:]  # [j2 - j1, N]: Σ over the finished columns u >= j2
        torch.set_num_threads(1)  # row-sized ops: a second thread only adds a barrier per op
        try:
            for j in range(j2 - 1, j1 - 1, -1):
                tab = table[:, j // g]
                q = _nearest(wt[j] + acc[j - j1] * inv_diag[j], tab)
                r = (wt[j] - tab.gather(1, q.unsqueeze(1)).squeeze(1)) * keep_t[j]
                idx[j], res[j] = q, r
                acc[: j - j1].addr_(chol[j, j1:j], r)
        finally:
            torch.set_num_threads(threads)
    return idx.T, res.T


def _times_lower(a: torch.Tensor, chol: torch.Tensor, start: int, out: torch.Tensor) -> None:
    """out = a @ L[start:start + a.shape[1]] for lower-triangular L, skipping its zero upper part
    (about half the work of a dense matmul): column block [c0, c1) only needs rows >= c0."""
    end = start + a.shape[1]
    out[:, end:] = 0
    step = max(BLOCK, -(-end // 8))
    for c0 in range(0, end, step):
        c1, r0 = min(c0 + step, end), max(c0, start)
        out[:, c0:c1] = a[:, r0 - start:] @ chol[r0:end, c0:c1]


def t_step(w: torch.Tensor, chol: torch.Tensor, idx: torch.Tensor, table: torch.Tensor, g: int,
           keep: torch.Tensor) -> torch.Tensor:
    """Per row, the least-squares codebooks for fixed indices: (S H Sᵀ) T = S H wᵀ with H = LLᵀ and
    S the one-hot [slots, K] of the row's (group, entry) slots, via SL (one matmul per batch of rows
    and group); unused slots keep their value. A batch's one-hot holds about CHUNK elements."""
    n, k = w.shape
    groups, levels = table.shape[1:]
    slots = groups * levels
    wl = (w * keep) @ chol
    out, rows = torch.empty_like(table), max(1, CHUNK // (k * slots))
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        m = r1 - r0
        sl = torch.empty(groups, m, levels, k)
        for gi in range(groups):  # the slots of group gi only hold its own columns
            c0, c1 = gi * g, min((gi + 1) * g, k)
            onehot = torch.zeros(m, levels, c1 - c0).scatter_(1, idx[r0:r1, None, c0:c1], keep[r0:r1, None, c0:c1])
            _times_lower(onehot.view(m * levels, -1), chol, c0, sl[gi].view(m * levels, k))
        sl = sl.transpose(0, 1).reshape(m, slots, k)
        gram = torch.bmm(sl, sl.transpose(1, 2)).double()
        rhs = torch.bmm(sl, wl[r0:r1, :, None]).squeeze(-1).double()
        unused = (gram.diagonal(dim1=1, dim2=2) <= 0).double()
        old = table[r0:r1].reshape(m, slots).double()
        sol = torch.linalg.solve(gram + torch.diag_embed(unused), rhs * (1 - unused) + unused * old)
        out[r0:r1] = sol.float().view(m, groups, levels)
    return out


def select_outliers(w: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mask of the ratio·N·K weights furthest from their row's mean, in units of the row's spread."""
    count = int(round(ratio * w.numel()))
    mask = torch.zeros_like(w, dtype=torch.bool)
    if count:
        z = (w - w.mean(1, keepdim=True)).abs() / w.std(1, keepdim=True).clamp(min=1e-12)
        mask.view(-1)[z.flatten().topk(count).indices] = True
    return mask


def fit(w: torch.Tensor, h: torch.Tensor, spec: GANQ):
    """(indices [N, K], codebooks [N, G, 2^b] fp32, outlier mask [N, K], history) for weights w and
    H (dampened here). history[t] = Σ_rows best objective after t iterations / ‖WL‖² (t = 0: the
    initial codebooks, rounded to nearest): non-increasing, since each row keeps its best iterate."""
    n, k = w.shape
    g = effective_group(spec.group_size, k)
    # one codebook per row: any column order is allowed; the S-step runs back to front, so sorting by
    # increasing diag(H) settles the most active inputs first (GPTQ's act order; lower error)
    perm = torch.argsort(h.diagonal(), stable=True) if g == k else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    chol = damped_cholesky(h, spec.damp).float()
    outliers = select_outliers(w, spec.outlier_ratio)
    keep = (~outliers).float()
    table = init_codebooks(w, chol.pow(2).sum(1).expand(n, k) * keep, spec.bits, g, spec.init == "kmeans")
    idx, res = assign(w, table, g, keep)
    best_obj, best_idx, best_table = row_objective(res, chol), idx, table.clone()
    scale = row_objective(w, chol).sum().clamp(min=1e-30)
    history = [float(best_obj.sum() / scale)]
    for _ in range(spec.iters):
        idx, _ = s_step(w, chol, table, g, keep)
        table = t_step(w, chol, idx, table, g, keep)
        obj = row_objective((w - lookup(table, idx, g)) * keep, chol)
        better = obj < best_obj
        best_obj = torch.where(better, obj, best_obj)
        best_idx = torch.where(better[:, None], idx, best_idx)
        best_table[better] = table[better]
        history.append(float(best_obj.sum() / scale))
    back = torch.argsort(perm)
    return best_idx[:, back], best_table, outliers[:, back], history


def quantize(w: torch.Tensor, stats, spec: GANQ) -> CodebookQ:
    w = w.detach().float().clone()
    h = stats.hessian / max(stats.tokens, 1)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    idx, table, outliers, _ = fit(w, h, spec)
    table = table.half().float()
    extra = torch.where(outliers, w - lookup(table, idx, effective_group(spec.group_size, w.shape[1])), 0.0)
    return CodebookQ.from_indices(idx, table, spec.bits, spec.group_size, outliers=extra)
