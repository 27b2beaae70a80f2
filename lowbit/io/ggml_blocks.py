"""UniformQ <-> ggml's 32-weight block types Q4_0, Q5_0, Q8_0 and Q4_1, byte for byte.

A ggml block holds 32 consecutive weights of a row with its own fp16 scale:
  Q4_0  {fp16 d; 16 bytes}              w = d·(c − 8),   code j in the low nibble of byte j, code j+16 in its high nibble
  Q5_0  {fp16 d; u32 qh; 16 bytes}      w = d·(c − 16),  low nibbles as Q4_0, bit j of qh the fifth bit of code j
  Q8_0  {fp16 d; 32 int8 q}             w = d·q
  Q4_1  {fp16 d; fp16 m; 16 bytes}      w = d·c + m      (nibbles as Q4_0)
UniformQ w = s·(q − z) (sym: z = 2^(b−1)) with groups of a multiple of 32 columns is held exactly by the
first three whenever q − z fits their code range (d = s of the block's group, c = q − z + 8, 16 or 0):
Q4_0 holds 2/3/4-bit sym and 2/3-bit asym, Q5_0 also 4-bit asym, Q8_0 every sym width and asym up to 7
bits. UniformQ 4-bit g32 sym is Q4_0 byte for byte: our s = m/−8 (m the group's signed largest-magnitude
value) is the very d of ggml's Q4_0 quantizer, so the codes are ours too. UniformQ 8-bit sym is Q8_0 as
q8 = q − 128 ∈ [−128, 127] (the representation is shared; the quantizers differ: ggml maps the largest
magnitude to ±127, ours to −128, one finer step). UniformQ 4-bit g32 asym goes to Q4_1 as d = s,
m = fp16(−z·s): m is rounded to fp16, so this one is close, not exact. The other way, a Q4_1 block is
UniformQ only when m/d is an integer in [−15, 0]: in general it is not, so Q4_1 is not imported.
"""

import numpy as np
import torch
from gguf import GGMLQuantizationType as GGML

from ..errors import LowbitError
from ..formats import UniformQ
from ..formats.uniform import effective_group
from ..formats.packing import pack

BLOCK = 32
BLOCK_BYTES = {GGML.Q4_0: 18, GGML.Q5_0: 22, GGML.Q8_0: 34, GGML.Q4_1: 20}
OFFSET = {GGML.Q4_0: 8, GGML.Q5_0: 16, GGML.Q8_0: 128}  # w = d·(c − offset), codes c ∈ [0, 2·offset)
EXPORTABLE = ("UniformQ with groups of a multiple of 32: 4-bit sym (Q4_0), 8-bit sym (Q8_0) exactly, "
              "4-bit asym g32 (Q4_1)")


def _group(qt) -> int | None:
    """The group size of a UniformQ whose 32-weight blocks each lie in one group (else None)."""
    if not isinstance(qt, UniformQ) or qt.shape[1] % BLOCK:
        return None
    g = effective_group(qt.group_size, qt.shape[1])
    return g if g % BLOCK == 0 else None


def holds(qt, qtype: GGML) -> bool:
    """Whether `qtype`'s blocks hold `qt` (exactly; Q4_1: with m rounded to fp16)."""
    g = _group(qt)
    if g is None:
        return False
    if qtype == GGML.Q4_1:
        return qt.bits == 4 and not qt.sym and g == BLOCK
    if qtype not in OFFSET:
        return False
    if qt.sym:  # q − z ∈ [−2^(b−1), 2^(b−1) − 1]
        return 2 ** (qt.bits - 1) <= OFFSET[qtype]
    return 2 ** qt.bits - 1 < OFFSET[qtype]  # q − z ∈ [−(2^b − 1), 2^b − 1]


def ggml_type(qt) -> GGML | None:
    """The ggml block type of `qt`'s own size that holds it (None: none does)."""
    qtype = {(4, True): GGML.Q4_0, (8, True): GGML.Q8_0, (4, False): GGML.Q4_1}.get((getattr(qt, "bits", None),
                                                                                    getattr(qt, "sym", None)))
    return qtype if qtype is not None and holds(qt, qtype) else None


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, G, 32] 4-bit codes -> [N, G, 16] bytes: code j low, code j+16 high."""
    return codes[..., :16] | (codes[..., 16:] << 4)


def to_blocks(qt: UniformQ, qtype: GGML | None = None) -> tuple[np.ndarray, GGML]:
    """`qt` as ggml blocks of `qtype` (default: ggml_type(qt)): uint8 [N, K/32 · block bytes], the type."""
    qtype = ggml_type(qt) if qtype is None else qtype
    if qtype is None or not holds(qt, qtype):
        raise LowbitError(f"{qt.describe(qt.meta())} has no GGUF block type{' ' + qtype.name if qtype else ''}: "
                          f"GGUF export holds {EXPORTABLE}")
    n, k = qt.shape
    group = (torch.arange(k // BLOCK) * BLOCK) // _group(qt)  # the group of each block
    q = qt.codes().view(n, k // BLOCK, BLOCK)
    scales = qt.scales[:, group].contiguous()
    d = scales.view(n, k // BLOCK, 1).view(torch.uint8)
    if qtype == GGML.Q4_1:
        m = (-qt.zeros[:, group].float() * scales.float()).to(torch.float16).view(n, k // BLOCK, 1).view(torch.uint8)
        return torch.cat([d, m, _nibbles(q)], dim=-1).reshape(n, -1).numpy(), qtype
    zeros = torch.full((1, 1, 1), 2 ** (qt.bits - 1)) if qt.sym else qt.zeros[:, group].unsqueeze(-1)
    c = (q.to(torch.int16) - zeros.to(torch.int16) + OFFSET[qtype])
    if qtype == GGML.Q8_0:
        parts = [d, (c - 128).to(torch.int8).view(torch.uint8)]
    else:
        c = c.to(torch.uint8)
        parts = [d, _nibbles(c & 15)]
        if qtype == GGML.Q5_0:  # bit j of the little-endian u32 is the fifth bit of code j
            high = (c >> 4).view(n, k // BLOCK, 4, 8)
            parts.insert(1, sum(high[..., i] << i for i in range(8)).to(torch.uint8))
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
