"""The SIMD layout of a 32-code block, built at load time from the portable packing (formats/packing.py).

A block of 32 b-bit codes stays b int32 words (same bytes as on disk), but its bits are placed for
a vector of L 32-bit lanes: code c = f·L + l (field f, lane l) of a plane of pb bits lives in word
l % pb at bit L·f + pb·(l // pb). Unpacking field f for all lanes is then:
    broadcast the pb words to L lanes; shift lane l right by pb·(l // pb)  (once per block)
    shift right by L·f; mask with 2^pb − 1                                 (once per L codes)
which yields codes f·L .. f·L+L−1 in order, ready to meet L contiguous activations. 3-bit codes are
split into a 2-bit plane (words 0–1) and a 1-bit plane (word 2), so no code straddles a word.

UniformQ then interleaves rows (`interleave`): L rows make a tile, and word j of every row of the
tile sits next to word j of the others, so one vector load holds word j of L rows. The GEMVs keep
rows in lanes (codegen._gemv_rows): the mask and shift that pull lane group l's codes out of word
l % pb serve L rows at once, there is no horizontal sum, and a thread's tiles are one sequential
stream. Scales and zero points are interleaved the same way (per group, L rows side by side).
"""

from __future__ import annotations

import torch

from ...formats.packing import BLOCK, unpack


def plane_bits(bits: int) -> list[tuple[int, int]]:
    """(bits of the plane, first word of the plane in the block) for each plane of a code."""
    return [(2, 0), (1, 2)] if bits == 3 else [(bits, 0)]


def pre_shifts(pb: int, lanes: int) -> list[int]:
    return [pb * (lane // pb) for lane in range(lanes)]


def _plane_words(codes: torch.Tensor, pb: int, lanes: int) -> torch.Tensor:
    """[rows, blocks, 32] codes of pb bits -> [rows, blocks, pb] int32 words in the SIMD layout."""
    c = torch.arange(BLOCK)
    f, lane = c // lanes, c % lanes
    word, shift = lane % pb, lanes * f + pb * (lane // pb)
    vals = (codes.to(torch.int64) & ((1 << pb) - 1)) << shift
    words = torch.zeros(*codes.shape[:2], pb, dtype=torch.int64)
    words.index_add_(2, word, vals)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def repack(qweight: torch.Tensor, bits: int, cols: int, lanes: int, rows_per_chunk: int = 2048) -> torch.Tensor:
    """Portable packing -> SIMD layout for `lanes`-wide vectors; same shape and bytes, new bit order."""
    out = torch.empty_like(qweight)
    for start in range(0, qweight.shape[0], rows_per_chunk):
        chunk = qweight[start:start + rows_per_chunk]
        codes = unpack(chunk, bits, chunk.shape[1] // bits * BLOCK).view(chunk.shape[0], -1, BLOCK)
        parts = [_plane_words(codes, 2, lanes), _plane_words(codes >> 2, 1, lanes)] if bits == 3 \
            else [_plane_words(codes, bits, lanes)]
        out[start:start + rows_per_chunk] = torch.cat(parts, dim=2).view(chunk.shape[0], -1)
    return out


def interleave(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[N, C] -> [ceil(N / rows) · rows, C] as tiles of `rows` rows with their columns interleaved:
    element (r, c) moves to tile r // rows, position c · rows + r % rows. Padding rows are zero."""
    n, c = t.shape
    tiles = -(-n // rows)
    padded = torch.nn.functional.pad(t, (0, 0, 0, tiles * rows - n)) if tiles * rows != n else t
    return padded.view(tiles, rows, c).transpose(1, 2).contiguous().view(tiles * rows, c)
