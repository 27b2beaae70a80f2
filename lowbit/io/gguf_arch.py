"""How a transformers decoder's tensors are named and laid out in GGUF, for the families lowbit exports.

Names come from the `gguf` package's own table (`gguf.get_tensor_name_map`: "model.layers.3.mlp.down_proj"
-> "blk.3.ffn_down"). Two layouts differ from transformers', as llama.cpp's convert_hf_to_gguf.py makes them:
  - Llama and Mistral store q_proj and k_proj with each head's rows interleaved for llama.cpp's rotary
    embedding: rows (head, half, i) in transformers are (head, i, half) in GGUF. It is a permutation of
    rows, so a quantized weight (whose groups run along a row) is permuted exactly, codes and scales alike.
  - Gemma's RMSNorm multiplies by (1 + w), llama.cpp's by w: GGUF holds w + 1. And llama.cpp's Gemma
    has no output head of its own (it is token_embd): a head stored apart from the embedding is refused.
"""

import gguf
import torch

from ..errors import LowbitError

# transformers model_type -> GGUF architecture
ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
          "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma": gguf.MODEL_ARCH.GEMMA}
NORM_SHIFT = {"gemma": 1.0}
HEAD_IS_EMBEDDING = (gguf.MODEL_ARCH.GEMMA,)  # llama.cpp reads the output head from token_embd, always
_ROTARY_INTERLEAVED = ("llama", "mistral")


def arch_of(config) -> gguf.MODEL_ARCH:
    arch = ARCHES.get(config.model_type)
    if arch is None:
        raise LowbitError(f"GGUF export does not know architecture '{config.model_type}' "
                          f"(it exports {', '.join(sorted(ARCHES))})")
    return arch


def gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    """The GGUF name of a transformers tensor name ("...q_proj.weight" -> "blk.0.attn_q.weight")."""
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise LowbitError(f"GGUF has no name for tensor {hf_name}: this model is not a plain decoder of its family")
    return name


def row_order(config, hf_name: str, rows: int) -> torch.Tensor | None:
    """Where GGUF row r comes from (transformers' row index), for the tensors whose rows GGUF orders
    differently (Llama's q/k projections); None when the order is the same."""
    if config.model_type not in _ROTARY_INTERLEAVED:
        return None
    if ".q_proj." in hf_name:
        heads = config.num_attention_heads
    elif ".k_proj." in hf_name:
        heads = config.num_key_value_heads or config.num_attention_heads
    else:
        return None
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)
