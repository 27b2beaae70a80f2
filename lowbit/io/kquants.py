"""ggml's K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: super-blocks of 256 weights of a row, fitted to given
values and packed byte for byte as ggml's block structs (ggml-common.h; gguf.quants' dequantizers
are the oracle of the tests).

A super-block is cut into sub-blocks of `sub` weights, each with a small integer scale (and min)
times the super-block's fp16 d (and dmin):
  affine     Q2_K (sub 16, q 0..3,  sc/m 4-bit), Q4_K (sub 32, q 0..15, 6-bit), Q5_K (sub 32, q 0..31, 6-bit)
             w = (d·sc)·q − dmin·m
  symmetric  Q3_K (sub 16, q −4..3, sc 6-bit signed), Q6_K (sub 16, q −32..31, sc int8)
             w = (d·sc)·q
The products are fp32, in that order, as ggml's dequantizers (and gguf.quants) compute them.
Byte layouts (each a struct in ggml-common.h):
  Q2_K  {u8 scales[16] (sc low nibble, m high); u8 qs[64]; fp16 d, dmin}                   84 bytes
  Q3_K  {u8 hmask[32]; u8 qs[64]; u8 scales[12]; fp16 d}                                   110 bytes
  Q4_K  {fp16 d, dmin; u8 scales[12]; u8 qs[128]}                                          144 bytes
  Q5_K  {fp16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}                               176 bytes
  Q6_K  {u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d}                                     210 bytes
2-bit fields: byte h·32 + i holds value h·128 + s·32 + i at bits 2s; high-bit planes (hmask, Q5_K's
qh): bit b of byte i is value b·32 + i; Q4_K/Q5_K nibbles: byte c·32 + l holds value c·64 + l low and
c·64 + 32 + l high; Q6_K's ql: byte h·64 + i holds value h·128 + i low and h·128 + 64 + i high; the
6-bit scales of Q3_K and Q4_K/Q5_K are split over 12 bytes as `_scales_k3` / `_scales_k4` show.

The fit (ggml-quants.c's quantize_row_q*_K, our own code, vectorised over all super-blocks) minimises
an importance-weighted squared error: (1) each sub-block's real scale (and min) by a search over
candidate steps with a weighted least-squares fit at each (ggml's make_qkx2_quants for the affine
kinds, make_qx_quants for the symmetric ones); (2) the sub-block scales rounded to their integer
codes against the fp16 super-block scale(s) from the largest; (3) the codes rounded again with the
scales as stored; (4) d (and dmin) re-fitted by weighted least squares with the codes fixed, kept
where that lowers the error. The weights: with an importance vector per input column (calibration
statistics, diag(XXᵀ)), importance·sqrt(σ² + x²) as llama.cpp does with an imatrix (σ² = 2·mean x² of
the super-block); without one, llama.cpp's own defaults (rms(x) + |x| over the sub-block for Q4_K/Q5_K, and
here for Q2_K too; x² for Q3_K/Q6_K).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as GGML

from ..errors import LowbitError

QK_K = 256
CHUNK = 4096  # super-blocks fitted at once (bounds the search's temporaries)


@dataclass(frozen=True)
class Kind:
    sub: int          # weights per sub-block
    levels: int       # codes 0..levels-1 (symmetric kinds: q = code − levels/2)
    affine: bool
    scale_max: int    # sub-block scale codes 0..scale_max (affine), −(scale_max+1)..scale_max (symmetric)
    search: tuple[float, float, int] = (0.0, 0.0, 0)  # affine: make_qkx2_quants' rmin, rdelta, nstep
    nbytes: int = 0


KINDS = {GGML.Q2_K: Kind(16, 4, True, 15, (-0.5, 0.1, 15), 84),
         GGML.Q3_K: Kind(16, 8, False, 31, nbytes=110),
         GGML.Q4_K: Kind(32, 16, True, 63, (-1.0, 0.1, 20), 144),
         GGML.Q5_K: Kind(32, 32, True, 63, (-0.5, 0.1, 15), 176),
         GGML.Q6_K: Kind(16, 64, False, 127, nbytes=210)}
BY_BITS = {2: GGML.Q2_K, 3: GGML.Q3_K, 4: GGML.Q4_K, 5: GGML.Q5_K, 6: GGML.Q6_K}


def _weights(x: torch.Tensor, qtype: GGML, importance: torch.Tensor | None) -> torch.Tensor:
    """[B, S, sub] fitting weights of super-blocks `x` (importance: [B, S, sub] or None)."""
    if importance is not None:
        sigma2 = 2 * x.square().mean(dim=(1, 2), keepdim=True)
        return importance * (sigma2 + x.square()).sqrt()
    if KINDS[qtype].affine:  # (ggml weighs Q2_K by |x| alone: exact zeros, common in a 2-bit grid, then cost nothing)
        return x.square().mean(-1, keepdim=True).sqrt() + x.abs()
    return x.square()


def _affine_fit(x: torch.Tensor, w: torch.Tensor, kind: Kind) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (last dim) scale > 0 and min ≥ 0 with x ≈ scale·q − min, q ∈ [0, levels): the
    weighted least-squares fit at the best of the candidate steps (make_qkx2_quants)."""
    nmax = kind.levels - 1
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)
    span = hi - lo
    flat = span <= 0
    span = torch.where(flat, torch.ones_like(span), span)
    sw, sx = w.sum(-1), (w * x).sum(-1)

    def codes(iscale):
        return torch.clamp(torch.round(iscale[..., None] * (x - lo[..., None])), 0, nmax)

    def error(scale, low, q):
        return (w * (scale[..., None] * q + low[..., None] - x).square()).sum(-1)

    scale, low = span / nmax, lo
    best = error(scale, low, codes(nmax / span))
    rmin, rdelta, nstep = kind.search
    # make_qkx2_quants' steps, and the range on each whole number of levels m ∈ nmax/2..nmax (values
    # already on a grid land on it exactly even where a sub-block lacks some of its levels)
    steps = [rmin + rdelta * i + nmax for i in range(nstep + 1)] + list(range(max(1, nmax // 2), nmax))
    for step in steps:
        q = codes(step / span)
        sl, sl2, sxl = (w * q).sum(-1), (w * q * q).sum(-1), (w * x * q).sum(-1)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        this_scale, this_low = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
        positive = this_low > 0  # the range must hold 0: no positive minimum
        this_scale = torch.where(positive, sxl / sl2.clamp(min=1e-30), this_scale)
        this_low = torch.where(positive, torch.zeros_like(this_low), this_low)
        err = error(this_scale, this_low, q)
        better = ok & (err < best)
        scale, low, best = (torch.where(better, a, b) for a, b in ((this_scale, scale), (this_low, low), (err, best)))
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    low = torch.where(flat, lo, low)
    return scale, -low


def _symmetric_fit(x: torch.Tensor, w: torch.Tensor, kind: Kind) -> torch.Tensor:
    """Per sub-block (last dim) signed scale with x ≈ scale·q, q ∈ [−n, n), n = levels/2: the value of
    largest magnitude mapped to −(n + 0.1·i), i ∈ −9..9 (make_qx_quants), or to ±m, m ∈ n/2..n,
    each with its weighted least-squares scale, the best kept."""
    n = kind.levels // 2
    at = x.abs().argmax(-1, keepdim=True)
    peak = x.gather(-1, at).squeeze(-1)
    zero = peak == 0
    peak = torch.where(zero, torch.ones_like(peak), peak)
    scale, best = torch.zeros_like(peak), torch.zeros_like(peak)
    # and the peak on each whole level of either sign (values already on a grid, as a lower-bit
    # layer's are, land on it exactly even where a sub-block lacks the grid's extreme level)
    steps = [-(n + 0.1 * i) for i in [0, *range(-9, 0), *range(1, 10)]]
    steps += [sign * m for m in range(max(1, n // 2), n + 1) for sign in (1, -1)]
    for step in steps:
        q = torch.clamp(torch.round((step / peak)[..., None] * x), -n, n - 1)
        slx, sl2 = (w * x * q).sum(-1), (w * q * q).sum(-1)
        this = slx / sl2.clamp(min=1e-30)
        better = (sl2 > 0) & (this * slx > best)
        scale, best = torch.where(better, this, scale), torch.where(better, this * slx, best)
    return torch.where(zero, torch.zeros_like(scale), scale)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def _codes_for(x: torch.Tensor, step: torch.Tensor, low: torch.Tensor | None, kind: Kind) -> torch.Tensor:
    """Codes 0..levels-1 of `x` [B, S, sub] with sub-block steps d·sc (and minima dmin·m) as stored."""
    live = step != 0
    safe = torch.where(live, step, torch.ones_like(step))[..., None]
    if low is None:
        half = kind.levels // 2
        q = torch.clamp(torch.round(x / safe), -half, half - 1) + half
    else:
        q = torch.clamp(torch.round((x + low[..., None]) / safe), 0, kind.levels - 1)
    return torch.where(live[..., None], q, torch.full_like(q, 0 if low is not None else kind.levels // 2))


def _values(kind: Kind, d, sc, q, dmin=None, m=None) -> torch.Tensor:
    """What the blocks decode to, in fp32 as ggml computes it: (d·sc)·q − dmin·m."""
    step = (d[:, None] * sc)[..., None]
    if not kind.affine:
        return step * (q - kind.levels // 2)
    return step * q - (dmin[:, None] * m)[..., None]


def _wsse(v: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w * (v - x).square()).sum(dim=(1, 2))


def _fit(x: torch.Tensor, w: torch.Tensor, kind: Kind) -> dict[str, torch.Tensor]:
    """Super-blocks x [B, S, sub] -> d, dmin [B] (fp16 values), sc, m [B, S] and codes [B, S, sub]."""
    top = float(kind.scale_max)
    if kind.affine:
        scale, low = _affine_fit(x, w, kind)
        d, dmin = _fp16(scale.amax(-1) / top), _fp16(low.amax(-1) / top)
        sc = torch.clamp(torch.round(scale / torch.where(d > 0, d, 1)[:, None]), 0, top)
        m = torch.clamp(torch.round(low / torch.where(dmin > 0, dmin, 1)[:, None]), 0, top)
        q = _codes_for(x, d[:, None] * sc, dmin[:, None] * m, kind)
        # d and dmin again by weighted least squares with the codes fixed: x ≈ d·(sc·q) − dmin·m
        a, b = sc[..., None] * q, m[..., None].expand_as(q)
        aa, ab, bb = (w * a * a).sum((1, 2)), (w * a * b).sum((1, 2)), (w * b * b).sum((1, 2))
        ax, bx = (w * a * x).sum((1, 2)), (w * b * x).sum((1, 2))
        det = aa * bb - ab * ab
        solvable = det > 1e-12 * aa * bb
        det = torch.where(solvable, det, torch.ones_like(det))
        d2, dmin2 = _fp16((ax * bb - bx * ab) / det), _fp16((ax * ab - bx * aa) / det)
        solvable &= (d2 >= 0) & (dmin2 >= 0) & torch.isfinite(d2) & torch.isfinite(dmin2)
        before = _wsse(_values(kind, d, sc, q, dmin, m), x, w)
        after = _wsse(_values(kind, d2, sc, q, dmin2, m), x, w)
        keep = solvable & (after < before)
        d, dmin = torch.where(keep, d2, d), torch.where(keep, dmin2, dmin)
        return {"d": d, "dmin": dmin, "sc": sc, "m": m, "q": q}
    scale = _symmetric_fit(x, w, kind)
    # d by the same search over the sub-block scales, each weighted by what its error costs:
    # Σ w·(sc·d − s)²·q² ≈ (sc·d − s)²·Σ w·x² / s²
    cost = torch.where(scale != 0, (w * x * x).sum(-1) / scale.square().clamp(min=1e-30), torch.zeros_like(scale))
    d = _fp16(_symmetric_fit(scale[:, None], cost[:, None], Kind(scale.shape[1], 2 * (kind.scale_max + 1), False, 0))[:, 0])
    sc = torch.clamp(torch.round(scale / torch.where(d != 0, d, 1)[:, None]), -top - 1, top)
    q = _codes_for(x, d[:, None] * sc, None, kind)
    a = sc[..., None] * (q - kind.levels // 2)
    aa = (w * a * a).sum((1, 2))
    d2 = _fp16((w * a * x).sum((1, 2)) / torch.where(aa > 0, aa, torch.ones_like(aa)))
    before = _wsse(_values(kind, d, sc, q), x, w)
    after = _wsse(_values(kind, d2, sc, q), x, w)
    d = torch.where((aa > 0) & torch.isfinite(d2) & (after < before), d2, d)
    return {"d": d, "dmin": None, "sc": sc, "m": None, "q": q}


# ---- packing, byte for byte as ggml's structs -----------------------------------------------------
def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.uint8)


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).view(-1, 1).view(torch.uint8)


def _two_bit(q: torch.Tensor) -> torch.Tensor:
    """[B, 256] codes < 4 -> [B, 64]: byte h·32 + i holds value h·128 + s·32 + i at bits 2s."""
    q = _u8(q).view(-1, 2, 4, 32)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def _bit_plane(q: torch.Tensor, bit: int) -> torch.Tensor:
    """[B, 256] -> [B, 32]: bit b of byte i is bit `bit` of value b·32 + i."""
    h = (_u8(q) >> bit & 1).view(-1, 8, 32)
    out = torch.zeros_like(h[:, 0])
    for b in range(8):
        out |= h[:, b] << b
    return out


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[B, 256] -> [B, 128]: byte c·32 + l holds value c·64 + l low, c·64 + 32 + l high."""
    q = (_u8(q) & 15).view(-1, 4, 2, 32)
    return (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)


def _scales_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins -> 12 bytes (ggml's get_scale_min_k4, inverted)."""
    sc, m = _u8(sc), _u8(m)
    return torch.cat([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
                      (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4], dim=1)


def _scales_k3(sc: torch.Tensor) -> torch.Tensor:
    """Sixteen 6-bit signed scales -> 12 bytes: low nibbles of j and j+8 in byte j < 8, the high two
    bits of scale 4s + r at bits 2s of byte 8 + r."""
    u = _u8(sc + 32)
    high = (u >> 4).view(-1, 4, 4)
    return torch.cat([(u[:, :8] & 15) | (u[:, 8:] & 15) << 4,
                      high[:, 0] | high[:, 1] << 2 | high[:, 2] << 4 | high[:, 3] << 6], dim=1)


def _pack(qtype: GGML, f: dict[str, torch.Tensor]) -> torch.Tensor:
    q = f["q"].reshape(-1, QK_K)
    if qtype == GGML.Q2_K:
        parts = [_u8(f["sc"]) | _u8(f["m"]) << 4, _two_bit(q), _half_bytes(f["d"]), _half_bytes(f["dmin"])]
    elif qtype == GGML.Q3_K:
        parts = [_bit_plane(q, 2), _two_bit(_u8(q) & 3), _scales_k3(f["sc"]), _half_bytes(f["d"])]
    elif qtype in (GGML.Q4_K, GGML.Q5_K):
        planes = [_bit_plane(q, 4)] if qtype == GGML.Q5_K else []
        parts = [_half_bytes(f["d"]), _half_bytes(f["dmin"]), _scales_k4(f["sc"], f["m"]), *planes, _nibbles(q)]
    else:
        u = _u8(q).view(-1, 2, 2, 64)
        ql = (u[:, :, 0] & 15) | (u[:, :, 1] & 15) << 4
        high = (u.view(-1, 2, 4, 32) >> 4)
        qh = high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6
        parts = [ql.reshape(-1, 128), qh.reshape(-1, 64), f["sc"].to(torch.int8).view(torch.uint8), _half_bytes(f["d"])]
    return torch.cat(parts, dim=1)


def quantize(w: torch.Tensor, qtype: GGML, importance: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """`w` [N, K] (K a multiple of 256) as `qtype` blocks: (uint8 [N, K/256 · block bytes], the fp32
    values [N, K] those blocks decode to). `importance`: [K] non-negative weights of the input columns
    (None: llama.cpp's defaults without an imatrix)."""
    kind = KINDS.get(qtype)
    if kind is None:
        raise LowbitError(f"{qtype.name} is not a K-quant ({', '.join(t.name for t in KINDS)})")
    n, k = w.shape
    if k % QK_K:
        raise LowbitError(f"{qtype.name} holds rows of whole 256-weight super-blocks, not {k} columns")
    x = w.detach().float().reshape(-1, QK_K // kind.sub, kind.sub)
    if not bool(torch.isfinite(x).all()):
        raise LowbitError("weights to quantize are not finite")
    imp = None
    if importance is not None:
        imp = importance.detach().float().flatten()
        if imp.numel() != k or not bool(torch.isfinite(imp).all() & (imp >= 0).all()) or not bool((imp > 0).any()):
            raise LowbitError(f"importance must be {k} finite non-negative values, one per input column, not all 0")
        # a dead input still gets a little weight: a sub-block of them keeps a scale of its own
        imp = imp.clamp(min=1e-6 * float(imp.mean())).expand(n, k).reshape(x.shape)
    blocks, values = [], []
    for at in range(0, x.shape[0], CHUNK):
        xs = x[at:at + CHUNK]
        f = _fit(xs, _weights(xs, qtype, None if imp is None else imp[at:at + CHUNK]), kind)
        if not bool(torch.isfinite(f["d"]).all()) or (f["dmin"] is not None and not bool(torch.isfinite(f["dmin"]).all())):
            raise LowbitError(f"weights too large for {qtype.name}'s fp16 super-block scales")
        blocks.append(_pack(qtype, f))
        values.append(_values(kind, f["d"], f["sc"], f["q"], f["dmin"], f["m"]).reshape(-1, QK_K))
    return torch.cat(blocks).reshape(n, -1).numpy(), torch.cat(values).reshape(n, k)
