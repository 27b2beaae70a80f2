"""Prefix cache: the KV of finished sequences parked in spare engine slots, found by token-prefix hash.

A prompt that begins like an earlier one (a system prompt, a conversation so far) need not be
computed again. When a serving slot is released, the block-aligned prefix of its tokens (BLOCK tokens
per block) is copied into one of the spare slots, and each block boundary is indexed by a chain hash
(h_k = hash(h_{k-1}, block k's tokens): equal hashes mean equal prefixes, up to a collision, which the
stored tokens rule out). A new prompt's blocks are hashed the same way; the longest boundary found is
copied into the prompt's serving slot, and only the rest is computed. Spare slots are overwritten
least recently used first, so the cache holds at most `len(spares)` × one slot's KV bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

BLOCK = 32  # tokens per hashed block: a prefix is reused in whole blocks


def block_hashes(tokens: Sequence[int]) -> list[int]:
    """The chain hash at the end of each whole block of `tokens`."""
    out, h = [], 0
    for end in range(BLOCK, len(tokens) + 1, BLOCK):
        h = hash((h, tuple(tokens[end - BLOCK:end])))
        out.append(h)
    return out


class PrefixCache:
    """Block-aligned prefixes parked in the engine's spare slots, least recently used overwritten first."""

    def __init__(self, engine, spares: Sequence[int]):
        self.engine = engine
        self.lru: OrderedDict[int, list[int]] = OrderedDict((s, []) for s in spares)  # spare -> tokens held
        self.index: dict[int, set[int]] = {}  # chain hash -> spares holding that prefix
        self.parked = 0  # prefixes copied in

    def lookup(self, tokens: Sequence[int]) -> tuple[int, int]:
        """(spare slot, tokens) of the longest parked prefix of `tokens`; (-1, 0) when none."""
        hashes = block_hashes(tokens)
        for k in range(len(hashes), 0, -1):
            n = k * BLOCK
            held = [s for s in self.index.get(hashes[k - 1], ()) if self.lru[s][:n] == list(tokens[:n])]
            if held:
                spare = max(held, key=list(self.lru).index)  # the most recently used
                self.lru.move_to_end(spare)
                return spare, n
        return -1, 0

    def park(self, slot: int, tokens: Sequence[int]) -> None:
        """Copy the block-aligned prefix of `tokens` (held by serving `slot`) into the least recently
        used spare, unless a spare already holds all of it."""
        hashes = block_hashes(tokens)
        if not hashes or not self.lru:
            return
        n = len(hashes) * BLOCK
        for spare in self.index.get(hashes[-1], ()):
            if self.lru[spare][:n] == list(tokens[:n]):
                self.lru.move_to_end(spare)
                return
        spare, old = self.lru.popitem(last=False)
        for h in block_hashes(old):
            self.index.get(h, set()).discard(spare)
        self.engine.copy(slot, spare, n)
        self.lru[spare] = list(tokens[:n])
        for h in hashes:
            self.index.setdefault(h, set()).add(spare)
        self.index = {h: s for h, s in self.index.items() if s}
        self.parked += 1
