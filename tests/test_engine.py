"""The native decode engine against the HF model holding the same QuantLinear weights.

Tiny random models of every supported family (with the features that make each one different:
QKV bias, QK-norm, sandwich norms, soft-capping, sliding windows, fused projections, partial and
scaled RoPE), quantized in process; the engine's prefill and decode logits must equal HF's full
forward on the same tokens within float tolerance.
"""

import copy
import math

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.runtime.engine import load_decoder

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, max_position_embeddings=128, vocab_size=320)
WINDOW = 6  # shorter than the prompt, so sliding-window layers really drop positions
FAMILIES = {
    "llama": dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=32)),
    "llama-bias": dict(attention_bias=True, mlp_bias=True, head_dim=48),  # 48: a 32-wide block and a tail
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                       original_max_position_embeddings=32)),
    "gemma": dict(),
    "gemma2": dict(sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                   query_pre_attn_scalar=24),
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                        rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}),
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=WINDOW),
}
SCHEMES = {"w4g32": dict(bits=4, group_size=32), "w8": dict(bits=8, group_size=32),
           "w4-asym": dict(bits=4, group_size=32, sym=False)}


def tiny(family: str, **extra) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = family.split("-")[0]
    config = AutoConfig.for_model(model_type, **{**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                                 **FAMILIES[family], **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random norm weights and biases: the init (ones/zeros) would hide mistakes
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0, 0.15)
    return model


def quantized(family: str, scheme: str = "w4g32") -> torch.nn.Module:
    return lowbit.quantize(tiny(family), lowbit.RTN(**SCHEMES[scheme]), progress=False).model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-3) -> None:
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= rel * scale + 1e-5, f"max |engine - HF| = {err:.3g} at logit scale {scale:.3g}"


def check_agreement(model, ids: torch.Tensor, prompt: int, kv_dtype="fp32", rel: float = 1e-3) -> None:
    """Prefill `prompt` tokens, decode the rest one by one; every step against HF's full forward."""
    want = hf_logits(model, ids)
    eng = load_decoder(model, max_context=64, kv_dtype=kv_dtype)
    assert eng.vocab_size == want.shape[-1] and eng.position == 0
    assert_close(eng.forward(ids[:prompt]), want[prompt - 1], rel)
    for t in range(prompt, len(ids)):
        assert_close(eng.forward([int(ids[t])]), want[t], rel)
    assert eng.position == len(ids)
    return eng, want


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_matches_hf(family):
    model = quantized(family)
    ids = torch.randint(0, TINY["vocab_size"], (14,), generator=torch.Generator().manual_seed(1))
    eng, want = check_agreement(model, ids, prompt=10)
    eng.truncate(7)  # reuse the first 7 positions, recompute the rest
    assert_close(eng.forward(ids[7:12]), want[11])
    eng.truncate(0)
    assert_close(eng.forward(ids[:3]), want[2])


@pytest.mark.parametrize("scheme", ["w8", "w4-asym"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_engine_other_formats(family, scheme):
    ids = torch.randint(0, TINY["vocab_size"], (12,), generator=torch.Generator().manual_seed(2))
    check_agreement(quantized(family, scheme), ids, prompt=9)


@pytest.mark.parametrize("kv_dtype", ["fp16", "bf16", "int8"])
def test_engine_half_kv_cache(kv_dtype):
    """fp16/bf16 and int8 caches (a scale per token and KV head: 2^-8 of each row's largest value)."""
    ids = torch.randint(0, TINY["vocab_size"], (12,), generator=torch.Generator().manual_seed(3))
    check_agreement(quantized("qwen3"), ids, prompt=8, kv_dtype=kv_dtype, rel=2e-2)


def test_engine_unquantized_and_quantized_head():
    """fp linears inside the decoder (the engine keeps them in fp16: 2^-11 relative rounding of every
    weight, hence the looser bound) and a quantized lm_head."""
    ids = torch.randint(0, TINY["vocab_size"], (11,), generator=torch.Generator().manual_seed(4))
    check_agreement(tiny("llama"), ids, prompt=7, rel=5e-3)
    head = lowbit.quantize(tiny("gemma2"), lowbit.RTN(bits=4, group_size=32), lm_head=True, progress=False).model
    check_agreement(head, ids, prompt=7)


def test_engine_runs_codebook_layers_through_the_same_contract():
    """The engine never looks inside a format: codebook (LUT) layers with outliers run unchanged."""
    from lowbit.formats.codebook import CodebookQ
    from lowbit.nn import QuantLinear

    model = tiny("qwen2")
    g = torch.Generator().manual_seed(8)
    for name, mod in list(model.model.layers.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            n, k = mod.weight.shape
            outliers = torch.where(torch.rand(n, k, generator=g) < 0.02, torch.randn(n, k, generator=g), 0.0)
            qt = CodebookQ.from_indices(torch.randint(0, 16, (n, k), generator=g),
                                        0.15 * torch.randn(n, -(-k // 32), 16, generator=g), 4, 32, outliers)
            model.model.layers.set_submodule(name, QuantLinear(qt, mod.bias))
    ids = torch.randint(0, TINY["vocab_size"], (10,), generator=torch.Generator().manual_seed(9))
    check_agreement(model, ids, prompt=7)


def test_engine_head_bits_rounds_the_fp_head_like_lowbit_quantize():
    ids = torch.randint(0, TINY["vocab_size"], (10,), generator=torch.Generator().manual_seed(7))
    spec = lowbit.RTN(bits=8, group_size=32)
    everything = lowbit.quantize(tiny("llama"), spec, lm_head=True, progress=False).model
    eng = load_decoder(lowbit.quantize(tiny("llama"), spec, progress=False).model, kv_dtype="fp32", head_bits=8)
    assert_close(eng.forward(ids), hf_logits(everything, ids)[-1])
    # bytes streamed per token: the 8-bit head (1 byte + an fp16 scale per 32) instead of fp16 (2 bytes)
    fp16_head = load_decoder(lowbit.quantize(tiny("llama"), spec, progress=False).model, kv_dtype="fp32")
    head = TINY["vocab_size"] * TINY["hidden_size"]
    assert fp16_head.bytes_per_token - eng.bytes_per_token == pytest.approx(head * (2 - 1 - 2 / 32), rel=0.05)


def test_engine_runs_a_bf16_model_in_fp32():
    """A bf16 checkpoint: the engine computes in fp32 (closer to the fp32 model than HF's bf16 run)."""
    ids = torch.randint(0, TINY["vocab_size"], (9,), generator=torch.Generator().manual_seed(10))
    model = quantized("gemma2")
    want = hf_logits(model, ids)[-1]
    got = load_decoder(model.to(torch.bfloat16), kv_dtype="fp32").forward(ids)
    assert_close(got, want, rel=2e-2)


def test_engine_prefill_in_chunks_matches_one_pass(monkeypatch):
    """A prompt longer than the engine's chunk runs as several chunks with the same result."""
    import lowbit.runtime.engine as engine_mod

    model = quantized("phi3")
    ids = torch.randint(0, TINY["vocab_size"], (40,), generator=torch.Generator().manual_seed(5))
    whole = load_decoder(model, max_context=64, kv_dtype="fp32").forward(ids)
    monkeypatch.setattr(engine_mod, "MAX_CHUNK", 7)
    assert_close(load_decoder(model, max_context=64, kv_dtype="fp32").forward(ids), whole, 1e-5)
    assert_close(whole, hf_logits(model, ids)[-1])


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16", "int8"])
def test_engine_blocked_prefill_equals_token_by_token(kv_dtype):
    """Prefill attention runs query blocks against 16-key panels: a prompt over several panels and
    blocks, a window that starts inside a panel, GQA groups of 3 and a head size of 20 (a 32-wide
    P·V tile does not fit, 8-wide ones and a scalar tail do) give the logits of one token at a time."""
    model = lowbit.quantize(tiny("mistral", num_attention_heads=6, num_key_value_heads=2, head_dim=20,
                                 sliding_window=19), lowbit.RTN(bits=8, group_size=32), progress=False).model
    ids = torch.randint(0, TINY["vocab_size"], (45,), generator=torch.Generator().manual_seed(12))
    eng = load_decoder(model, max_context=64, kv_dtype=kv_dtype)
    steps = [eng.forward([t]) for t in ids.tolist()][-1]
    eng.truncate(0)
    whole = eng.forward(ids)
    same = {"fp32": 1e-5, "fp16": 1e-3, "int8": 1e-3}[kv_dtype]  # one rounding flip in a later layer's K
    assert_close(whole, steps, same)
    assert_close(whole, hf_logits(model, ids)[-1], 1e-3 if kv_dtype == "fp32" else 2e-2)
    eng.truncate(30)  # a block continuing a cache: queries at 30..44 see the panels of 0..29
    assert_close(eng.forward(ids[30:]), whole, same)


def test_engine_portable_c(monkeypatch):
    """Without AVX2 flags (the scalar kernel library, vector extensions lowered to portable code)."""
    monkeypatch.setenv("LOWBIT_ISA", "scalar")
    ids = torch.randint(0, TINY["vocab_size"], (10,), generator=torch.Generator().manual_seed(11))
    check_agreement(quantized("gemma3_text"), ids, prompt=7, kv_dtype="fp16", rel=2e-2)


def test_engine_threads_agree():
    model = quantized("llama")
    ids = torch.randint(0, TINY["vocab_size"], (20,), generator=torch.Generator().manual_seed(6))
    from lowbit.kernels.cpu import threads

    before = threads.get()
    try:
        outs = [load_decoder(model, max_context=32, threads=t, kv_dtype="fp32").forward(ids) for t in (1, 2)]
    finally:
        threads.set_threads(before)
    assert_close(outs[1], outs[0], 1e-5)


def test_engine_refuses_what_it_cannot_run():
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=64, n_layer=1, n_head=4,
                                                                 vocab_size=320))
    with pytest.raises(LowbitError, match="universal path"):
        load_decoder(gpt2)
    eng = load_decoder(quantized("llama"), max_context=8)
    with pytest.raises(LowbitError, match="context"):
        eng.forward(list(range(9)))
    with pytest.raises(LowbitError, match="token ids"):
        eng.forward([TINY["vocab_size"]])
    with pytest.raises(LowbitError, match="truncate"):
        eng.truncate(1)
    with pytest.raises(LowbitError, match="kv_dtype"):
        load_decoder(quantized("llama"), kv_dtype="int4")


@pytest.mark.slow
def test_engine_matches_hf_on_smollm2():
    from lowbit.models import load_source

    loaded = load_source()
    model = lowbit.quantize(copy.deepcopy(loaded.model), lowbit.RTN(bits=4, group_size=32), progress=False).model
    ids = loaded.tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids[0]
    check_agreement(model, ids, prompt=len(ids) - 3)
    want = hf_logits(model, ids)[-1]
    eng = load_decoder(model, max_context=64)  # default fp16 KV cache: the same next token
    assert eng.forward(ids).argmax() == want.argmax()


def test_fused_projections_stack_rows_and_refuse_mixed_layouts():
    """q/k/v (gate/up) become one matrix only when they share a UniformQ layout; its rows are theirs."""
    from lowbit.formats import UniformQ
    from lowbit.runtime.engine import _fused
    from lowbit.nn import QuantLinear

    g = torch.Generator().manual_seed(7)

    def lin(n, bits, bias=True):
        return QuantLinear(UniformQ.from_float(torch.randn(n, 96, generator=g), bits, 32, True),
                           torch.randn(n, generator=g) if bias else None)
    parts = [lin(40, 4), lin(8, 4, bias=False), lin(8, 4)]
    fused = _fused(parts)
    x = torch.randn(3, 96, generator=g)
    assert torch.allclose(fused(x), torch.cat([p(x) for p in parts], -1), atol=1e-5)
    assert _fused([lin(40, 4), lin(8, 8)]) is None  # different bits: kept apart
    assert _fused([lin(40, 4), torch.nn.Linear(96, 8)]) is None


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
@pytest.mark.parametrize("head", ["float", "quantized"])
def test_eval_scores_on_the_engine_equal_transformers(family, head):
    """eval's scorer on the engine (every position's hidden state, the model's own head) gives the
    log-probabilities of the model's own forward, so perplexity and KLD mean the same on either path."""
    from lowbit.eval import metrics

    model = lowbit.quantize(tiny(family), lowbit.RTN(bits=4, group_size=32), lm_head=head == "quantized",
                            embeddings=head == "quantized", progress=False).model
    assert load_decoder(model, max_context=40) is not None  # the engine path really runs
    ids = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(1))
    fast, slow = metrics.scorer(model, 40)(ids), metrics.scorer(model, 40, engine=False)(ids)
    assert fast.shape == slow.shape == (39, 320)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=2e-4)
    target = ids[1:, None]
    ppl = [math.exp(-lp.gather(1, target).mean().item()) for lp in (fast, slow)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)
