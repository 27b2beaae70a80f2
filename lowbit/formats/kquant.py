"""KQuant: ggml's K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) held as the GGUF file's own blocks, byte for byte.

Why a kind of its own and not UniformQ with two-level scales: a K-quant's sub-block scale is an
integer code times an fp16 super-block scale (and its minimum another such product, not an integer
zero point), so no UniformQ (fp16 scale and integer zero per group) holds it exactly; keeping the
blocks as they are makes the import a copy, the export the identity, and lets the kernels (c/kquant.h)
read the very bytes llama.cpp reads.

A row is cut into super-blocks of 256 weights, each a struct of ggml-common.h (the packer,
io/kquants.py, documents the byte layouts). Every type decodes to the same form: per group of
`group` weights (16, or 32 for Q4_K/Q5_K) a step a = d·sc and (affine types) a minimum b = dmin·m,
each one fp32 product, and per weight an unsigned code c in natural order, so that
    affine     Q2_K, Q4_K, Q5_K   w = a·c − b
    symmetric  Q3_K, Q6_K         w = a·(c − offset)       (offset 4, 32: the signed code)
in fp32, in that order: what ggml's dequantize_row_q*_K and gguf.quants compute, bit for bit
(`decode` is that split, `dequantize` the reference every kernel is checked against).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError
from .qtensor import QTensor, check_shape

QK_K = 256


@dataclass(frozen=True)
class KType:
    bits: int
    nbytes: int  # bytes of one super-block
    group: int  # weights per step (a) and minimum (b)
    affine: bool
    offset: int  # symmetric types: w = a·(c − offset)


TYPES = {"Q2_K": KType(2, 84, 16, True, 0), "Q3_K": KType(3, 110, 16, False, 4),
         "Q4_K": KType(4, 144, 32, True, 0), "Q5_K": KType(5, 176, 32, True, 0),
         "Q6_K": KType(6, 210, 16, False, 32)}
BY_BITS = {t.bits: name for name, t in TYPES.items()}


def _half(b: torch.Tensor) -> torch.Tensor:
    """[B, 2] bytes -> [B] fp32 of the little-endian fp16 they hold."""
    return b.contiguous().view(torch.float16).float().view(-1)


def _planes(b: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """[B, n] bytes -> [B, len(shifts)·n]: each byte's field at each shift, shift-major."""
    return torch.cat([(b >> s) & mask for s in shifts], dim=1)


def _two_bit(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K's 64 bytes -> 256 codes: byte h·32 + i holds value h·128 + s·32 + i at bits 2s."""
    return torch.cat([_planes(qs[:, 32 * h:32 * h + 32], (0, 2, 4, 6), 3) for h in (0, 1)], dim=1)


def _scales_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> eight 6-bit scales and mins (ggml's get_scale_min_k4)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc, mn


def decode(qtype: str, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Super-blocks [B, nbytes] (uint8) -> codes [B, 256] (uint8, natural order), steps a [B, 256/group]
    and minima b [B, 256/group] (fp32; None for the symmetric types)."""
    t = TYPES[qtype]
    if qtype == "Q2_K":
        sc, qs, d, dmin = blocks[:, :16], blocks[:, 16:80], _half(blocks[:, 80:82]), _half(blocks[:, 82:84])
        return _two_bit(qs), d[:, None] * (sc & 15).float(), dmin[:, None] * (sc >> 4).float()
    if qtype == "Q3_K":
        hmask, qs, s, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _half(blocks[:, 108:110])
        low = torch.cat([s[:, :8] & 15, s[:, :8] >> 4], dim=1)
        high = _planes(s[:, 8:12], (0, 2, 4, 6), 3)
        sc = (low | high << 4).to(torch.int16) - 32
        return _two_bit(qs) | _planes(hmask, tuple(range(8)), 1) << 2, d[:, None] * sc.float(), None
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _half(blocks[:, 0:2]), _half(blocks[:, 2:4])
        sc, mn = _scales_k4(blocks[:, 4:16])
        qs = blocks[:, -128:]
        codes = torch.cat([_planes(qs[:, 32 * c:32 * c + 32], (0, 4), 15) for c in range(4)], dim=1)
        if qtype == "Q5_K":
            codes = codes | _planes(blocks[:, 16:48], tuple(range(8)), 1) << 4
        return codes, d[:, None] * sc.float(), dmin[:, None] * mn.float()
    if qtype == "Q6_K":
        ql, qh, sc, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], _half(blocks[:, 208:210])
        low = torch.cat([_planes(ql[:, 64 * h:64 * h + 64], (0, 4), 15) for h in (0, 1)], dim=1)
        high = torch.cat([_planes(qh[:, 32 * h:32 * h + 32], (0, 2, 4, 6), 3) for h in (0, 1)], dim=1)
        return low | high << 4, d[:, None] * sc.contiguous().view(torch.int8).float(), None
    raise LowbitError(f"{qtype} is not a K-quant ({', '.join(TYPES)})")


@dataclass
class KQuant(QTensor):
    kind = "kquant"
    blocks: torch.Tensor  # uint8 [N, K/256 · nbytes]: the GGUF tensor's rows
    qtype: str  # a key of TYPES
    shape: tuple[int, int]

    @property
    def bits(self) -> int:
        return TYPES[self.qtype].bits

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        t = TYPES[self.qtype]
        codes, a, b = decode(self.qtype, self.blocks.reshape(-1, t.nbytes))
        q = codes.float().view(-1, QK_K // t.group, t.group)
        w = a[..., None] * q - b[..., None] if t.affine else a[..., None] * (q - t.offset)
        return w.view(n, k).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"blocks": self.blocks}

    def meta(self) -> dict:
        return {"kind": self.kind, "type": self.qtype, "shape": list(self.shape)}

    @staticmethod
    def describe(meta: dict) -> str:
        return f"gguf {meta['type']}"

    @classmethod
    def layout(cls, meta: dict) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype, bool]]:
        n, k = check_shape(meta)
        t = TYPES.get(meta.get("type")) if isinstance(meta.get("type"), str) else None
        if t is None:
            raise LowbitError(f"type {meta.get('type')!r} is not one of {', '.join(TYPES)}")
        if k % QK_K:
            raise LowbitError(f"{meta['type']} rows are whole 256-weight super-blocks, not {k} columns")
        return {"blocks": ((n, k // QK_K * t.nbytes), torch.uint8, True)}

    @classmethod
    def check_values(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        t = TYPES[meta["type"]]
        _, a, b = decode(meta["type"], tensors["blocks"].reshape(-1, t.nbytes))
        if not bool(torch.isfinite(a).all()) or (b is not None and not bool(torch.isfinite(b).all())):
            raise LowbitError(f"holds {meta['type']} super-block scales that are NaN or Inf")

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> KQuant:
        return cls(tensors["blocks"], meta["type"], tuple(meta["shape"]))
