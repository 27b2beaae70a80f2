"""GGUF K-quants imported without dequantizing (issue 19): llama-quantize's Q4_K_M of a tiny Llama whose
widths are whole 256-weight super-blocks loads as KQuant layers holding the file's blocks, equal bit
for bit to gguf's own dequantization; the kernels (c/kquant.h) match the reference on every type,
ISA, odd row counts and 1/2/7 tokens; the decode engine runs them natively; damaged blocks get a
one-line error (fuzzed)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGML
from gguf import GGUFReader, quants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit import kernels
from lowbit.errors import LowbitError
from lowbit.formats import KQuant, check
from lowbit.formats.kquant import TYPES
from lowbit.io.gguf_arch import row_order
from lowbit.io.gguf_read import kquant_from_blocks
from lowbit.io.kquants import quantize
from lowbit.kernels.cpu import build, isa as isa_mod, threads
from lowbit.kernels.cpu import kquant as cpu_kquant
from lowbit.nn import QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from vs_llamacpp import tool  # noqa: E402

WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
ISAS = [i for i in ("avx512vnni", "avx2", "scalar") if isa_mod.detect().supports(i)]


@pytest.mark.skipif(build.compiler() is None, reason="no C compiler")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", list(TYPES))
def test_kernel_matches_reference(qtype, isa):
    """fp32 activations: dequantize then x·Wᵀ; int8 (x86): the same with x rounded as the int8 path rounds
    it (q8_K: per 256). 37 rows (a partial 16-row tile), 3 super-blocks, 1 and 2 threads."""
    gen = torch.Generator().manual_seed(1)
    n, k = 37, 768
    w = torch.randn(n, k, generator=gen) * 0.05
    qt = KQuant(torch.from_numpy(quantize(w, GGML[qtype])[0]), qtype, (n, k))
    packed = cpu_kquant.prepare(qt, isa)
    assert (packed.qfn is None) == (isa == "scalar")
    assert (packed.tiles is not None) == (isa == "avx512vnni" and TYPES[qtype].bits >= 4)  # the tiled kernels
    ref_w, bias = qt.dequantize(), torch.randn(n, generator=gen)
    before = threads.get()
    try:
        for nthr, m in ((1, 1), (2, 1), (2, 2), (1, 7), (2, 7)):
            threads.set_threads(nthr)
            x = torch.randn(m, k, generator=gen)
            for int8, xr in ((False, x), (True, cpu_kquant.quantize_activations(x)))[:1 + (packed.qfn is not None)]:
                fn, args = packed._call(m, bias.contiguous(), int8)
                y = torch.empty(m, n)
                args.x, args.y = x.contiguous().data_ptr(), y.data_ptr()
                fn(args)
                ref = xr @ ref_w.T + bias
                assert (y - ref).abs().max() <= 1e-5 * ref.abs().max(), (qtype, isa, nthr, m, int8)
    finally:
        threads.set_threads(before)


def _q4_k_m(tiny_model_dir, tmp_path) -> Path:
    """llama-quantize's Q4_K_M of a tiny 256-wide Llama (from an all-Q8_0 export: --allow-requantize)."""
    q = lowbit.quantize(lowbit.load(tiny_model_dir("llama", **WIDE)), lowbit.RTN(bits=8, group_size=32),
                        lm_head=lowbit.RTN(bits=8, group_size=32), embeddings=lowbit.RTN(bits=8, group_size=32),
                        progress=False)
    src, out = q.export(tmp_path / "q8.gguf"), tmp_path / "q4km.gguf"
    r = subprocess.run([tool("llama-quantize"), "--allow-requantize", src, out, "Q4_K_M"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.skipif(tool("llama-quantize") is None, reason="llama.cpp's tools are not built "
                    "(bash benchmarks/peers/build_llamacpp.sh)")
def test_llama_quantize_q4_k_m_imports_as_its_blocks(tiny_model_dir, tmp_path, monkeypatch):
    from lowbit.models import source

    path = _q4_k_m(tiny_model_dir, tmp_path)
    with monkeypatch.context() as patch:  # built on meta from the file alone: transformers' fp32 load never runs
        patch.setattr(source, "_from_pretrained", lambda *a, **k: pytest.fail("a float copy of the GGUF was loaded"))
        q = lowbit.load(path)
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    imported = {}
    for i, hf in enumerate(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")):
        for layer in range(2):
            name = f"model.layers.{layer}.{hf}"
            module = q.model.get_submodule(name)
            assert isinstance(module, QuantLinear)
            t = tensors[f"blk.{layer}.{['attn_q', 'attn_k', 'attn_v', 'attn_output', 'ffn_gate', 'ffn_up', 'ffn_down'][i]}.weight"]
            imported[t.tensor_type.name] = imported.get(t.tensor_type.name, 0) + 1
            theirs = torch.from_numpy(quants.dequantize(t.data, t.tensor_type))
            order = row_order(q.model.config, name + ".weight", theirs.shape[0])
            if order is not None:
                theirs = torch.empty_like(theirs).index_copy_(0, order, theirs)
            assert module.qtensor.meta()["type"] == t.tensor_type.name
            assert torch.equal(module.qtensor.dequantize(), theirs)
            if kernels.kernel_for(module.qtensor) != "reference":
                assert kernels.kernel_for(module.qtensor).startswith(f"kquant-b{module.qtensor.bits}-")
    assert {"Q4_K", "Q6_K"} <= set(imported), imported  # Q4_K_M: Q6_K for half of v/down, Q4_K elsewhere
    assert not any(isinstance(m, torch.nn.Linear) and m.weight.numel() > 256 * 256 for m in q.model.modules()
                   if m is not q.model.lm_head)  # no float copy of an imported layer
    # the native engine runs the blocks (int8 activations) as the HF model with the reference kernel does
    from lowbit.runtime.engine import load_decoder

    ids = q.tokenizer("for i in range(10):").input_ids
    with torch.inference_mode():
        kernels.use_reference(True)
        try:
            ref = q.model(torch.tensor([ids])).logits[0, -2:]
        finally:
            kernels.use_reference(False)
    engine = load_decoder(q.model, max_context=64)
    ours = torch.stack([engine.forward(ids[:-1]), engine.forward(ids[-1:])])  # a prompt, then one decode step
    assert torch.nn.functional.cosine_similarity(ours, ref, dim=1).min() > 0.999
    saved = lowbit.load(q.save(tmp_path / "saved"))
    assert saved.model.get_submodule("model.layers.0.mlp.down_proj").meta == \
        q.model.get_submodule("model.layers.0.mlp.down_proj").meta


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qtype=st.sampled_from(list(TYPES)), rows=st.integers(1, 3), blocks=st.integers(1, 2),
       raw=st.binary(min_size=0, max_size=3 * 2 * 210 + 3), cols_off=st.integers(-1, 1))
def test_fuzz_blocks(qtype, rows, blocks, raw, cols_off):
    """Any bytes: a KQuant equal to gguf's dequantization (a NaN/Inf super-block scale refused by the
    format's check, as the importer checks it) or a one-line LowbitError, never a crash."""
    size = rows * blocks * TYPES[qtype].nbytes
    data = np.frombuffer(raw.ljust(size, b"\x01")[:size + (cols_off > 0)], dtype=np.uint8)
    shape = (rows, blocks * 256 + (cols_off if cols_off < 0 else 0))
    try:
        qt = kquant_from_blocks(data.reshape(rows, -1) if data.size % rows == 0 else data[None], GGML[qtype], shape)
        check(qt.meta(), qt.tensors())
    except LowbitError as e:
        assert "\n" not in str(e)
        return
    theirs = quants.dequantize(data.reshape(rows, -1), GGML[qtype])
    assert np.array_equal(qt.dequantize().numpy(), theirs)


@pytest.mark.skipif(build.compiler() is None, reason="no C compiler")
def test_engine_fuses_kquant_projections(tiny_model_dir, monkeypatch):
    """q/k/v and gate/up of one K-quant type run as one layer (x rounded to q8_K once); the logits are
    those of the layers one by one, bit for bit. Mixed types (a Q6_K v_proj, as Q4_K_M has) stay apart."""
    from lowbit.runtime import engine as eng

    q = lowbit.load(tiny_model_dir("llama", **WIDE))
    layers = q.model.model.layers
    for i, layer in enumerate(layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            parent, attr = name.split(".")
            w = layer.get_submodule(name).weight.detach().float()
            qtype = "Q6_K" if (i, attr) == (0, "v_proj") else "Q4_K"
            qt = KQuant(torch.from_numpy(quantize(w, GGML[qtype])[0]), qtype, tuple(w.shape))
            setattr(getattr(layer, parent), attr, QuantLinear(qt, torch.randn(w.shape[0]) if attr == "k_proj" else None))
    attn0, attn1 = layers[0].self_attn, layers[1].self_attn
    assert eng._fused([attn0.q_proj, attn0.k_proj, attn0.v_proj]) is None
    qkv = eng._fused([attn1.q_proj, attn1.k_proj, attn1.v_proj])
    gate_up = eng._fused([layers[0].mlp.gate_proj, layers[0].mlp.up_proj])
    assert qkv.qtensor.shape == (256 + 2 * 128, 256) and gate_up.qtensor.shape == (1024, 256)
    assert torch.equal(qkv.qtensor.dequantize(), torch.cat([m.qtensor.dequantize() for m in
                                                            (attn1.q_proj, attn1.k_proj, attn1.v_proj)]))
    ids = q.tokenizer("for i in range(10):").input_ids

    def logits():
        engine = eng.load_decoder(q.model, max_context=64)
        return torch.stack([engine.forward(ids[:-1]), engine.forward(ids[-1:])])  # a prompt, then one step

    fused = logits()
    monkeypatch.setattr(eng, "_fused", lambda modules: None)
    assert torch.equal(fused, logits())
