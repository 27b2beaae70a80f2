"""KQuant (GGUF K-quants) on the CPU: the file's own blocks, and for the int8 GEMV tiles built from them.

The fp32 row (and the int8 row without VNNI, and Q2_K/Q3_K everywhere) reads the blocks in place: the
kernels decode each 256-weight super-block in registers as they stream it (84-210 contiguous bytes of
one row). On AVX-512 VNNI the int8 rows of Q4_K, Q5_K and Q6_K read tiles of 16 rows instead, built
once at load (`tiles`): the rows in the vector's lanes, so one super-block step serves 16 rows, and
each tile super-block laid out in the order the kernel reads it, one sequential stream (codes and
scales in separate regions cost Q6_K 2.5x in DRAM reads). Tiles hold the blocks' bytes (Q4_K/Q5_K 4
more a super-block: the 6-bit scales as bytes; the last tile's padding rows), and the decode engine copies them into its huge-page arena
like any packed layer (`WEIGHTS`). The drivers, plans and `native` interface are UniformQ's; the
entry points are the kernel table's kquant rows: int8 activations where the int8 switch is on, as
the decode engine runs by default, else fp32. The int8 rows round x as llama.cpp's K-quant dots do
(q8_K: per 256, `quantize_activations`), not per 32 as UniformQ's: that keeps every sum of a
super-block in integers (c/kquant.h says why).
"""

from __future__ import annotations

import ctypes

import torch

from ...formats.kquant import QK_K, TYPES, KQuant, _scales_k4, decode
from ...formats.packing import BLOCK
from .uniform import PackedUniform, entry_point
from .uniform import prepare as _prepare


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """What the int8 rows compute with, in float: x (a multiple of 256 wide) rounded to s8 per 256,
    scale amax/127, round half to even."""
    xb = x.float().unflatten(-1, (-1, QK_K))
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).flatten(-2)


TILE = 16  # rows of a tile (c/kquant.h, kq_tiles_task_b4)


def tiles(qt: KQuant) -> torch.Tensor:
    """A Q4_K's, Q5_K's or Q6_K's blocks as c/kquant.h's tiles of 16 rows (rows padded with zeros),
    uint8, per tile and super-block in the order the kernel reads them. The codes' low nibbles come as
    vectors [16 rows][4 bytes] (p < 32: byte i holds code 8p + i low, 8p + 4 + i high). Q4_K/Q5_K:
    scales and mins [8 groups][16 rows], d and dmin [16] (fp16), then per group g its nibbles (p = 4g
    + s, s < 4) and, Q5_K, the fifth bits [16 rows][4] (byte i, bit 2s: code 8p + i; 2s + 1: 8p + 4 + i).
    Q6_K: int8 scales [16 groups][16 rows], then per pair j of groups its nibbles (p = 4j + f) and top
    two bits [A, B][16 rows][4] (bits 2f of byte i: code 8p + i, B: + 4), d [16] last."""
    n, k = qt.shape
    nbytes = TYPES[qt.qtype].nbytes
    nsb, rows = k // QK_K, -(-n // TILE) * TILE
    blocks = torch.nn.functional.pad(qt.blocks.reshape(n, nsb, nbytes), (0, 0, 0, 0, 0, rows - n)).reshape(-1, nbytes)
    codes, _, _ = decode(qt.qtype, blocks)
    q = codes.view(rows // TILE, TILE, nsb, 32, 2, 4)
    packed = ((q[..., 0, :] & 15) | (q[..., 1, :] & 15) << 4).permute(0, 2, 3, 1, 4).reshape(rows // TILE, nsb, -1)
    def lanes(t: torch.Tensor, fields_first: bool) -> torch.Tensor:  # [rows·nsb, f] -> [tiles, nsb, ...]
        t = t.reshape(rows // TILE, TILE, nsb, -1)
        return t.permute(0, 2, 3, 1) if fields_first else t.permute(0, 2, 1, 3)

    if qt.qtype == "Q6_K":
        high = (q >> 4).view(rows // TILE, TILE, nsb, 8, 4, 2, 4)  # [.., j, f, A/B, i]
        planes = sum(high[..., f, :, :] << 2 * f for f in range(4)).permute(0, 2, 3, 4, 1, 5)
        pairs = torch.cat([packed.view(rows // TILE, nsb, 8, 256), planes.reshape(rows // TILE, nsb, 8, 128)], dim=-1)
        parts = [lanes(blocks[:, 192:208], True), pairs, lanes(blocks[:, 208:210], False)]
        return torch.cat([t.reshape(rows // TILE, nsb, -1) for t in parts], dim=-1).contiguous()
    groups = packed.view(rows // TILE, nsb, 8, 256)
    if qt.qtype == "Q5_K":
        fifth = ((q >> 4) & 1).view(rows // TILE, TILE, nsb, 8, 4, 2, 4)  # [.., g, s, half, i]
        plane = sum(fifth[..., s, h, :] << 2 * s + h for s in range(4) for h in range(2)).permute(0, 2, 3, 1, 4)
        groups = torch.cat([groups, plane.reshape(rows // TILE, nsb, 8, 64)], dim=-1)
    sc, mn = _scales_k4(blocks[:, 4:16])
    parts = [lanes(sc, True), lanes(mn, True), lanes(blocks[:, 0:2], False), lanes(blocks[:, 2:4], False), groups]
    return torch.cat([t.reshape(rows // TILE, nsb, -1) for t in parts], dim=-1).contiguous()


class PackedKQuant(PackedUniform):
    """A KQuant's blocks as the kernels read them, callable as linear(x, bias). Where the int8 row
    runs tiles (Q4_K, Q5_K and Q6_K on AVX-512 VNNI: lb_kquant_tiled), the tiles are built once, and are what the
    int8 kernel (and the engine's arena) reads; the fp32 row reads the blocks."""

    def __init__(self, qt: KQuant, isa: str, lib: ctypes.CDLL):
        n, k = qt.shape
        self.isa, self.n, self.k = isa, n, k
        self.nblocks, self.groups = k // BLOCK, 1
        self.bpg = self.nblocks
        self.blocks = qt.blocks.contiguous()
        self._plans = {}
        self.fn, self.qfn = entry_point(lib, isa, qt, "fp32"), entry_point(lib, isa, qt, "int8")
        self.tiles = tiles(qt) if self.qfn is not None and lib.lb_kquant_tiled(qt.bits) else None
        self.WEIGHTS = ("tiles",) if self.tiles is not None else ("blocks",)

    def _weights(self) -> dict[str, int | None]:
        return {"qw": self.blocks.data_ptr()}

    def _call(self, m: int, bias: torch.Tensor | None, int8: bool | None = None):
        fn, args = super()._call(m, bias, int8)
        if fn is self.qfn and self.tiles is not None:
            args.qw = self.tiles.data_ptr()
        return fn, args


def prepare(qt: KQuant, isa: str | None = None) -> PackedKQuant | None:
    """The packed layer for the best ISA this CPU runs (or `isa`); None when no kernel can be built."""
    return _prepare(qt, isa, PackedKQuant)
