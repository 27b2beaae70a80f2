"""Read a (sharded) safetensors checkpoint a few tensors at a time, so that a model larger than memory
can be processed one decoder block after another. Each read opens the shard and closes it again:
nothing of the file stays mapped between reads."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import LowbitError


class Shards:
    """Where each tensor of the checkpoint in `path` lives. The files were checked by the caller
    (io.check_safetensors): this only reads their headers."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise LowbitError(f"{index} is not a valid safetensors index") from None
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            files = [p.name for p in sorted(path.glob("*.safetensors"))]
        self.where: dict[str, Path] = {}
        for name in files:
            f = path / name
            if not f.is_file():
                raise LowbitError(f"{path} is incomplete: {name} is missing")
            with safe_open(f, "pt") as h:
                self.where.update(dict.fromkeys(h.keys(), f))

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def first_non_finite(self) -> str | None:
        """Name of the first floating-point tensor holding NaN or Inf, reading one tensor at a time."""
        for f in sorted(set(self.where.values())):
            with safe_open(f, "pt") as h:
                for n in h.keys():
                    t = h.get_tensor(n)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        return n
        return None

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The named tensors, floating-point ones converted to `dtype`."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for f, group in by_file.items():
            try:
                with safe_open(f, "pt") as h:
                    for n in group:
                        t = h.get_tensor(n)
                        out[n] = t.to(dtype) if t.is_floating_point() else t
            except Exception as e:  # SafetensorError, OSError: the file changed after it was checked
                raise LowbitError(f"cannot read {f}: {str(e).strip().splitlines()[0][:120]}") from None
        return out
