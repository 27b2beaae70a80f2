"""What every foreign quantized checkpoint directory shares (compressed-tensors, GPTQ, AWQ): a
transformers `save_pretrained` layout whose config.json carries the format's quantization_config and
whose safetensors hold each quantized Linear layer as the format's own tensors.

Writing: the quantized Linear layers inside the model in the format's tensors (the caller packs them),
everything else as float, including a quantized output head or embedding as its exact dequantized
weights (these formats' consumers run quantized Linear layers inside the decoder blocks); atomically.
Reading: the model is built on meta from config.json (dimensions checked against the headers first),
each quantized layer installed as the QTensor the caller decoded from the file (io.load's checks), the
rest loaded as is; a lowbit quantization_config records what was imported (a plan: RTN at the
format's bits, group and grid; the source; the format), so every verb sees a quantized model.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import LowbitError
from ..nn import QuantEmbedding, QuantLinear
from .act_order import unpermute
from .atomic import atomic_dir
from .check import checked_shards
from .load import assign_state, install_quantized, read_config, skeleton
from .save import quantization_config, write_companions


def check_weight_only(model: torch.nn.Module) -> None:
    """Exports hold weight-only layers: a layer that also quantizes its inputs (ActQuantLinear) is refused."""
    acts = [n for n, m in model.named_modules() if hasattr(m, "act_meta")]
    if acts:
        raise LowbitError(f"layer {acts[0]} quantizes its activations too: exports write weight-only layers "
                          "(quantize with a W<bits>A16 scheme to export)")


def packed_layers(model: torch.nn.Module) -> dict[str, QuantLinear]:
    """The quantized Linear layers a foreign format holds as such: all but the output head."""
    check_weight_only(model)
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear) and m is not head}


def float_state(model: torch.nn.Module, packed: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`packed` (layer -> the format's tensors, by their names) and every other tensor of the model in
    float (a quantized head or embedding dequantized exactly), each one a separate copy."""
    dtype = model.config.dtype if isinstance(model.config.dtype, torch.dtype) else torch.float32
    state = {f"{layer}.{k}": v for layer, tensors in packed.items() for k, v in tensors.items()}
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)) and name not in packed:
            state[f"{name}.weight"] = unpermute(module.qtensor.dequantize(dtype), getattr(module, "in_perm", None))
        if isinstance(module, QuantLinear) and module.bias is not None:
            state[f"{name}.bias"] = module.bias
    for name, p in model.named_parameters():
        state.setdefault(name, p)
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def float_linears(model: torch.nn.Module) -> list[str]:
    """The Linear layers a foreign directory holds in float: the plain ones and the output head."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or (m is head and m is not None)]


def write_dir(model: torch.nn.Module, out: str | Path, state: dict[str, torch.Tensor], quantization: dict,
              tokenizer=None, overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """config.json (with `quantization` as its quantization_config), model.safetensors (`state`),
    tokenizer, generation config and `extra_files`, written atomically."""
    config = model.config.to_dict()
    config["quantization_config"] = quantization
    with atomic_dir(out, overwrite) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        write_companions(tmp, model, config, tokenizer, extra_files)
    return Path(out)


def quant_method(path: str | Path) -> str | None:
    """The quantization_config's quant_method of a model directory (None: none, or not a directory)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return None
    qc = read_config(path).get("quantization_config")
    return qc.get("quant_method") if isinstance(qc, dict) else None


def read_dir(path: Path):
    """(config.json without its quantization_config, that quantization_config, the model built on
    meta from it, every tensor of the checked safetensors files)."""
    raw = read_config(path)
    qc = raw.pop("quantization_config")
    files, _ = checked_shards(path, raw)
    return qc, skeleton(raw, path), {k: v for f in files for k, v in load_file(f).items()}


def finish(path: Path, model: torch.nn.Module, qts: dict, state: dict[str, torch.Tensor], imported: str,
           perms: dict[str, torch.Tensor] | None = None):
    """Install the decoded QTensors (name -> QTensor; `perms`: name -> the input permutation of an
    act-order layer, act_order.py), load the rest of `state`, tie; (model, tokenizer, the lowbit
    quantization_config that records the import)."""
    from transformers import AutoTokenizer

    if not qts:
        raise LowbitError(f"{path}: no Linear layer of the model is quantized in the file")
    for name, qt in qts.items():
        if list(qt.shape) != list(model.get_submodule(name).weight.shape):
            raise LowbitError(f"{path}: module {name} is {list(qt.shape)} in the weights, "
                              f"{list(model.get_submodule(name).weight.shape)} by config.json")
        state.update({f"{name}.{k}": v for k, v in qt.tensors().items()})
    state.update({f"{name}.in_perm": perm for name, perm in (perms or {}).items()})
    dtype = model.config.dtype if isinstance(model.config.dtype, torch.dtype) else torch.float32
    install_quantized(model, {n: qt.meta() for n, qt in qts.items()}, state, dtype, path)
    assign_state(model, state, path)
    specs = {}
    for name, qt in qts.items():
        specs.setdefault((qt.bits, qt.group_size, qt.sym), []).append(name)
    plan = [{"spec": {"method": "rtn", "bits": b, "group_size": g, "sym": s}, "layers": names}
            for (b, g, s), names in specs.items()]
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer, quantization_config(model, {"plan": plan, "source": str(path.absolute()),
                                                                "imported": imported + " act-order" * bool(perms)})
