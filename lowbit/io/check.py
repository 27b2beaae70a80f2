"""Cheap structural checks of weight files before anything parses them: a truncated or foreign file
gets a one-line error naming it, instead of a deep traceback from a loader. A config.json's dimensions
are checked against the weights' headers before a model is built from it: a damaged
`num_hidden_layers: 1000000` would otherwise allocate until memory runs out."""

import json
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import LowbitError

# config.json's integer dimensions: each a positive int below MAX_DIM wherever a config has it
DIMENSIONS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")
MAX_DIM = 1 << 24
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (checked) safetensors file as an empty tensor on meta: shapes and dtypes from
    its header, nothing read."""
    with safe_open(path, "pt") as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
        return {k: torch.empty(s.get_shape(), dtype=DTYPES.get(s.get_dtype(), torch.uint8), device="meta")
                for k, s in slices.items()}


def check_dimensions(config: dict, header: dict[str, torch.Tensor], where) -> None:
    """A LowbitError unless config.json's dimensions are positive integers in range and its layer
    count is the one the weights (`header`: name -> tensor, on meta is enough) hold."""
    for name in DIMENSIONS:
        value = config.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_DIM):
            raise LowbitError(f"{where}: config.json has {name} = {json.dumps(value)}, not a positive integer "
                              f"up to {MAX_DIM}: the file is damaged (restore or re-download it)")
    layers = {int(m.group(1)) for n in header if (m := _LAYER.search(n))}
    count = config.get("num_hidden_layers")
    if layers and count is not None and count != len(layers):
        raise LowbitError(f"{where}: config.json says num_hidden_layers = {count}, the weights hold "
                          f"{len(layers)} layers: the config does not belong to these weights")


GGUF_MAGIC = b"GGUF"


def _offsets(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and \
        all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then exactly the data it lists."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LowbitError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise LowbitError(f"{path} is not a safetensors file or is truncated (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise LowbitError(f"{path} is not a safetensors file (header is not JSON)") from None
    entries = [v for k, v in header.items() if k != "__metadata__"] if isinstance(header, dict) else None
    if entries is None or not all(isinstance(v, dict) and _offsets(v.get("data_offsets")) for v in entries):
        raise LowbitError(f"{path} is not a safetensors file (header does not list tensors)")
    end = max((v["data_offsets"][1] for v in entries), default=0)
    if 8 + n + end != size:
        raise LowbitError(f"{path} is truncated or damaged: header lists {8 + n + end} bytes, "
                          f"file has {size}")
    try:  # the library's own validation: dtypes, shapes against offsets
        with safe_open(path, "pt"):
            pass
    except Exception as e:  # SafetensorError and friends
        raise LowbitError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0][:120]})") from None


def checked_shards(path: Path, config: dict, files: list[Path] | None = None) -> tuple[list[Path], dict[str, torch.Tensor]]:
    """The safetensors files of model directory `path` (`files`, or every *.safetensors in it), each
    checked, and their tensors on meta (headers only), checked against config.json's dimensions."""
    files = sorted(path.glob("*.safetensors")) if files is None else files
    if not files:
        raise LowbitError(f"{path} has no .safetensors weights (pickled files are never loaded)")
    for f in files:
        if not f.is_file():
            raise LowbitError(f"{path} is incomplete: {f.name} is missing")
        check_safetensors(f)
    header = {k: t for f in files for k, t in header_tensors(f).items()}
    check_dimensions(config, header, path)
    return files, header


def check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise LowbitError(f"{path} is not a GGUF file (bad magic)")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        last = max(reader.tensors, key=lambda t: t.data_offset, default=None)
        if last is not None and last.data_offset + last.n_bytes > path.stat().st_size:
            raise ValueError("tensor data past end of file")
    except Exception as e:  # gguf raises assorted errors on damaged files
        raise LowbitError(f"{path} is truncated or not a valid GGUF file ({e})") from None
