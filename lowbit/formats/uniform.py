"""UniformQ: b-bit group-wise affine quantization (the GPTQ/AWQ/Q4_0/Q4_1 family).

Each row is cut into groups of `group_size` input columns (-1 = the whole row; a last group may be
shorter when the group size does not divide the row). A group has an fp16 scale `s` and either
  sym:  w = (q - 2^(b-1)) * s               (llama.cpp Q4_0 style: the largest-magnitude value maps
                                             exactly to -2^(b-1), so all 2^b levels are used)
  asym: w = (q - z) * s, z an integer code  (GPTQ style zero point, stored as uint8; the range
                                             [min(w, 0), max(w, 0)] always holds 0 exactly)
with codes q in [0, 2^b) packed exactly (see packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError
from .packing import pack, packed_words, unpack
from .qtensor import QTensor, check_int, check_shape

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)  # -1 = one group per row


def check_spec(bits: int, group_size: int) -> None:
    """Raise a LowbitError for a bit width or group size this format does not have."""
    if bits not in BITS:
        raise LowbitError(f"bits={bits} is not supported (choose one of {', '.join(map(str, BITS))})")
    if group_size not in GROUP_SIZES:
        raise LowbitError(f"group size {group_size} is not supported "
                          f"(choose one of {', '.join(map(str, GROUP_SIZES))}; -1 = whole row)")


def effective_group(group_size: int, cols: int) -> int:
    return cols if group_size == -1 else group_size


def grouped(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> [N, G, g] (the ragged tail padded by repeating its last column) and a validity mask."""
    n, k = w.shape
    n_groups = -(-k // g)
    pad = n_groups * g - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    mask = torch.ones(n_groups * g, dtype=torch.bool)
    mask[k:] = False
    return w.reshape(n, n_groups, g), mask.reshape(n_groups, g)


def group_params(wg: torch.Tensor, bits: int, sym: bool, shrink: torch.Tensor | float = 1.0,
                 lo_shrink: torch.Tensor | float | None = None):
    """Scale (fp16-representable, float32) and integer zero code for groups on the last dim of `wg`.

    `shrink` (broadcast over the groups) narrows the range: the clipping knob of MSE search;
    `lo_shrink` narrows the lower end separately (SignRound's min/max factors). With it, sym maps the
    larger of the narrowed ends to code 0 (as auto-round does), the other end of RTN's choice on a tie.
    Differentiable in `wg` and the shrink factors (the zero code is rounded).
    """
    maxq = 2**bits - 1
    if sym:
        m = wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
        if lo_shrink is None:
            m = m * shrink
        else:
            hi, lo = wg.amax(-1).clamp(min=0) * shrink, -wg.amin(-1).clamp(max=0) * lo_shrink
            m = torch.where(hi > lo, hi, torch.where(lo > hi, -lo, torch.where(m >= 0, hi, -lo)))
        scale = m / -(2 ** (bits - 1))
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        # the range must hold 0: the zero point is an integer code in [0, 2^b)
        lo = wg.amin(-1).clamp(max=0) * (shrink if lo_shrink is None else lo_shrink)
        hi = wg.amax(-1).clamp(min=0) * shrink
        scale = (hi - lo) / maxq
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.clamp(torch.round(-lo / safe), 0, maxq)
    scale = scale.to(torch.float16).float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero group: any scale is exact
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for `w` given broadcastable scale/zero: clamp(round(w / s) + z, 0, 2^b - 1)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, offset: torch.Tensor | None = None,
                  shrink: torch.Tensor | float = 1.0, lo_shrink: torch.Tensor | float | None = None) -> torch.Tensor:
    """Quantize-dequantize `w` [N, K] with straight-through rounding, for methods that learn by
    gradient: gradients reach `w`, a rounding `offset` [N, K] (in units of the scale, SignRound's V)
    and the range factors (`shrink`, `lo_shrink` [N, G], see group_params)."""
    n, k = w.shape
    g = effective_group(group_size, k)
    wg, _ = grouped(w, g)
    scale, zero = group_params(wg, bits, sym, shrink, lo_shrink)
    x = wg / scale[..., None]
    if offset is not None:
        x = x + grouped(offset, g)[0]
    q = torch.clamp(x + (torch.round(x) - x).detach() + zero[..., None], 0, 2**bits - 1)
    return ((q - zero[..., None]) * scale[..., None]).reshape(n, -1)[:, :k]


SHRINK_GRID = torch.linspace(1.0, 0.5, 26)  # clipping candidates (1.0 = no clip)


def clip_search(w: torch.Tensor, bits: int, group_size: int, sym: bool, group_error) -> torch.Tensor:
    """Per-group shrink factor [N, G] from SHRINK_GRID minimising `group_error(wg, dequantized)`,
    both [N, G, g] (the ragged tail padded), which returns one error per group [N, G]."""
    wg, _ = grouped(w.float(), effective_group(group_size, w.shape[1]))
    best = torch.full(wg.shape[:2], float("inf"))
    shrink = torch.ones(wg.shape[:2])
    for p in SHRINK_GRID:
        s, z = group_params(wg, bits, sym, p)
        dq = (quantize_codes(wg, s[..., None], z[..., None], bits) - z[..., None]) * s[..., None]
        err = group_error(wg, dq)
        better = err < best
        best = torch.where(better, err, best)
        shrink = torch.where(better, p, shrink)
    return shrink


@dataclass
class UniformQ(QTensor):
    kind = "uniform"
    qweight: torch.Tensor  # int32 [N, packed_words(K, bits)]
    scales: torch.Tensor  # fp16 [N, G]
    zeros: torch.Tensor | None  # uint8 [N, G] for asym, None for sym
    bits: int
    group_size: int  # as requested; -1 = whole row
    shape: tuple[int, int]

    @property
    def sym(self) -> bool:
        return self.zeros is None

    @classmethod
    def from_float(cls, w: torch.Tensor, bits: int, group_size: int, sym: bool,
                   mse_clip: bool = False, shrink: torch.Tensor | None = None) -> UniformQ:
        """Round-to-nearest. `shrink` [N, G] narrows each group's range; `mse_clip` chooses it to
        minimise each group's squared weight error."""
        check_spec(bits, group_size)
        wg, mask = grouped(w.float(), effective_group(group_size, w.shape[1]))
        if mse_clip:
            shrink = clip_search(w, bits, group_size, sym, lambda wg, dq: ((dq - wg) ** 2 * mask).sum(-1))
        scale, zero = group_params(wg, bits, sym, 1.0 if shrink is None else shrink)
        return cls.from_params(w, scale, None if sym else zero, bits, group_size)

    @classmethod
    def from_params(cls, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    bits: int, group_size: int) -> UniformQ:
        """Quantize `w` [N, K] with given per-group scale [N, G] and zero [N, G] (None = symmetric)."""
        n, k = w.shape
        wg, _ = grouped(w.float(), effective_group(group_size, k))
        z = torch.full_like(scale, 2 ** (bits - 1)) if zero is None else zero
        q = quantize_codes(wg, scale[..., None].float(), z[..., None].float(), bits)
        q = q.reshape(n, -1)[:, :k].to(torch.uint8)
        return cls(pack(q, bits), scale.to(torch.float16),
                   None if zero is None else zero.to(torch.uint8), bits, group_size, (n, k))

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        n_groups = self.scales.shape[1]
        g = effective_group(self.group_size, k)
        codes = torch.nn.functional.pad(self.codes(), (0, n_groups * g - k)).view(n, n_groups, g)
        zero = 2.0 ** (self.bits - 1) if self.zeros is None else self.zeros.float()[..., None]
        w = (codes.float() - zero) * self.scales.float()[..., None]
        return w.view(n, -1)[:, :k].to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def meta(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "group_size": self.group_size,
                "sym": self.sym, "shape": list(self.shape)}

    @staticmethod
    def describe(meta: dict) -> str:
        group = "row" if meta["group_size"] == -1 else f"g{meta['group_size']}"
        return f"uniform {meta['bits']}b {group} {'sym' if meta['sym'] else 'asym'}"

    @classmethod
    def layout(cls, meta: dict) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype, bool]]:
        n, k = check_shape(meta)
        bits, group = check_int(meta, "bits", BITS), check_int(meta, "group_size", GROUP_SIZES)
        if not isinstance(meta.get("sym"), bool):
            raise LowbitError(f"sym {meta.get('sym')!r} is not true or false")
        groups = -(-k // effective_group(group, k))
        return {"qweight": ((n, packed_words(k, bits)), torch.int32, True),
                "scales": ((n, groups), torch.float16, True),
                "zeros": ((n, groups), torch.uint8, not meta["sym"])}

    @classmethod
    def check_values(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        if meta["sym"] and "zeros" in tensors:
            raise LowbitError("is symmetric but holds zero points")
        if "zeros" in tensors and int(tensors["zeros"].max()) >= 2 ** meta["bits"]:
            raise LowbitError(f"holds zero points out of the {meta['bits']}-bit range")

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> UniformQ:
        return cls(tensors["qweight"], tensors["scales"], tensors.get("zeros"), int(meta["bits"]),
                   int(meta["group_size"]), tuple(meta["shape"]))
