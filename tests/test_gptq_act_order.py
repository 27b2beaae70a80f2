"""GPTQ act-order (`desc_act`: a g_idx that is not k // group) runs as an ordinary UniformQ over the
permuted columns plus the layer's input permutation (nn.QuantLinear.in_perm): the universal path and
the native engine gather the input, and give the same logits."""

import torch

from lowbit.runtime.engine import load_decoder
from test_engine import TINY, check_agreement, quantized


def _permute_inputs(model, seed: int = 3) -> None:
    """Random input permutations: layer 0's q/k/v and gate/up share one each (fused by the engine),
    layer 1's differ (run one by one); o and down have their own."""
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj), (attn.o_proj,), (mlp.down_proj,)):
            shared = torch.randperm(group[0].in_features, generator=g)
            for m in group:
                m.in_perm = (shared if i == 0 else torch.randperm(m.in_features, generator=g)).to(torch.int32)


def test_engine_gathers_permuted_inputs_like_the_universal_path():
    model = quantized("llama-bias")  # head_dim 48: o_proj's input is a 32-wide block and a tail
    plain = load_decoder(model, max_context=64)
    _permute_inputs(model)
    ids = torch.randint(0, TINY["vocab_size"], (14,), generator=torch.Generator().manual_seed(1))
    eng, want = check_agreement(model, ids, prompt=10)
    assert (plain.forward(ids) - want[-1]).abs().max() > 0.1  # the permutations change the model
