"""Import a GGUF file's Q4_0, Q8_0 and K-quant (Q2_K ... Q6_K) tensors as the QTensors they are,
without a float round trip.

transformers builds the model from the GGUF (its own loader dequantizes every tensor to float); then
each linear layer or embedding whose GGUF tensor is one of those types is replaced by a quantized
module holding the file's own blocks, Llama's q/k rows put back in transformers' order: Q4_0/Q8_0 as
the UniformQ they are (ggml_blocks.from_blocks: the same scales and codes), K-quants as KQuant (the
super-blocks byte for byte, formats/kquant.py; our kernels read them in place, c/kquant.h). The float
weights transformers made are dropped with the modules they belonged to. Each import is checked
against the float weight transformers made of the same tensor: they must be equal bit for bit (both
are the ggml dequantization in fp32), else the names or layouts disagree and the file is refused.
Other types (Q4_1, Q5_x, floats) stay as transformers loaded them: Q4_1's float minimum is not a
UniformQ (ggml_blocks.py).

A model built on meta (`skeleton`: config.json-free, from the GGUF's own metadata) gets everything
from the file instead: the imported layers as above (nothing to compare them with), every other
tensor dequantized one at a time (gguf.quants) and put in transformers' layout (Llama's q/k rows,
Gemma's norm shift: gguf_arch.py), so a 7B model loads in the memory of its quantized weights, never
as a float model.

The result is recorded as a lowbit quantization_config, so every verb sees a quantized model, and
`save` writes it as a lowbit directory: its modules (every imported layer's format, KQuant's "gguf
Q4_K" among them), the source file, and a plan for the Q4_0/Q8_0 layers (RTN at the block type's
bits, group 32, symmetric, which is how llama-quantize makes them without an importance matrix). The
K-quant layers have no plan entry: no lowbit method makes llama-quantize's fit, the file is their origin.
"""

from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ..errors import LowbitError
from ..formats import KQuant
from ..formats.kquant import TYPES as KQUANT_TYPES
from .ggml_blocks import from_blocks
from .gguf_arch import ARCHES, NORM_SHIFT, gguf_name, row_order
from .load import install_quantized
from .save import quantization_config

UNIFORM = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0)
IMPORTED = UNIFORM + tuple(gguf.GGMLQuantizationType[name] for name in KQUANT_TYPES)


def _rows_in_hf_order(config, hf_name: str, data: np.ndarray) -> np.ndarray:
    order = row_order(config, hf_name, data.shape[0])
    if order is None:
        return data
    out = np.empty_like(data)
    out[order.numpy()] = data
    return out


def kquant_from_blocks(data: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, int]) -> KQuant:
    """A GGUF K-quant tensor's rows (uint8 [N, K/256 · block bytes]) as the KQuant they are (a copy:
    `data` may be a read-only map of the file)."""
    n, k = shape
    t = KQUANT_TYPES[qtype.name]
    if k % 256 or data.dtype != np.uint8 or data.shape != (n, k // 256 * t.nbytes):
        raise LowbitError(f"{qtype.name} data of shape {list(data.shape)} does not hold a {n}×{k} weight")
    return KQuant(torch.from_numpy(np.array(data)), qtype.name, (n, k))


def import_gguf(path: Path, model: nn.Module) -> dict | None:
    """Replace `model`'s (loaded from `path` by transformers) Q4_0/Q8_0 and K-quant layers by
    quantized modules holding the file's blocks; the quantization_config that records them, or None
    when there is none (or the architecture is not one lowbit maps)."""
    config = model.config
    if config.model_type not in ARCHES:
        return None
    names = gguf.get_tensor_name_map(ARCHES[config.model_type], config.num_hidden_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    modules, state, shared, specs = {}, {}, {}, {}
    by_weight = {}  # a tied head holds its embedding's weight: it shares the embedding's QTensor
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        owner = by_weight.get(id(module.weight))
        if owner is None and module is head and gguf_name(names, f"{name}.weight") not in tensors:
            owner = by_weight.get(id(embed.weight))  # no output.weight: llama.cpp ties it (a meta skeleton may not)
        if owner is not None:
            modules[name], shared[name], specs[name] = modules[owner], owner, specs[owner]
            continue
        t = tensors.get(gguf_name(names, f"{name}.weight"))
        if t is None or t.tensor_type not in IMPORTED:
            continue
        data = _rows_in_hf_order(config, f"{name}.weight", np.asarray(t.data))
        shape = tuple(module.weight.shape)
        qt = from_blocks(data, t.tensor_type, shape) if t.tensor_type in UNIFORM else \
            kquant_from_blocks(data, t.tensor_type, shape)
        if not module.weight.is_meta and not torch.equal(qt.dequantize(), module.weight.detach().float()):
            raise LowbitError(f"{path}: tensor {t.name} does not decode to the weight transformers read for "
                              f"{name}: a GGUF lowbit cannot map")
        modules[name], specs[name] = qt.meta(), qt.bits if t.tensor_type in UNIFORM else None
        state.update({f"{name}.{k}": v for k, v in qt.tensors().items()})
        if getattr(module, "bias", None) is not None:
            state[f"{name}.bias"] = module.bias.detach()
        by_weight[id(module.weight)] = name
    if not modules:
        return None
    install_quantized(model, modules, state, config.dtype or torch.float32, path, shared)
    _fill_floats(path, model, names, tensors)
    plan = [{"spec": {"method": "rtn", "bits": bits, "group_size": 32, "sym": True},
             "layers": [n for n in modules if specs[n] == bits]} for bits in sorted(set(specs.values()) - {None})]
    return quantization_config(model, {"plan": plan, "source": str(path), "imported": "gguf"})


def _fill_floats(path: Path, model: nn.Module, names: gguf.TensorNameMap, tensors: dict) -> None:
    """Every parameter of `model` still on meta, from its GGUF tensor dequantized (transformers' layout).
    A float head the file does not hold is the input embedding's weight, as llama.cpp reads such a
    file (a tied model's GGUF has no output.weight)."""
    config = model.config
    head = model.get_output_embeddings()
    for hf_name, p in list(model.named_parameters(remove_duplicate=False)):
        if not p.is_meta:
            continue
        t = tensors.get(gguf_name(names, hf_name))
        if t is None and head is not None and p is head.weight:
            continue
        if t is None:
            raise LowbitError(f"{path} lacks tensor {gguf_name(names, hf_name)} ({hf_name})")
        value = torch.from_numpy(np.array(_rows_in_hf_order(  # a copy: an F32 tensor is the file's read-only map
            config, hf_name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, p.shape[-1])), order="C")).float()
        if value.numel() != p.numel():
            raise LowbitError(f"{path}: tensor {t.name} holds {value.numel()} values, {hf_name} has {p.numel()}")
        if NORM_SHIFT.get(config.model_type) and hf_name.endswith("norm.weight"):
            value = value - NORM_SHIFT[config.model_type]
        parent, attr = hf_name.rsplit(".", 1) if "." in hf_name else ("", hf_name)
        setattr(model.get_submodule(parent), attr, nn.Parameter(value.reshape(p.shape).to(p.dtype), requires_grad=False))
    if head is not None and isinstance(head, nn.Linear) and head.weight.is_meta:
        head.weight = model.get_input_embeddings().weight


def skeleton(path: Path) -> nn.Module:
    """The transformers model a GGUF file describes (its metadata read as transformers reads it), on meta."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
