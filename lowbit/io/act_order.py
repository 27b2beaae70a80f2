"""Act-order checkpoints (GPTQ's `desc_act`, compressed-tensors' `actorder: group`) as a column
permutation, so that every kernel runs them as ordinary groupwise layers.

Such a file keeps the input columns in their original order and maps each to its group:
w[n, k] = s[g_idx[k], n]·(q[k, n] − z[g_idx[k], n]). GPTQ's act-order visits the columns by decreasing
diag(H) and closes a group every `group` columns of that visit, so each group holds exactly `group`
columns (the last one k − (G−1)·group), scattered. With `perm` a permutation for which
g_idx[perm] = 0…0 1…1 … (each group's columns contiguous; we take the stable sort of g_idx, so the
columns of a group keep their file order and a round trip writes the same file), the layer is the
UniformQ over W[:, perm] and computes x[..., perm]·W[:, perm]ᵀ = x·Wᵀ: nn.QuantLinear.in_perm holds
`perm`, the universal path and the native engine gather the input before the kernel. A g_idx whose
groups are not that size (not GPTQ's act-order) has no such form and is refused.

Writers whose blocks are contiguous groups of the input (GGUF) take such a layer as `InputOrder`:
its weights in input order, which they fit like any layer of a format they cannot hold exactly.
"""

import torch

from ..errors import LowbitError


def permutation(where, name: str, g_idx: torch.Tensor, k: int, group: int) -> torch.Tensor | None:
    """The input permutation (int32 [k]) that makes module `name`'s groups contiguous, None when
    g_idx is k // group already; a one-line LowbitError for a g_idx no act-order writes."""
    groups = -(-k // group)
    natural = (torch.arange(k) // group).to(torch.int32)
    if g_idx.dtype != torch.int32 or tuple(g_idx.shape) != (k,):
        raise LowbitError(f"{where}: module {name} has g_idx {list(g_idx.shape)} {str(g_idx.dtype)[6:]}, "
                          f"expected [{k}] int32 (a damaged checkpoint)")
    if torch.equal(g_idx, natural):
        return None
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise LowbitError(f"{where}: module {name} has g_idx values outside [0, {groups}) (a damaged checkpoint)")
    counts = torch.bincount(g_idx.long(), minlength=groups)
    want = torch.bincount(natural.long(), minlength=groups)
    if not torch.equal(counts, want):
        bad = int((counts != want).nonzero()[0])
        raise LowbitError(f"{where}: module {name}'s g_idx puts {int(counts[bad])} columns in group {bad}, not "
                          f"{int(want[bad])}: lowbit runs act-order groups of {group} columns as GPTQ writes them")
    return torch.sort(g_idx, stable=True).indices.to(torch.int32)


def g_idx(perm: torch.Tensor | None, k: int, group: int) -> torch.Tensor:
    """The file's g_idx (int32 [k], columns in input order) of a layer whose stored columns are the
    input's `perm` (None: in order)."""
    natural = (torch.arange(k) // group).to(torch.int32)
    return natural if perm is None else unpermute(natural[None], perm)[0]


def unpermute(t: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Columns stored in `perm` order ([rows, k]: codes or weights) back in input order: out[:, perm] = t."""
    if perm is None:
        return t
    out = torch.empty_like(t)
    out[:, perm.long()] = t
    return out


class InputOrder:
    """A QTensor whose stored columns are the input's `perm`, seen as a quantized tensor in input
    order: the same `bits` and `shape`, `dequantize()` with the columns put back, no block layout."""

    def __init__(self, qt, perm: torch.Tensor):
        self.qt, self.perm, self.bits, self.shape = qt, perm, qt.bits, qt.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return unpermute(self.qt.dequantize(dtype), self.perm)

    def meta(self) -> dict:
        return self.qt.meta()

    def describe(self, meta: dict) -> str:
        return self.qt.describe(meta) + " act-order"
