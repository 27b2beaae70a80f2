"""Exact b-bit packing of unsigned integer codes into int32 words.

Every row is cut into blocks of 32 codes; a block of 32 b-bit codes is exactly b int32 words, stored
as one little-endian bit stream (code j occupies bits [j*b, (j+1)*b) of the block). The same layout
serves 2, 3, 4 and 8 bits: for 2/4/8 bits a word holds whole codes, for 3 bits codes straddle words.
Rows are padded with zero codes up to a multiple of 32; `unpack` cuts the padding off again.
"""

import functools

import torch

BLOCK = 32  # codes per packing block; b words per block
_CODES_PER_CHUNK = 1 << 22  # bounds the temporary bit tensors (8·bits bytes per code) on any matrix


def packed_words(cols: int, bits: int) -> int:
    """int32 words per row that hold `cols` codes of `bits` bits."""
    return -(-cols // BLOCK) * bits


def _pack_chunk(q: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = q.shape
    pad = packed_words(cols, bits) // bits * BLOCK - cols
    q = torch.nn.functional.pad(q.to(torch.int64), (0, pad))
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((q.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1, bits, 32)  # blocks × words × bits
    words = (stream << torch.arange(32, dtype=torch.int64)).sum(-1)  # in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.reshape(rows, -1).to(torch.int32)


@functools.lru_cache(maxsize=None)
def _code_offsets(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each code of a block: the word it starts in and its bit offset there."""
    start = torch.arange(BLOCK, dtype=torch.int64) * bits
    return start // 32, start % 32


def _unpack_chunk(w: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    rows = w.shape[0]
    words = w.reshape(rows, -1, bits)  # int32; arithmetic shifts are fine since we mask afterwards
    word, shift = _code_offsets(bits)
    codes = words[:, :, word] >> shift.to(torch.int32)  # low bits of each code, garbage above
    if bits == 3:  # codes 10 and 21 straddle two words: their high bits start the next word
        straddle = shift + bits > 32
        low_mask = torch.where(straddle, (1 << (32 - shift)) - 1, 2**bits - 1).to(torch.int32)
        hi = words[:, :, (word + 1).clamp(max=bits - 1)] << (32 - shift).clamp(max=31).to(torch.int32)
        codes = (codes & low_mask) | torch.where(straddle, hi, 0)
    return (codes & (2**bits - 1)).reshape(rows, -1)[:, :cols].to(torch.uint8)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] codes in [0, 2^bits) -> [rows, packed_words(cols, bits)] int32."""
    if q.dim() != 2:
        raise ValueError(f"pack expects a 2-D tensor, got shape {tuple(q.shape)}")
    rows = max(1, _CODES_PER_CHUNK // max(q.shape[1], 1))
    return torch.cat([_pack_chunk(c, bits) for c in q.split(rows)]) if q.shape[0] else \
        torch.empty(0, packed_words(q.shape[1], bits), dtype=torch.int32)


def unpack(w: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack`: [rows, words] int32 -> [rows, cols] uint8 codes."""
    if w.shape[0] == 0:
        return torch.empty(0, cols, dtype=torch.uint8)
    return torch.cat([_unpack_chunk(c, bits, cols) for c in w.split(max(1, _CODES_PER_CHUNK // max(cols, 1)))])
