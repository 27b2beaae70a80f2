"""The Decoder contract: what generation, chat, the server and the benchmark drive, token by token.

A Decoder owns one sequence's KV cache. `forward(ids)` appends tokens to the cache and returns the
logits of the last one; `truncate(n)` forgets everything after the first n positions, so a chat turn
or a server request that shares a prefix with the cache reuses it instead of recomputing it. Two
implementations: the native engine (runtime/engine.py, the common decoder families) and the universal
path (any HF model with QuantLinear layers inside, through its own cache).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Decoder(Protocol):
    vocab_size: int
    max_context: int  # positions the cache holds
    position: int  # tokens in the cache now

    def forward(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Append `ids` (prefill when several) and return float32 logits [vocab_size] of the last."""
        ...

    def truncate(self, n: int) -> None:
        """Keep the first `n` cached positions (0 = empty cache)."""
        ...
