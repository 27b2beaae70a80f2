"""Lazy source models: memory bounded by one decoder block, whatever the model size.

The model is built on the meta device; the tensors outside the decoder blocks (embeddings, final
norm, head) are read up front, and each block's float weights are read from the safetensors shards
only when the block runner gets to it (`LazyBlocks.load`). Quantizing a block replaces its linears,
so their float weights go with them; what stays is the block's QTensors and its small float tensors
(norms, biases). A reference that is only run (`StreamedSource`) puts each block back on meta after use.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .blocks import capture_inputs, decoder_layers, finish_forward, run_block
from ..errors import LowbitError
from ..io import BlockCheckpoint, Shards


def check_finite(module: nn.Module) -> None:
    """NaN/Inf in a weight is a damaged source: fail with its name (a lazy model's weights still on
    meta were checked in the files by `load_lazy`)."""
    for name, p in module.named_parameters():
        if p.is_floating_point() and not p.is_meta and not torch.isfinite(p).all():
            raise LowbitError(f"weights of {name} contain NaN or Inf: the source model is damaged")


def _state_names(module: nn.Module) -> list[list[str]]:
    """The module's state-dict names, tied ones grouped (one group per distinct tensor)."""
    groups: dict[int, list[str]] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


class LazyBlocks:
    """The loader's bookkeeping for one lazy model: which blocks hold float weights read from disk."""

    def __init__(self, model: nn.Module, shards: Shards, dtype: torch.dtype):
        self.model, self.shards, self.dtype = model, shards, dtype
        self.layers = decoder_layers(model)
        self.prefix = next(n for n, m in model.named_modules() if m is self.layers) + "."
        self.loaded: set[int] = set()  # blocks whose float weights are in memory now
        self.finished: set[int] = set()  # blocks quantized (their float linears are gone)
        self.on_finish = None  # called with (i, block) for each finished block (io.BlockCheckpoint.keep)

    def block_of(self, name: str) -> int | None:
        """Index of the decoder block a module or tensor name belongs to (None: outside the blocks)."""
        if not name.startswith(self.prefix):
            return None
        return int(name[len(self.prefix):].split(".", 1)[0])

    def block_bytes(self, i: int) -> int:
        """Bytes block i's tensors take in memory once loaded (in the load dtype)."""
        return sum(t.numel() * (self.dtype.itemsize if t.is_floating_point() else t.element_size())
                   for t in self.layers[i].state_dict().values())

    def load(self, i: int) -> None:
        """Read block i's float weights from the shards into the (meta) block."""
        block, prefix = self.layers[i], f"{self.prefix}{i}."
        names = [n for n, t in block.state_dict(keep_vars=True).items() if t.is_meta]
        tensors = self.shards.read([prefix + n for n in names], self.dtype)
        block.load_state_dict({n: tensors[prefix + n] for n in names}, strict=False, assign=True)
        self.loaded.add(i)

    def finish(self, i: int) -> None:
        """Block i is quantized: its float linear weights left with the replaced modules."""
        self.loaded.discard(i)
        self.finished.add(i)
        if self.on_finish is not None:
            self.on_finish(i, self.layers[i])

    def need(self, name: str) -> None:
        """Walking the model's modules in order: load the block holding module `name` if it is not
        yet, finishing the blocks loaded before it."""
        i = self.block_of(name)
        if i is None or i in self.loaded or i in self.finished:
            return
        for j in list(self.loaded):
            self.finish(j)
        self.load(i)

    def unload(self, i: int) -> None:
        """Put block i back on the meta device (a reference block that has been run)."""
        block = self.layers[i]
        block.load_state_dict({n: torch.empty_like(t, device="meta") for n, t in block.state_dict().items()},
                              assign=True)
        self.loaded.discard(i)

    def close(self, checkpoint: BlockCheckpoint | None = None) -> None:
        """Every tensor is real now, or in a block waiting in the `checkpoint`'s files: the model no
        longer needs its loader."""
        for i in list(self.loaded):
            self.finish(i)
        stored = tuple(checkpoint.stored_in(self.model)) if checkpoint is not None else ()
        empty = [n for n, t in self.model.state_dict().items() if t.is_meta and not n.startswith(stored)]
        if empty:
            raise RuntimeError(f"lazy model still has tensors on meta: {', '.join(empty[:3])}")


def load_lazy(path: Path, dtype: torch.dtype) -> LazyBlocks | None:
    """The loader of a model whose decoder blocks stay on meta until `.load(i)` (the model is its
    `.model`), or None when the checkpoint's tensor names do not match the model's (then only
    transformers' own loader, which renames, can read it)."""
    from accelerate import init_empty_weights  # with boto3, ~0.3 s: for loaders that build with transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    shards = Shards(path)
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied tensors share one name group below, read once
    try:
        lazy = LazyBlocks(model, shards, dtype)
    except LowbitError:  # no decoder blocks to stream
        return None
    groups = _state_names(model)
    if not all(any(n in shards for n in names) for names in groups):
        return None
    bad = shards.first_non_finite()  # one streamed pass: a damaged source fails before any work
    if bad is not None:
        raise LowbitError(f"weights of {bad} contain NaN or Inf: the source model is damaged")
    outside = [next(n for n in names if n in shards) for names in groups if lazy.block_of(names[0]) is None]
    tensors = shards.read(outside, dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    return lazy


class StreamedSource:
    """A lazy source model as the reference of an evaluation, in memory bounded by one block:
    `prefetch(windows)` runs all windows through the decoder one block at a time (each block read,
    run, put back on meta); calling it on one of those windows then finishes the forward pass (final
    norm, head) from the stored last hidden state."""

    def __init__(self, lazy: LazyBlocks):
        self.model, self.lazy = lazy.model, lazy
        self.finals: dict[bytes, torch.Tensor] = {}

    @torch.no_grad()
    def prefetch(self, windows: list[torch.Tensor]) -> None:
        by_length: dict[int, list[torch.Tensor]] = {}
        for w in windows:
            by_length.setdefault(len(w), []).append(w)
        batches = {length: [w.unsqueeze(0) for w in ws] for length, ws in by_length.items()}
        states = {length: capture_inputs(self.model, b) for length, b in batches.items()}
        for i, block in enumerate(self.lazy.layers):
            self.lazy.load(i)
            for length, (inputs, kwargs) in states.items():
                states[length] = (run_block(block, inputs, kwargs[i]), kwargs)
            self.lazy.unload(i)
        for length, ws in by_length.items():
            self.finals.update({w.numpy().tobytes(): h for w, h in zip(ws, states[length][0])})

    def __call__(self, ids: torch.Tensor, **kwargs):
        final = self.finals.get(ids[0].numpy().tobytes())
        if final is None:
            raise RuntimeError("StreamedSource called on a window it did not prefetch")
        return finish_forward(self.model, ids, final)
