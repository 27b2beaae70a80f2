"""W·A· layers on the CPU: a UniformQ under an activation spec (formats/activation.py) through the
integer kernel of c/tender.h — Tender's integer matmul, the groups combined by shifts.

The layout (`TenderLayout`, built once per layer) is the kernel's channel order: per weight group j,
its activation groups from the top one down ("runs"), each padded to whole units (4 channels of
bytes; 8 for codes of <= 4 bits, two quads per byte's nibbles). The input permutation, the bias and
each channel's group factors are folded into per-position arrays, so the kernel's quantize step is
one gather-subtract-multiply-round pass and the matmul streams codes and activations in order.

Overflow (the issue's "prove the bound"): with codes c in [0, 2^wb) and activation codes |q| <= 2^(b-1),
a run r of K_r (padded) positions has |Σ q·c| <= K_r·(2^wb − 1)·2^(b−1) = K_r·C. Horner over a
segment of runs ending at group g_min holds Σ_r 2^(g_r − g_min)·K_r·C; the segment grows run by run
while that stays below 2^31 and is otherwise flushed into int64 (shifted by g_min). A weight group
stays wholly in int32 ("narrow": no flush, no int64) when its one segment, shifted to absolute
groups, is below 2^30 (the zero-point fold z·S' has the same bound, and D − z·S' must fit too).
Per-channel 8-bit weights over a few hundred channels usually are one segment; G = 16 at A8W8 flushes.

AVX-512 VNNI runs 16-row tiles through vpdpbusd; AVX2 (and AVX-512 without VNNI) 8-row tiles through
maddubs, whose int16 pair sums hold nibble codes as they are and 8-bit codes only in sign form (c − 128,
zero points alike, activations in [−127, 127]: the static TMax's clamp stops at −127 there, the one
place that path can differ from the oracle, which allows −128).

Methods it runs: tender, and as G = 1 with the identity order and no bias, per-token and smoothquant
(one scale per row) and per-tensor (the static TMax). per-block32 and hadamard are not in its form:
`prepare` returns None and the caller runs the fake-quantized reference.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from ...formats import UniformQ
from ...formats.activation import ActQ
from ...formats.uniform import effective_group
from . import build, codegen, isa as isa_mod, threads

METHODS = ("tender", "per-token", "smoothquant", "per-tensor")
LIMIT = 2**31  # int32 accumulators


class PackedTender:
    """A UniformQ and its ActQ in the kernel's layout, callable as linear(x, bias)."""

    def __init__(self, qt: UniformQ, act: ActQ, lib: ctypes.CDLL):
        n, k = qt.shape
        tender = act.method == "tender"
        g_count = act.groups if tender else 1
        group = act.group.long() if tender else torch.zeros(k, dtype=torch.long)
        perm = act.perm.long() if tender else torch.arange(k)
        bias = act.bias.float() if tender else torch.zeros(k)
        self.n, self.k, self.nibble = n, k, qt.bits <= 4
        unit = 8 if self.nibble else 4
        bound = (2**qt.bits - 1) * 2 ** (act.bits - 1)  # max |code · q|
        gs = effective_group(qt.group_size, k)
        src, runs, jrun, jpos, narrow = [], [], [0], [], []
        for j in range(-(-k // gs)):
            cols = torch.arange(j * gs, min((j + 1) * gs, k))
            jpos.append(len(src))
            held, prev = 0, None
            for g in sorted(set(group[cols].tolist()), reverse=True):
                idx = cols[group[cols] == g].tolist()
                units = -(-len(idx) // unit)
                term = units * unit * bound
                if prev is not None and held * 2 ** (prev - g) + term < LIMIT:
                    runs.append([len(src) // unit, units, prev - g, 0, g])
                    held = held * 2 ** (prev - g) + term
                else:
                    if prev is not None:
                        runs[-1][3:] = [1, prev]  # flush the segment so far
                    runs.append([len(src) // unit, units, 0, 0, g])
                    held = term
                src += idx + [-1] * (units * unit - len(idx))
                prev = g
            one = all(r[3] == 0 for r in runs[jrun[-1]:])
            narrow.append(int(one and held * 2**prev < LIMIT // 2))
            runs[-1][3:] = [2 if narrow[-1] else 1, prev]
            jrun.append(len(runs))
        jpos.append(len(src))
        src += [-1] * (-len(src) % 16)
        self.kp = len(src)
        s = torch.tensor(src)
        valid, s = s >= 0, s.clamp(min=0)
        gp = torch.where(valid, group[s], 0)
        zero = torch.zeros(self.kp)
        self.xin = torch.where(valid, perm[s], 0).to(torch.int32)
        self.abias = torch.where(valid, bias[s], zero).contiguous()
        self.tfac = torch.where(valid, torch.exp2(float(g_count - 1) - gp.float()), zero)
        self.ginv = torch.where(valid, torch.exp2(-gp.float()), zero)
        self.gsh = gp.to(torch.int32)
        self.runs = torch.tensor(runs, dtype=torch.int32).contiguous()
        self.jrun, self.jpos = torch.tensor(jrun, dtype=torch.int32), torch.tensor(jpos, dtype=torch.int32)
        self.narrow = torch.tensor(narrow, dtype=torch.int32)
        self.lanes = lib.lb_tender_lanes()  # rows per tile: 16 (AVX-512 VNNI) or 8 (AVX2: maddubs)
        self.tiles = -(-n // self.lanes)
        signed = not self.nibble and self.lanes == 8  # AVX2's 8-bit codes in sign form (c/tender.h)
        codes = torch.where(valid, qt.codes()[:, s], torch.zeros((), dtype=torch.uint8))
        codes = F.pad(codes ^ (0x80 if signed else 0), (0, 0, 0, self.tiles * self.lanes - n))
        codes = codes.view(self.tiles, self.lanes, -1, 4)
        if self.nibble:  # unit u: positions 8u..8u+3 in the low nibbles, 8u+4..8u+7 in the high ones
            codes = codes[:, :, 0::2] | codes[:, :, 1::2] << 4
        self.qw = codes.permute(0, 2, 1, 3).contiguous()
        self.sw = self._tiles(qt.scales.float())
        self.zw = None if qt.zeros is None else self._tiles(qt.zeros.to(torch.int32) - (128 if signed else 0))
        qmax = act.qmax
        static = act.chunk == 0 or act.method == "per-tensor"  # one calibrated TMax for every row
        self.fn = getattr(lib, codegen.TENDER_SYMBOL)
        self.args = build.TenderArgs(
            zdef=2 ** (qt.bits - 1) - (128 if signed else 0), nibble=int(self.nibble), n=n, k=k, kp=self.kp, groups=len(narrow), tiles=self.tiles,
            chunk=0 if static else act.chunk if tender else 1, top=float(qmax * 2 ** (g_count - 1)),
            tstatic=float(act.maxima.max()) if static else 0.0,
            qmin=-qmax if signed else -qmax - 1, qmax=qmax)

        self._point()

    TENSORS = ("qw", "sw", "zw", "runs", "jrun", "narrow", "xin", "abias", "tfac", "ginv", "gsh", "jpos")

    def _point(self) -> None:
        """The args' pointers at the layout's tensors where they are now (the engine moves `qw`)."""
        for name in self.TENSORS:
            t = getattr(self, name)
            setattr(self.args, name, None if t is None else t.data_ptr())

    def _tiles(self, t: torch.Tensor) -> torch.Tensor:
        """[N, J] per-row values -> [tiles, J, lanes], padding rows 0."""
        return F.pad(t, (0, 0, 0, self.tiles * self.lanes - self.n)).view(self.tiles, self.lanes, -1).transpose(1, 2).contiguous()


    def native(self, bias: torch.Tensor | None = None) -> tuple[int, build.TenderArgs]:
        """(address of the kernel, its prefilled args) for a native caller (the decode engine), which
        sets m, x, y and threads."""
        self._point()
        self.args.bias = None if bias is None else bias.data_ptr()
        return ctypes.cast(self.fn, ctypes.c_void_p).value, self.args

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x32 = x.reshape(-1, self.k).float().contiguous()
        m = x32.shape[0]
        y = torch.empty(m, self.n, dtype=torch.float32)
        if m:
            if bias is not None:
                bias = bias.float().contiguous()
            a = self.args
            a.m, a.x, a.y, a.threads = m, x32.data_ptr(), y.data_ptr(), threads.get()
            a.bias = None if bias is None else bias.data_ptr()
            self.fn(ctypes.byref(a))
        y = y.view(*x.shape[:-1], self.n)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def runs(qt: UniformQ, act: ActQ) -> bool:
    """Whether the integer kernel runs this layer's form (the ISA aside)."""
    return isinstance(qt, UniformQ) and act.method in METHODS and act.in_features == qt.shape[1]


def prepare(qt: UniformQ, act: ActQ, isa: str | None = None) -> PackedTender | None:
    """The packed layer on this CPU (or `isa`), or None: no vpdpbusd, no compiler, or a form it doesn't run."""
    isa = isa or isa_mod.selected()
    if not runs(qt, act) or codegen.entry(isa, "uniform", qt.bits, "tender") is None:
        return None
    lib = build.load(isa)
    if lib is None:
        return None
    threads.apply(lib)
    return PackedTender(qt, act, lib)
