"""UniformQ <-> ggml's block types Q4_0, Q8_0 and Q4_1, byte for byte.

A ggml block holds 32 consecutive weights of a row with its own fp16 scale:
  Q4_0  {fp16 d; 16 bytes}          w = d·(q − 8),  code j in the low nibble of byte j, code j+16 in its high nibble
  Q8_0  {fp16 d; 32 int8 q}         w = d·q
  Q4_1  {fp16 d; fp16 m; 16 bytes}  w = d·q + m     (nibbles as Q4_0)
UniformQ 4-bit g32 sym is Q4_0 exactly: our w = s·(q − 2^(b−1)) with s = m/−8 (m the group's signed
largest-magnitude value) is the very d of ggml's Q4_0 quantizer, so d = s and the codes are ours.
UniformQ 8-bit g32 sym is held exactly by Q8_0 as q8 = q − 128 ∈ [−128, 127] (the representation is
shared; the quantizers differ: ggml maps the largest magnitude to ±127, ours to −128, one finer step).
UniformQ 4-bit g32 asym goes to Q4_1 as d = s, m = fp16(−z·s): m is rounded to fp16, so this one is
close, not exact. The other way, a Q4_1 block is UniformQ only when m/d is an integer in [−15, 0]:
in general it is not, so Q4_1 is not imported as UniformQ.
"""

import numpy as np
import torch
from gguf import GGMLQuantizationType as GGML

from ..errors import LowbitError
from ..formats import UniformQ
from ..formats.packing import pack

BLOCK = 32
BLOCK_BYTES = {GGML.Q4_0: 18, GGML.Q8_0: 34, GGML.Q4_1: 20}
EXPORTABLE = "UniformQ with group size 32: 4-bit sym (Q4_0), 8-bit sym (Q8_0), 4-bit asym (Q4_1)"


def ggml_type(qt) -> GGML | None:
    """The ggml block type that holds `qt` (None: none does)."""
    if not isinstance(qt, UniformQ) or qt.shape[1] % BLOCK or qt.group_size not in (BLOCK, -1) or \
            (qt.group_size == -1 and qt.shape[1] != BLOCK):
        return None
    return {(4, True): GGML.Q4_0, (8, True): GGML.Q8_0, (4, False): GGML.Q4_1}.get((qt.bits, qt.sym))


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, G, 32] 4-bit codes -> [N, G, 16] bytes: code j low, code j+16 high."""
    return codes[..., :16] | (codes[..., 16:] << 4)


def to_blocks(qt: UniformQ) -> tuple[np.ndarray, GGML]:
    """`qt` as ggml blocks: uint8 [N, K/32 · block bytes] and their type."""
    qtype = ggml_type(qt)
    if qtype is None:
        raise LowbitError(f"{qt.describe(qt.meta())} has no GGUF block type: GGUF export holds {EXPORTABLE}")
    n, k = qt.shape
    codes = qt.codes().view(n, k // BLOCK, BLOCK)
    d = qt.scales.view(n, k // BLOCK, 1).view(torch.uint8)
    if qtype == GGML.Q4_0:
        parts = [d, _nibbles(codes)]
    elif qtype == GGML.Q8_0:
        parts = [d, (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)]
    else:
        m = (-qt.zeros.float() * qt.scales.float()).to(torch.float16).view(n, k // BLOCK, 1).view(torch.uint8)
        parts = [d, m, _nibbles(codes)]
    return torch.cat(parts, dim=-1).reshape(n, -1).numpy(), qtype


def from_blocks(data: np.ndarray, qtype: GGML, shape: tuple[int, int]) -> UniformQ:
    """ggml blocks (uint8, [N, K/32 · block bytes]) of Q4_0 or Q8_0 as the UniformQ they are."""
    n, k = shape
    if qtype not in (GGML.Q4_0, GGML.Q8_0):
        raise LowbitError(f"{qtype.name} blocks are not UniformQ (Q4_0 and Q8_0 are)")
    if k % BLOCK or data.dtype != np.uint8 or data.shape != (n, k // BLOCK * BLOCK_BYTES[qtype]):
        raise LowbitError(f"{qtype.name} data of shape {list(data.shape)} does not hold a {n}×{k} weight")
    blocks = torch.from_numpy(np.array(data)).view(n, k // BLOCK, BLOCK_BYTES[qtype])  # a copy: data may be a read-only map
    scales = blocks[..., :2].contiguous().view(torch.float16).view(n, k // BLOCK)
    if qtype == GGML.Q4_0:
        qs = blocks[..., 2:]
        codes, bits = torch.cat([qs & 15, qs >> 4], dim=-1), 4
    else:
        codes, bits = (blocks[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8), 8
    return UniformQ(pack(codes.reshape(n, k), bits), scales.clone(), None, bits, BLOCK, (n, k))
