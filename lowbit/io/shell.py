"""A Llama decoder's module tree without transformers: what the native engine reads of a model.

Importing transformers' modeling code and building its LlamaForCausalLM on meta costs ~2 s of a warm
`lowbit eval` (modeling_utils pulls in torch.distributed.tensor, torch._dynamo, and scipy through its
losses; the config class pulls in its validators), while the native engine (runtime/engine.py) runs
none of that code. It reads the module tree: the projections (QuantLinear once io/load.py installs
them), each RMSNorm's weight and eps (probing that it computes w·x̂), the MLP's activation (probed),
the attention's head_dim and scaling, and the RoPE tables, which it asks of the model's rotary module
for positions 0 .. ctx − 1. `build` makes that tree on meta with transformers' Llama names and shapes
(a lowbit directory's tensors load into it as into the real model), for the configurations where
every one of those reads is computed here exactly as transformers computes it (`fits`):

    model_type llama, hidden_act silu, untied head (or a float head tied to a float embedding)
    RMSNorm           y = w · x / sqrt(mean(x²) + eps), in float32
    default RoPE      inv_freq_i = 1 / θ^(2i/d) (float32), angle = position · inv_freq,
                      cos/sin of [angle, angle] (rotate-half layout)
    attention         head_dim = config's (else hidden / heads), scaling = head_dim^−½

Any other configuration is built by transformers (io/load.skeleton). Whatever else is asked of a
shell (its forward: the universal path, where the engine cannot run the model) goes to the
transformers model of the same directory, loaded on first use: a shell is never wrong, only slow
where the engine is not used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def fits(config: dict, quantized: set[str], tensors: set[str]) -> bool:
    """Whether `build` makes this config.json's model as transformers would (the module docstring's
    list); `quantized`: the names of the quantized modules, `tensors`: the names in the weights."""
    rope = config.get("rope_parameters")
    tied = config.get("tie_word_embeddings", False)
    return (config.get("model_type") == "llama" and config.get("hidden_act", "silu") == "silu"
            and all(config.get(k) is not None for k in REQUIRED)
            and config["hidden_size"] % config["num_attention_heads"] == 0
            and isinstance(rope, dict) and set(rope) == {"rope_type", "rope_theta"} and rope["rope_type"] == "default"
            and _number(rope["rope_theta"]) and _number(config.get("rms_norm_eps", 1e-6))
            and config.get("rope_scaling") is None and config.get("layer_types") is None
            and all(isinstance(config.get(k, False), bool) for k in ("attention_bias", "mlp_bias"))
            and _dtype_name(config) in DTYPES and _pad_fits(config.get("pad_token_id"), config["vocab_size"])
            and (tied is False or (tied is True and not {"lm_head", "model.embed_tokens"} & quantized
                                   and "lm_head.weight" not in tensors)))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _pad_fits(pad, vocab) -> bool:
    return pad is None or (isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < vocab)


def _dtype_name(config: dict) -> str | None:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return name if isinstance(name, str) else None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.empty(size)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos, sin [batch, positions, head_dim] of the default RoPE (transformers' arithmetic, step for step)."""

    def __init__(self, theta: float, head_dim: int, max_positions: int):
        super().__init__()
        self.rope_type, self.original_max_seq_len = "default", max_positions
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


class Attention(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.head_dim = c.head_dim
        self.scaling = self.head_dim**-0.5
        q, kv, bias = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.attention_bias
        self.q_proj, self.k_proj = nn.Linear(c.hidden_size, q, bias=bias), nn.Linear(c.hidden_size, kv, bias=bias)
        self.v_proj, self.o_proj = nn.Linear(c.hidden_size, kv, bias=bias), nn.Linear(q, c.hidden_size, bias=bias)


class MLP(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act_fn = nn.SiLU()


class DecoderLayer(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Decoder(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        # given its (empty) weight, not initialized: normal_ on meta would import torch._dynamo (~1.5 s)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id,
                                         _weight=torch.empty(c.vocab_size, c.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        with torch.device("cpu"):  # the tables are computed, not loaded: real even while the rest is on meta
            self.rotary_emb = RotaryEmbedding(c.rope_parameters["rope_theta"], c.head_dim, c.max_position_embeddings)


class ShellForCausalLM(nn.Module):
    """transformers' LlamaForCausalLM as the engine reads it; `full()` gives the transformers model of
    the same directory (loaded once), which runs everything else (`forward`)."""

    def __init__(self, config: SimpleNamespace, full: Callable[[], nn.Module]):
        super().__init__()
        self.config, self.full = config, functools.cache(full)  # a function: not a submodule of the shell
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:  # float head and embedding (fits): one tensor, as transformers ties
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, *args, **kwargs):
        return self.full()(*args, **kwargs)


def build(config: dict, full: Callable[[], nn.Module]) -> ShellForCausalLM:
    """The shell of a config.json that `fits`, on meta; `full` loads the transformers model of it."""
    c = SimpleNamespace(**config)
    c.head_dim = config.get("head_dim") or c.hidden_size // c.num_attention_heads
    c.num_key_value_heads = config.get("num_key_value_heads") or c.num_attention_heads
    defaults = dict(rms_norm_eps=1e-6, max_position_embeddings=2048, pad_token_id=None, attention_bias=False,
                    mlp_bias=False, tie_word_embeddings=False)
    for name, value in defaults.items():
        setattr(c, name, config.get(name, value))
    c.dtype = DTYPES[_dtype_name(config)]
    with torch.device("meta"):
        return ShellForCausalLM(c, full)
