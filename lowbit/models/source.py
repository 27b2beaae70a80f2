"""Load a source model (HF directory, .gguf file, or the embedded default) as a torch module + tokenizer."""

import contextlib
import io as _stdio
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LowbitError
from ..io import (check_gguf, checked_shards, import_gguf,
                  is_compressed_tensors_dir, is_gptq_dir, is_lowbit_dir, load, load_compressed_tensors, load_gptq,
                  read_config, write_model_dir)
from ..io.gguf_read import skeleton
from .default import NAME as DEFAULT, converted_dir, default_gguf
from .lazy import LazyBlocks, StreamedSource, load_lazy


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    source: str  # "default" or an absolute path: how to find this source again (for KLD)
    quantization: dict | None = None  # a lowbit directory's quantization_config (None: a source)
    lazy: LazyBlocks | None = None  # the loader of a lazy source's blocks (models/lazy.py)


def _check_architecture(model_type: str | None, where) -> None:
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type is None:
        raise LowbitError(f"{where}: config has no model_type, cannot tell the architecture")
    if model_type not in CONFIG_MAPPING:
        raise LowbitError(f"{where}: unknown architecture '{model_type}'")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LowbitError(f"{where}: architecture '{model_type}' is not a causal language model")


@contextlib.contextmanager
def _quiet():
    """transformers prints GGUF conversion bars and notices to stdout/stderr; keep our output clean."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(_stdio.StringIO()):
            yield
    finally:
        logging.set_verbosity(level)


@contextlib.contextmanager
def _loading(where):
    """transformers' loading errors as one-line LowbitErrors naming the source."""
    try:
        with _quiet():
            yield
    except LowbitError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LowbitError(f"cannot load {where}: {first}") from None


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    with _loading(path):
        return AutoTokenizer.from_pretrained(path)


def _from_pretrained(path: Path, dtype: torch.dtype, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    with _loading(path / gguf_file if gguf_file else path):
        tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
    missing = info.get("missing_keys") or []
    if missing:  # transformers would fill them with random values and only warn
        where = path / gguf_file if gguf_file else path
        raise LowbitError(f"{where} lacks weights for {len(missing)} tensors "
                          f"(e.g. {sorted(missing)[0]}): not this model's checkpoint or incomplete")
    return model.eval(), tokenizer


def _load_default(dtype: torch.dtype):
    gguf = default_gguf()
    cached = converted_dir(gguf)
    if (cached / "config.json").is_file():
        return _from_pretrained(cached, dtype)
    check_gguf(gguf)
    model, tokenizer = _from_pretrained(gguf.parent, torch.float32, gguf.name)
    try:
        write_model_dir(model, cached, tokenizer, overwrite=True)
    except LowbitError as e:
        warnings.warn(f"could not cache the converted default model ({e}); the next load converts again")
    return model.to(dtype), tokenizer


def load_source(source: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                lazy: bool = False) -> Loaded:
    """Load an unquantized source: None/'default', a .gguf file, or an HF directory with safetensors.
    `lazy`: an HF directory's decoder blocks stay on the meta device until the block runner reads them
    (models/lazy.py; `Loaded.lazy` is their loader); the default and GGUF sources load eagerly."""
    if source is None or str(source) == DEFAULT:
        return Loaded(*_load_default(dtype), DEFAULT)
    path = Path(source).absolute()
    if not path.exists():
        raise LowbitError(f"source not found: {source}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise LowbitError(f"{source} is not a model: expected a .gguf file or a model directory")
        check_gguf(path)
        return Loaded(*_from_pretrained(path.parent, dtype, path.name), str(path))
    config = read_config(path)
    _check_architecture(config.get("model_type"), path)
    checked_shards(path, config)
    blocks = None
    if lazy:
        with _loading(path):
            blocks = load_lazy(path, dtype)
    if blocks is not None:
        return Loaded(blocks.model, _tokenizer(path), str(path), lazy=blocks)
    return Loaded(*_from_pretrained(path, dtype), str(path))


def load_reference(source: str):
    """A source as the reference of an evaluation (KLD): an HF directory streamed one block at a time
    (StreamedSource: memory bounded by one block, whatever the model size), the others loaded whole."""
    loaded = load_source(source, lazy=True)
    return StreamedSource(loaded.lazy) if loaded.lazy is not None else loaded.model


def load_any(spec: str | os.PathLike | None, dtype: torch.dtype = torch.float32, shell: bool = False) -> Loaded:
    """A lowbit directory, a compressed-tensors pack-quantized directory (io/compressed_tensors.py), a
    GPTQ or AWQ checkpoint (io/gptq.py), or
    any source accepted by `load_source` (a .gguf file's Q4_0 and Q8_0 layers imported as quantized
    layers: io/gguf_read.py). `shell`: a lowbit directory for the native engine only (io.load)."""
    if spec is not None and str(spec) != DEFAULT and is_lowbit_dir(spec):
        model, tokenizer, quantization = load(spec, shell=shell)
        return Loaded(model, tokenizer, str(Path(spec).absolute()), quantization)
    if spec is not None and str(spec) != DEFAULT and is_compressed_tensors_dir(spec):
        model, tokenizer, quantization = load_compressed_tensors(spec)
        return Loaded(model, tokenizer, quantization["source"], quantization)
    if spec is not None and str(spec) != DEFAULT and is_gptq_dir(spec):
        model, tokenizer, quantization = load_gptq(spec)
        return Loaded(model, tokenizer, quantization["source"], quantization)
    if spec is not None and str(spec) != DEFAULT and Path(spec).suffix == ".gguf" and Path(spec).is_file() \
            and dtype == torch.float32:
        loaded = _gguf_imported(Path(spec).absolute())
        if loaded is not None:
            return loaded
    loaded = load_source(spec, dtype)
    if loaded.source.endswith(".gguf"):  # its Q4_0/Q8_0 layers run as the file's own blocks
        loaded.quantization = import_gguf(Path(loaded.source), loaded.model)
    return loaded


def _gguf_imported(path: Path) -> Loaded | None:
    """A .gguf file whose layers lowbit imports (Q4_0/Q8_0, K-quants: io/gguf_read.py), built on the meta
    device from the file's own metadata and filled from the file alone: the imported layers hold its
    blocks and never exist as floats (transformers' load dequantizes every weight to fp32 first: a 7B
    Q4_K_M would take ~28 GB before the import gave ~24 of them back); only the rest (norms, layers of
    other types) is dequantized. None when nothing in it is imported (an F16 file, an architecture
    lowbit does not map): the caller loads it through transformers."""
    from transformers import AutoTokenizer

    check_gguf(path)
    with _loading(path):
        model = skeleton(path)
        quantization = import_gguf(path, model)
        if quantization is None:
            return None
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return Loaded(model, tokenizer, str(path), quantization)


def fingerprint(source: str) -> str:
    """What identifies a source's weights on disk (for caches of its outputs): the path with the size
    and modification time of its weight and config files; the embedded default is its GGUF file."""
    path = default_gguf() if str(source) == DEFAULT else Path(source)
    files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".json", ".gguf")) \
        if path.is_dir() else [path]
    return "|".join(f"{f.absolute()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
