"""Cheap structural checks of weight files before anything parses them: a truncated or foreign file
gets a one-line error naming it, instead of a deep traceback from a loader."""

import json
import struct
from pathlib import Path

from safetensors import safe_open

from ..errors import LowbitError

GGUF_MAGIC = b"GGUF"


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
    if entries is None or not all(isinstance(v, dict) and "data_offsets" in v for v in entries):
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
