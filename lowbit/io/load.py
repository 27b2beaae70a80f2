"""Load a directory written by save.py into a transformers model with QuantLinear modules."""

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file

from ..errors import LowbitError
from ..formats import KINDS, from_tensors
from ..nn import QuantEmbedding, QuantLinear
from .check import check_safetensors
from .save import FORMAT_VERSION


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise LowbitError(f"{path} is not a model directory (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LowbitError(f"{path / 'config.json'} is not valid JSON") from None


def is_lowbit_dir(path: str | Path) -> bool:
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    qc = read_config(path).get("quantization_config") or {}
    return qc.get("quant_method") == "lowbit"


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, after checking every file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise LowbitError(f"{path} is incomplete: {name} is missing")
        check_safetensors(f)
        state.update(load_file(f))
    return state


def install_quantized(model: torch.nn.Module, modules: dict[str, dict], state: dict[str, torch.Tensor],
                      dtype: torch.dtype, where) -> None:
    """Replace each listed module of `model` by its quantized form, taking (popping) its tensors
    from `state`."""
    for name, meta in modules.items():
        if meta.get("kind") not in KINDS:
            raise LowbitError(f"{where}: module {name} has unknown format {meta.get('kind')!r}")
        prefix = name + "."
        try:
            qt = from_tensors(meta, {k[len(prefix):]: state.pop(k) for k in list(state)
                                     if k.startswith(prefix) and "." not in k[len(prefix):]
                                     and k[len(prefix):] != "bias"})
        except KeyError as e:
            raise LowbitError(f"{where} is incomplete: {name} lacks tensor {e}") from None
        old = model.get_submodule(name)
        if isinstance(old, torch.nn.Embedding):
            new = QuantEmbedding(qt, old.padding_idx, dtype)
        else:
            new = QuantLinear(qt, state.pop(prefix + "bias", None))
        model.set_submodule(name, new)


def load(path: str | Path):
    """(model, tokenizer, quantization_config) from a lowbit directory; the model is in eval mode and
    generates."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path)
    raw = read_config(path)
    qc = raw.pop("quantization_config", None) or {}
    if qc.get("quant_method") != "lowbit":
        raise LowbitError(f"{path} is not a lowbit-quantized model (quantization_config missing)")
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise LowbitError(f"{path} was written by a newer lowbit (format {qc['format_version']})")
    state = read_safetensors(path)
    try:
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    except (KeyError, ValueError) as e:
        raise LowbitError(f"{path}: unknown architecture ({e})") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    install_quantized(model, qc["modules"], state, config.dtype or torch.float32, path)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise LowbitError(f"{path} holds tensors the model does not have: {', '.join(unexpected[:3])}")
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise LowbitError(f"{path} is incomplete: no weights for {', '.join(still_empty[:3])}")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model, tokenizer, qc
