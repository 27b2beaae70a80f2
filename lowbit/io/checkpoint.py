"""Resumable block-by-block quantization: after each finished block, its quantized tensors and the
next block's inputs are stored in a progress directory beside the output (`.OUT.progress`), so a
killed run continues from the last finished block and produces the same bytes.

Each write goes to a temporary name first and `state.json` (which block is done) is replaced last,
so the directory is consistent after a crash at any point.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
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

    def restore(self, layers: torch.nn.ModuleList) -> tuple[int, list[torch.Tensor]] | None:
        """(number of finished blocks, inputs of the next block), with the finished blocks installed
        in `layers`; None when there is nothing (matching) to resume."""
        state = self._state()
        if state is None:
            return None
        done = state["done"]
        for i in range(done):
            tensors = load_file(self.path / f"block_{i}.safetensors")
            modules = json.loads((self.path / f"block_{i}.json").read_text())
            install_quantized(layers[i], modules, tensors, torch.float32, self.path)
            layers[i].load_state_dict(tensors, strict=False, assign=True)  # assign: the block may be on meta
        inputs = load_file(self.path / "inputs.safetensors")
        return done, [inputs[str(j)] for j in range(len(inputs))]

    def save(self, i: int, block: torch.nn.Module, inputs: list[torch.Tensor]) -> None:
        """Block i is finished and `inputs` are block i+1's inputs."""
        self.path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in block.state_dict().items()}
        modules = {n: dict(m.meta) for n, m in block.named_modules() if hasattr(m, "qtensor")}
        _replace_file(self.path / f"block_{i}.safetensors", lambda p: save_file(tensors, p))
        _replace_file(self.path / f"block_{i}.json", lambda p: p.write_text(json.dumps(modules)))
        _replace_file(self.path / "inputs.safetensors",
                      lambda p: save_file({str(j): x.contiguous() for j, x in enumerate(inputs)}, p))
        _replace_file(self.path / "state.json",
                      lambda p: p.write_text(json.dumps({"key": self.key, "done": i + 1})))

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
