"""CodebookQ: b-bit indices into a per-row (or per-group) table of 2^b fp16 values (GANQ's format).

Non-uniform: each row i (or each group of `group_size` input columns of it) has its own codebook
T[i, g] of 2^b values, and w[i, j] = T[i, g(j)][q[i, j]]. The indices are packed exactly like
UniformQ's codes (packing.py), so kernels share the unpacking and only replace "scale × (q − z)" by a
table lookup (for 4 bits, 16 entries fit one SIMD register: a permute, not a branch).

Optional sparse outliers (GANQ★) are *added* to the dense part: dequantize = T[Q] + S, with S in CSR
form (row pointers, column indices, fp16 values). A method that keeps a weight exactly stores
w − T[Q] at that position, so kernels compute a dense LUT matmul and one sparse pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError
from .packing import pack, packed_words, unpack
from .qtensor import QTensor, check_int, check_shape
from .uniform import GROUP_SIZES, effective_group

CODEBOOK_BITS = (2, 3, 4)


def check_codebook_spec(bits: int, group_size: int) -> None:
    """Raise a LowbitError for a bit width or group size this format does not have."""
    if bits not in CODEBOOK_BITS:
        raise LowbitError(f"codebook bits={bits} is not supported "
                          f"(choose one of {', '.join(map(str, CODEBOOK_BITS))})")
    if group_size not in GROUP_SIZES:
        raise LowbitError(f"group size {group_size} is not supported "
                          f"(choose one of {', '.join(map(str, GROUP_SIZES))}; -1 = whole row)")


@dataclass
class CodebookQ(QTensor):
    kind = "codebook"
    qweight: torch.Tensor  # int32 [N, packed_words(K, bits)]: indices, packed as UniformQ codes
    codebook: torch.Tensor  # fp16 [N, G, 2^bits]; G = 1 for per-row codebooks
    bits: int
    group_size: int  # -1 = one codebook per row
    shape: tuple[int, int]
    outlier_rowptr: torch.Tensor | None = None  # int32 [N + 1]
    outlier_cols: torch.Tensor | None = None  # int32 [nnz]
    outlier_values: torch.Tensor | None = None  # fp16 [nnz], added to the dense part

    def __post_init__(self):
        n, k = self.shape
        groups = -(-k // effective_group(self.group_size, k))
        if tuple(self.codebook.shape) != (n, groups, 2**self.bits):
            raise LowbitError(f"codebook of shape {tuple(self.codebook.shape)} does not match a "
                              f"{n}×{k} weight with {groups} group(s) of {2**self.bits} entries")

    @property
    def has_outliers(self) -> bool:
        return self.outlier_values is not None and self.outlier_values.numel() > 0

    @classmethod
    def from_indices(cls, idx: torch.Tensor, codebook: torch.Tensor, bits: int, group_size: int,
                     outliers: torch.Tensor | None = None) -> CodebookQ:
        """Build from unpacked indices [N, K] in [0, 2^bits), codebooks [N, G, 2^bits] and an optional
        dense [N, K] tensor whose non-zeros become the sparse outlier part."""
        check_codebook_spec(bits, group_size)
        n, k = idx.shape
        sparse = {}
        if outliers is not None and bool((outliers != 0).any()):
            rows, cols = outliers.nonzero(as_tuple=True)  # row-major order: CSR order
            rowptr = torch.zeros(n + 1, dtype=torch.int64)
            rowptr[1:] = torch.bincount(rows, minlength=n).cumsum(0)
            sparse = dict(outlier_rowptr=rowptr.to(torch.int32), outlier_cols=cols.to(torch.int32),
                          outlier_values=outliers[rows, cols].to(torch.float16))
        return cls(pack(idx.to(torch.uint8), bits), codebook.to(torch.float16).contiguous(), bits,
                   group_size, (n, k), **sparse)

    def indices(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.shape[1])

    def outliers_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The sparse part as a dense [N, K] tensor (zeros where there is no outlier)."""
        n, k = self.shape
        if not self.has_outliers:
            return torch.zeros(n, k, dtype=dtype)
        rows = torch.repeat_interleave(torch.arange(n), self.outlier_rowptr.long().diff())
        dense = torch.zeros(n, k)
        dense.index_put_((rows, self.outlier_cols.long()), self.outlier_values.float(), accumulate=True)
        return dense.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        groups = self.codebook.shape[1]
        g = effective_group(self.group_size, k)
        idx = torch.nn.functional.pad(self.indices().long(), (0, groups * g - k)).view(n, groups, g)
        w = self.codebook.float().gather(-1, idx).view(n, -1)[:, :k]
        if self.has_outliers:
            w = w + self.outliers_dense()
        return w.to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "codebook": self.codebook}
        if self.has_outliers:
            out.update(outlier_rowptr=self.outlier_rowptr, outlier_cols=self.outlier_cols,
                       outlier_values=self.outlier_values)
        return out

    def meta(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "group_size": self.group_size,
                "shape": list(self.shape), "outliers": self.has_outliers}

    @staticmethod
    def describe(meta: dict) -> str:
        group = "row" if meta["group_size"] == -1 else f"g{meta['group_size']}"
        return f"codebook {meta['bits']}b {group}" + (" +outliers" if meta.get("outliers") else "")

    @classmethod
    def layout(cls, meta: dict) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype, bool]]:
        n, k = check_shape(meta)
        bits, group = check_int(meta, "bits", CODEBOOK_BITS), check_int(meta, "group_size", GROUP_SIZES)
        outliers = meta.get("outliers", False)
        if not isinstance(outliers, bool):
            raise LowbitError(f"outliers {outliers!r} is not true or false")
        groups = -(-k // effective_group(group, k))
        return {"qweight": ((n, packed_words(k, bits)), torch.int32, True),
                "codebook": ((n, groups, 2 ** bits), torch.float16, True),
                "outlier_rowptr": ((n + 1,), torch.int32, outliers),
                "outlier_cols": (None, torch.int32, outliers),
                "outlier_values": (None, torch.float16, outliers)}

    @classmethod
    def check_values(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        if "outlier_rowptr" not in tensors:
            return
        rowptr, cols, values = (tensors[f"outlier_{n}"] for n in ("rowptr", "cols", "values"))
        nnz = cols.numel()
        rows_ok = int(rowptr[0]) == 0 and int(rowptr[-1]) == nnz and not bool((rowptr.diff() < 0).any())
        cols_ok = nnz == 0 or 0 <= int(cols.min()) and int(cols.max()) < meta["shape"][1]
        if cols.dim() != 1 or values.shape != cols.shape or not rows_ok or not cols_ok:
            raise LowbitError("holds inconsistent sparse outliers (row pointers, columns and values disagree)")

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> CodebookQ:
        return cls(tensors["qweight"], tensors["codebook"], int(meta["bits"]), int(meta["group_size"]),
                   tuple(meta["shape"]), tensors.get("outlier_rowptr"), tensors.get("outlier_cols"),
                   tensors.get("outlier_values"))
