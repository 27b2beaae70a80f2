"""Resumable block-by-block quantization: after each finished block, its quantized tensors and the
next block's inputs are stored in a progress directory beside the output (`.OUT.progress`), so a
killed run continues from the last finished block and produces the same bytes.

Each write goes to a temporary name first and `state.json` (which block is done) is replaced last,
so the directory is consistent after a crash at any point. The state names the full configuration
(a hash of method, plan, source and calibration settings): a run with another configuration never
reuses its blocks. Before anything is resumed, every file the state vouches for is checked; a state
of another configuration, or one whose files are gone or damaged, is discarded with a message saying
why, and the run starts over. (One run at a time writes here: see lock.py.)

A write that fails for lack of space says so, and that the finished blocks stay for a resume.

A kept block leaves memory (`keep`): its modules stay, with their tensors on meta, and the checkpoint
records which block waits in which file (`stored_in`); io/save.py, given that map, writes the final
model from those files, one block at a time, and `reload` brings the blocks back for a run of the
model (the accuracy check).
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from ..atomic_file import write_error
from ..errors import LowbitError
from .check import check_safetensors, header_tensors
from .load import install_quantized
from .save import activation_specs


def _say(message: str) -> None:
    print(f"lowbit: {message}", file=sys.stderr, flush=True)


class BlockCheckpoint:
    def __init__(self, path: str | Path, key: dict):
        self.path = Path(path)
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        self._stored: dict[int, tuple[torch.nn.Module, Path]] = {}  # id(block) -> (block, its file stem)
        self._vetted = False  # the directory's state was checked (and a foreign one discarded) in this run

    @classmethod
    def beside(cls, out: str | Path, key: dict) -> "BlockCheckpoint":
        out = Path(out).absolute()
        return cls(out.parent / f".{out.name}.progress", key)

    def _problem(self, state) -> str | None:
        """Why `state` (state.json's content) cannot be resumed; None when it can."""
        if not isinstance(state, dict) or not isinstance(state.get("done"), int) or state["done"] < 1:
            return "its state.json is damaged"
        if state.get("key") != self.key:
            return "it was made with another configuration (method, bits, plan, source or calibration)"
        files = [f"block_{i}{ext}" for i in range(state["done"]) for ext in (".safetensors", ".json")]
        for name in files + ["inputs.safetensors"]:
            try:
                if name.endswith(".json"):
                    json.loads((self.path / name).read_text())
                else:
                    check_safetensors(self.path / name)
            except (OSError, ValueError, LowbitError):
                return f"{name} is missing or damaged"
        return None

    def _state(self) -> dict | None:
        """The resumable state of this configuration, or None; the first call of a run discards (with a
        message) a directory whose state cannot be resumed."""
        try:
            state = json.loads((self.path / "state.json").read_text())
        except FileNotFoundError:
            state = None
        except (OSError, ValueError):
            state = "damaged"
        if state is None or self._vetted:
            self._vetted = True
            return state if isinstance(state, dict) else None
        self._vetted = True
        problem = self._problem(state)
        if problem is None:
            return state
        _say(f"discarding the progress in {self.path}: {problem}; starting over")
        self.clear()
        return None

    def restore(self, layers: torch.nn.ModuleList) -> tuple[int, list[torch.Tensor], list[torch.Tensor] | None] | None:
        """(number of finished blocks, inputs of the next block, its float-stream inputs or None), with
        the finished blocks installed in `layers` as stored (on meta, nothing read but their headers);
        None when there is nothing (matching) to resume."""
        state = self._state()
        if state is None:
            return None
        _say(f"resuming from {self.path}: {state['done']} of {len(layers)} blocks are done")
        for i in range(state["done"]):
            self._store(layers[i], self.path / f"block_{i}")
        stored = load_file(self.path / "inputs.safetensors")
        count = sum(1 for k in stored if not k.startswith("fp"))
        fp = [stored[f"fp{j}"] for j in range(count)] if "fp0" in stored else None
        return state["done"], [stored[str(j)] for j in range(count)], fp

    def keep(self, i: int, block: torch.nn.Module) -> None:
        """Write finished block i to its files, then drop it from memory."""
        self._state()  # a foreign or stale state must not vouch for these block files
        tensors = {k: v.contiguous() for k, v in block.state_dict().items()}
        modules = {n: dict(m.meta) for n, m in block.named_modules() if hasattr(m, "qtensor")}
        acts = activation_specs(block)
        self._write(f"block_{i}.safetensors", serialize(tensors))
        del tensors
        if acts:  # the layers that quantize their inputs: their activation specs
            self._write(f"block_{i}.act.json", json.dumps(acts).encode())
        self._write(f"block_{i}.json", json.dumps(modules).encode())
        self._store(block, self.path / f"block_{i}")

    def _write(self, name: str, data: bytes) -> None:
        """One file of the directory, atomically; a full disk says that the finished blocks stay."""
        path, tmp = self.path / name, self.path / (name + ".tmp")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            done = self._state()
            kept = f"the {done['done']} finished blocks are kept in {self.path}: free space and run the same " \
                   f"command again to resume" if done else "nothing is kept to resume from"
            raise write_error(path, e, kept) from None

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
        self._write("inputs.safetensors", serialize(tensors))
        self._write("state.json", json.dumps({"key": self.key, "done": i + 1}).encode())

    def resumable(self) -> int:
        """How many finished blocks a run of this configuration would resume from (0: none)."""
        state = self._state()
        return state["done"] if state else 0

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _install(block: torch.nn.Module, stem: Path, stored: bool) -> None:
    """Make `block` the one saved as `stem`.safetensors/.json: its tensors read (stored=False), or
    only their shapes, on meta (stored=True). Fresh modules replace the quantized ones, so nothing
    (a kernel's prepared copy) holds the old tensors."""
    file = stem.with_suffix(".safetensors")
    if stored:
        tensors = header_tensors(file)
    else:
        tensors = load_file(file)
    acts = stem.with_suffix(".act.json")
    install_quantized(block, json.loads(stem.with_suffix(".json").read_text()), tensors, torch.float32, file,
                      activations=json.loads(acts.read_text()) if acts.is_file() else None)
    block.load_state_dict(tensors, strict=False, assign=True)  # assign: in place of meta, or onto it
