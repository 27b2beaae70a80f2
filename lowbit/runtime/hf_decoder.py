"""The universal Decoder (any HF causal LM, QuantLinear layers inside) and the choice of decoder.

`decoder_for(model)` prefers the native engine (runtime/engine.py) and falls back to this one,
with one notice, when the engine is absent or does not support the model.
"""

from __future__ import annotations

import inspect
import sys

import torch

from ..errors import LowbitError
from ..kernels.cpu import threads
from .engine import load_decoder


class HFDecoder:
    """Drives the model's own forward with HF's DynamicCache; one sequence (batch 1)."""

    def __init__(self, model, max_context: int | None = None):
        self.model = model
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.config = config
        self.vocab_size = model.get_output_embeddings().weight.shape[0] \
            if getattr(model.get_output_embeddings(), "weight", None) is not None else config.vocab_size
        limit = getattr(config, "max_position_embeddings", None) or 2048
        self.max_context = min(max_context or limit, limit)
        self.device = next(model.parameters(), torch.empty(0)).device
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.ids: list[int] = []  # the tokens whose keys and values are cached
        from transformers import DynamicCache  # here: `lowbit eval` on the native engine imports no transformers

        self.cache = DynamicCache(config=model.config)

    @property
    def position(self) -> int:
        return len(self.ids)

    def forward(self, ids) -> torch.Tensor:
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if not ids:
            raise LowbitError("forward needs at least one token")
        if self.position + len(ids) > self.max_context:
            raise LowbitError(f"the sequence would hold {self.position + len(ids)} tokens, more than the "
                              f"context of {self.max_context}: shorten the prompt or max tokens")
        x = torch.tensor([ids], device=self.device)
        extra = {"logits_to_keep": 1} if self._keep else {}
        with torch.inference_mode():
            out = self.model(input_ids=x, past_key_values=self.cache, use_cache=True, **extra)
        self.cache = out.past_key_values
        self.ids += ids
        return out.logits[0, -1].float()

    def truncate(self, n: int) -> None:
        n = max(0, min(n, self.position))
        if n == self.position:
            return
        if n > 0 and self.cache.is_croppable:
            self.cache.crop(n - self.position)  # a negative count: tokens to drop from the end
            self.ids = self.ids[:n]
            return
        keep, self.ids, self.cache = self.ids[:n], [], type(self.cache)(config=self.model.config)
        if keep:  # a cache that cannot roll back (sliding windows): recompute the kept prefix
            self.forward(keep)


def use_threads(n: int | None) -> None:
    """Run torch and the generated kernels on `n` threads (None: leave the defaults)."""
    if n is None:
        return
    if n < 1:
        raise LowbitError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    threads.set_threads(n)


_noticed: set[str] = set()


# The engine's speed settings, llama.cpp's for its Q4_0/Q8_0 files: decode GEMVs on int8 activations
# (per 32-block) and an unquantized output head rounded to 8 bits (group 32) in memory only.
FAST = {"int8_activations": True, "head_bits": 8}


def decoder_for(model, max_context: int | None = None, threads: int | None = None, engine: bool = True,
                exact: bool = False, slots: int | None = 1, kv_cache: str = "fp16"):
    """The native engine's Decoder for `model` when it supports it, else the universal HFDecoder.
    The engine runs with `FAST` settings unless `exact` (fp32 activations, the head as stored) and
    holds `slots` sequences for batched steps (None: what memory allows) in a `kv_cache` (fp16, bf16,
    fp32, int8) cache; HFDecoder holds one sequence in the model's own cache."""
    use_threads(threads)
    if engine:
        try:
            return load_decoder(model, max_context=max_context, threads=threads, slots=slots, kv_dtype=kv_cache,
                                **({} if exact else FAST))
        except (AttributeError, LowbitError) as e:
            why = str(e) if isinstance(e, LowbitError) else "not available"
            if why not in _noticed:
                _noticed.add(why)
                print(f"lowbit: native engine: {why}; using the universal decoder", file=sys.stderr)
    return HFDecoder(model, max_context)
