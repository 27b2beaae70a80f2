"""Import a GGUF file's Q4_0 and Q8_0 tensors as the UniformQ they are, without a float round trip.

transformers builds the model from the GGUF (its own loader dequantizes every tensor to float); then
each linear layer or embedding whose GGUF tensor is Q4_0 or Q8_0 is replaced by a quantized module
holding the file's own blocks (ggml_blocks.from_blocks: the same scales and codes, Llama's q/k rows put
back in transformers' order), so our kernels run the file's weights. Each import is checked against
the float weight transformers made of the same tensor: they must be equal bit for bit (both are
d·(q − 8) or d·q in fp32), else the names or layouts disagree and the file is refused. Other types
(Q4_1, K-quants, floats) stay as transformers loaded them: Q4_1's float minimum is not a UniformQ
(ggml_blocks.py), and K-quants are a later step.

The result is recorded as a lowbit quantization_config (plan: RTN at the block type's bits, group 32,
symmetric, which is how llama-quantize makes Q4_0/Q8_0 without an importance matrix; source: the
file), so every verb sees a quantized model, and `save` writes it as a lowbit directory.
"""

from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ..errors import LowbitError
from .ggml_blocks import from_blocks
from .gguf_arch import ARCHES, gguf_name, row_order
from .load import install_quantized
from .save import quantization_config

IMPORTED = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0)


def _rows_in_hf_order(config, hf_name: str, data: np.ndarray) -> np.ndarray:
    order = row_order(config, hf_name, data.shape[0])
    if order is None:
        return data
    out = np.empty_like(data)
    out[order.numpy()] = data
    return out


def import_gguf(path: Path, model: nn.Module) -> dict | None:
    """Replace `model`'s (loaded from `path` by transformers) Q4_0/Q8_0 layers by quantized modules
    holding the file's blocks; the quantization_config that records them, or None when there is none
    (or the architecture is not one lowbit maps)."""
    config = model.config
    if config.model_type not in ARCHES:
        return None
    names = gguf.get_tensor_name_map(ARCHES[config.model_type], config.num_hidden_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    modules, state, shared, specs = {}, {}, {}, {}
    by_weight = {}  # a tied head holds its embedding's weight: it shares the embedding's QTensor
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        owner = by_weight.get(id(module.weight))
        if owner is not None:
            modules[name], shared[name], specs[name] = modules[owner], owner, specs[owner]
            continue
        t = tensors.get(gguf_name(names, f"{name}.weight"))
        if t is None or t.tensor_type not in IMPORTED:
            continue
        data = _rows_in_hf_order(config, f"{name}.weight", np.asarray(t.data))
        qt = from_blocks(data, t.tensor_type, tuple(module.weight.shape))
        if not torch.equal(qt.dequantize(), module.weight.detach().float()):
            raise LowbitError(f"{path}: tensor {t.name} does not decode to the weight transformers read for "
                              f"{name}: a GGUF lowbit cannot map")
        modules[name], specs[name] = qt.meta(), qt.bits
        state.update({f"{name}.{k}": v for k, v in qt.tensors().items()})
        if getattr(module, "bias", None) is not None:
            state[f"{name}.bias"] = module.bias.detach()
        by_weight[id(module.weight)] = name
    if not modules:
        return None
    install_quantized(model, modules, state, config.dtype or torch.float32, path, shared)
    plan = [{"spec": {"method": "rtn", "bits": bits, "group_size": 32, "sym": True},
             "layers": [n for n in modules if specs[n] == bits]} for bits in sorted(set(specs.values()))]
    return quantization_config(model, {"plan": plan, "source": str(path), "imported": "gguf"})
