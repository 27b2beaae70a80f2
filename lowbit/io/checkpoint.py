"""Resumable block-by-block quantization: after each finished block, its quantized tensors and the
next block's inputs are stored in a progress directory beside the output (`.OUT.progress`), so a
killed run continues from the last finished block and produces the same bytes.

Each write goes to a temporary name first and `state.json` (which block is done) is replaced last,
so the directory is consistent after a crash at any point.

A kept block leaves memory (`keep`): its modules stay, with their tensors on meta, and the checkpoint
records which block waits in which file (`stored_in`); io/save.py, given that map, writes the final
model from those files, one block at a time, and `reload` brings the blocks back for a run of the
model (the accuracy check).
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .load import install_quantized


def _replace_file(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class BlockCheckpoint:
    def __init__(self, path: str | Path, key: dict):
        self.path = Path(path)
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        self._stored: dict[int, tuple[torch.nn.Module, Path]] = {}  # id(block) -> (block, its file stem)

    @classmethod
    def beside(cls, out: str | Path, key: dict) -> "BlockCheckpoint":
        out = Path(out).absolute()
        return cls(out.parent / f".{out.name}.progress", key)

    def _state(self) -> dict | None:
        try:
            state = json.loads((self.path / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return state if state.get("key") == self.key else None

    def restore(self, layers: torch.nn.ModuleList) -> tuple[int, list[torch.Tensor], list[torch.Tensor] | None] | None:
        """(number of finished blocks, inputs of the next block, its float-stream inputs or None), with
        the finished blocks installed in `layers` as stored (on meta, nothing read but their headers);
        None when there is nothing (matching) to resume."""
        state = self._state()
        if state is None:
            return None
        for i in range(state["done"]):
            self._store(layers[i], self.path / f"block_{i}")
        stored = load_file(self.path / "inputs.safetensors")
        count = sum(1 for k in stored if not k.startswith("fp"))
        fp = [stored[f"fp{j}"] for j in range(count)] if "fp0" in stored else None
        return state["done"], [stored[str(j)] for j in range(count)], fp

    def keep(self, i: int, block: torch.nn.Module) -> None:
        """Write finished block i to its files, then drop it from memory."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self._state() is None:  # a foreign or stale state must not vouch for these block files
            (self.path / "state.json").unlink(missing_ok=True)
        tensors = {k: v.contiguous() for k, v in block.state_dict().items()}
        modules = {n: dict(m.meta) for n, m in block.named_modules() if hasattr(m, "qtensor")}
        _replace_file(self.path / f"block_{i}.safetensors", lambda p: save_file(tensors, p))
        _replace_file(self.path / f"block_{i}.json", lambda p: p.write_text(json.dumps(modules)))
        del tensors
        self._store(block, self.path / f"block_{i}")

    def _store(self, block: torch.nn.Module, stem: Path) -> None:
        _install(block, stem, stored=True)
        self._stored[id(block)] = (block, stem)

    def stored_in(self, model: torch.nn.Module) -> dict[str, Path]:
        """name prefix -> file of every block of `model` whose tensors wait on disk (for io.save)."""
        return {name + ".": self._stored[id(m)][1].with_suffix(".safetensors")
                for name, m in model.named_modules() if id(m) in self._stored}

    def reload(self) -> None:
        """Read every stored block back into memory (to run the model)."""
        for block, stem in self._stored.values():
            _install(block, stem, stored=False)
        self._stored.clear()

    def save(self, i: int, block: torch.nn.Module, inputs: list[torch.Tensor],
             fp_inputs: list[torch.Tensor] | None = None) -> None:
        """Block i is finished and `inputs` (and the float stream's `fp_inputs`, see
        calib.runner.quantize_blocks) are block i+1's inputs: keep the block, then the inputs and the
        state that makes it resumable."""
        self.keep(i, block)
        tensors = {str(j): x.contiguous() for j, x in enumerate(inputs)}
        tensors.update({f"fp{j}": x.contiguous() for j, x in enumerate(fp_inputs or [])})
        _replace_file(self.path / "inputs.safetensors", lambda p: save_file(tensors, p))
        _replace_file(self.path / "state.json",
                      lambda p: p.write_text(json.dumps({"key": self.key, "done": i + 1})))

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _install(block: torch.nn.Module, stem: Path, stored: bool) -> None:
    """Make `block` the one saved as `stem`.safetensors/.json: its tensors read (stored=False), or
    only their shapes, on meta (stored=True). Fresh modules replace the quantized ones, so nothing
    (a kernel's prepared copy) holds the old tensors."""
    file = stem.with_suffix(".safetensors")
    if stored:
        with safe_open(file, "pt") as f:
            tensors = {k: torch.empty(f.get_slice(k).get_shape(), dtype=_DTYPES[f.get_slice(k).get_dtype()],
                                      device="meta") for k in f.keys()}
    else:
        tensors = load_file(file)
    install_quantized(block, json.loads(stem.with_suffix(".json").read_text()), tensors, torch.float32, file)
    block.load_state_dict(tensors, strict=False, assign=True)  # assign: in place of meta, or onto it
