"""UniformQ on the CPU through the generated kernels: repack once per layer, then one C call per matmul.

Matmuls can run on int8 activations, as llama.cpp (Q8_0) and Intel's runtimes do: each token is
quantized per 32-block (`quantize_activations` is the exact scheme) and codes × activations become
u8 × s8 integer dot products (maddubs / VNNI). For one token (decode) that is ~2.5× less work per
weight than fp32, which is what a 2–4-bit GEMV needs to keep up with DRAM; for many (prefill) the
GEMM unpacks a chunk of codes to bytes once and runs 64 multiply-adds per VNNI instruction against
16 fp32 FMAs, 3–4× the fp32 GEMM. It changes the numbers (activation rounding), so it is opt-in:
`lowbit.kernels.set_int8_activations(True)` or LOWBIT_INT8_ACT=1 (kernels/switches.py), and the decode
engine's default (`--exact` turns it off); where the kernel table has no int8 row (the portable C)
x stays fp32. Without VNNI, 8-bit codes take the signed form of the dot (see codegen.dot8s) so the
int16 pair sums of maddubs cannot saturate.
"""

from __future__ import annotations

import ctypes

import torch

from ...formats import QTensor, UniformQ
from ...formats.packing import BLOCK
from ...formats.uniform import effective_group
from .. import reference, switches
from . import build, codegen, isa as isa_mod, perf_model, threads
from .layout import interleave, repack


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """What the int8 path computes with, in float: x rounded to s8 per 32-block, scale amax/127."""
    k = x.shape[-1]
    xb = torch.nn.functional.pad(x.float(), (0, -k % BLOCK)).unflatten(-1, (-1, BLOCK))
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).flatten(-2)[..., :k]


class PackedUniform:
    """A UniformQ in the SIMD layout of one ISA, rows interleaved in tiles of the vector's lanes
    (layout.interleave, the last tile padded with zero rows), callable as linear(x, bias). Built once
    per layer."""

    def __init__(self, qt: UniformQ, isa: str, lib: ctypes.CDLL):
        self._layout(qt, isa)
        lanes = perf_model.VECTOR_LANES[isa]  # tiles of `lanes` rows, see layout.interleave
        self.qweight = interleave(self.qweight, lanes)
        self.scales = interleave(qt.scales.to(torch.float16), lanes)
        self.zeros = None if qt.zeros is None else interleave(qt.zeros.to(torch.uint8), lanes)
        self.zdef = 2 ** (qt.bits - 1)
        self.fn, self.qfn = entry_point(lib, isa, qt, "fp32"), entry_point(lib, isa, qt, "int8")

    def _layout(self, qt: QTensor, isa: str) -> None:
        """What every packed kind shares: shape, blocks, groups and the codes repacked for the ISA."""
        n, k = qt.shape
        self.isa, self.n, self.k = isa, n, k
        self.nblocks = -(-k // BLOCK)
        self.groups = -(-k // effective_group(qt.group_size, k))
        self.bpg = self.nblocks if qt.group_size == -1 else qt.group_size // BLOCK
        self.qweight = repack(qt.qweight.contiguous(), qt.bits, k, perf_model.VECTOR_LANES[isa])
        self._plans: dict[tuple[bool, int], perf_model.Plan] = {}

    @property
    def bytes(self) -> int:
        """Bytes the kernel reads per call for the weights (codes, scales or tables, ...)."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, a) for a in self.WEIGHTS) if t is not None)

    def plan(self, m: int) -> perf_model.Plan:
        key = (m == 1, threads.get())
        if key not in self._plans:
            self._plans[key] = perf_model.plan(isa_mod.detect(), self.isa, self.n, self.nblocks * BLOCK,
                                               self.bytes, m, key[1])
        return self._plans[key]

    WEIGHTS = ("qweight", "scales", "zeros")  # the tensors `native` points at (the engine may move them)

    def _weights(self) -> dict[str, int | None]:
        """This format's block of lb_args (c/args.h): where its weights are now."""
        return {"qw": self.qweight.data_ptr(), "sc": self.scales.data_ptr(),
                "zp": None if self.zeros is None else self.zeros.data_ptr(), "zdef": self.zdef}

    def _call(self, m: int, bias: torch.Tensor | None, int8: bool | None = None):
        """The kernel for m tokens and its Args, x and y still NULL; `int8`: int8 activations for
        one token (None: the process-wide switch)."""
        p = self.plan(m)
        args = build.Args(**self._weights(), n=self.n, nblocks=self.nblocks, groups=self.groups, bpg=self.bpg,
                          m=m, bias=None if bias is None else bias.data_ptr(), threads=p.threads, nb=p.nb, kc=p.kc)
        int8 = switches.int8_activations() if int8 is None else int8
        return self.qfn if int8 and self.qfn is not None else self.fn, args

    def native(self, m: int, bias: torch.Tensor | None = None, int8: bool | None = None) -> tuple[int, build.Args]:
        """(address of the C kernel, its Args) for m tokens of padded width nblocks·32: a native
        caller (the decode engine) fills in x, y and m and calls it without Python."""
        fn, args = self._call(m, bias, int8)
        return ctypes.cast(fn, ctypes.c_void_p).value, args

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # kept lean: a decode step calls this hundreds of times for microseconds of work each
        kp = self.nblocks * BLOCK
        x32 = x if x.dtype == torch.float32 else x.float()
        if self.k != kp:
            x32 = torch.nn.functional.pad(x32, (0, kp - self.k))
        if not x32.is_contiguous():
            x32 = x32.contiguous()
        m = x32.numel() // kp
        y = torch.empty(*x.shape[:-1], self.n, dtype=torch.float32)
        if m:
            if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
                bias = bias.float().contiguous()
            fn, args = self._call(m, bias)
            args.x, args.y = x32.data_ptr(), y.data_ptr()
            fn(ctypes.byref(args))
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def entry_point(lib: ctypes.CDLL, isa: str, qt: QTensor, activations: str):
    """The entry point of the kernel table's row (qt's kind and bits, isa, activations), or None."""
    entry = codegen.entry(isa, qt.kind, qt.bits, activations)
    return None if entry is None else getattr(lib, entry.symbol)


def prepare(qt: UniformQ, isa: str | None = None, cls: type[PackedUniform] = PackedUniform) -> PackedUniform | None:
    """The packed layer (a `cls`) for the best ISA this CPU runs (or `isa`); None when no kernel can
    be built."""
    isa = isa or isa_mod.selected()
    lib = build.load(isa)
    if lib is None:
        return None
    threads.apply(lib)
    return cls(qt, isa, lib)


def linear(x: torch.Tensor, qt: UniformQ, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One-off call (repacks every time): for callers without a place to keep the packed layer."""
    packed = prepare(qt)
    return packed(x, bias) if packed is not None else reference.linear(x, qt, bias)
