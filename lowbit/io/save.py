"""Save a quantized model as a `save_pretrained`-style directory.

Layout: model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json past
`max_shard_size`), config.json whose `quantization_config` lists every quantized module's format,
tokenizer files and generation_config.json. config.json is written last and the directory appears
under its name only when complete (see atomic.py).
"""

import json
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from ..errors import LowbitError
from .atomic import atomic_dir

FORMAT_VERSION = 1


def quantized_modules(model: torch.nn.Module) -> dict[str, dict]:
    """name -> QTensor meta for every quantized module (anything holding a `qtensor`)."""
    return {name: dict(m.meta) for name, m in model.named_modules() if hasattr(m, "qtensor")}


def quantization_config(model: torch.nn.Module) -> dict:
    info = getattr(model, "lowbit_info", {})
    return {"quant_method": "lowbit", "format_version": FORMAT_VERSION, **info,
            "modules": quantized_modules(model)}


def _tensors_to_store(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (the loader re-ties them from config.json)."""
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        state[name] = t.detach().contiguous()
    return state


def write_model_dir(model: torch.nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False,
                    max_shard_size: int | str = "2GB", quantization: dict | None = None,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Weights, config.json (with `quantization` as its quantization_config, if given), tokenizer and
    generation config of a transformers model, written atomically."""
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise LowbitError("save needs a transformers model (with a config); "
                          "for a plain nn.Module use its state_dict()")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization_config"] = quantization
    state = _tensors_to_store(model)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    with atomic_dir(out_dir, overwrite) as tmp:
        for filename, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return Path(out_dir)


def save(model: torch.nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False,
         max_shard_size: int | str = "2GB", extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` (quantized by lowbit.quantize) to `out_dir` atomically."""
    quantization = quantization_config(model)
    if not quantization["modules"]:
        raise LowbitError("model has no quantized modules: run lowbit.quantize first")
    return write_model_dir(model, out_dir, tokenizer, overwrite, max_shard_size, quantization, extra_files)
