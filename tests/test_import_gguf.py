"""GGUF import without dequantizing: Q4_0/Q8_0 tensors become UniformQ holding the file's own blocks,
equal bit for bit to gguf's own dequantization; the model runs them and saves as a lowbit directory;
other block types stay float; damaged blocks get a one-line error (fuzzed)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGML
from gguf import GGUFReader, quants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats import check
from lowbit.io.ggml_blocks import BLOCK_BYTES, from_blocks
from lowbit.io.gguf_arch import row_order
from lowbit.nn import QuantLinear

EDGE = lowbit.RTN(bits=8, group_size=32)


def _gguf(tiny_model_dir, tmp_path, model_type="llama", **spec):
    q = lowbit.quantize(lowbit.load(tiny_model_dir(model_type)), lowbit.RTN(group_size=32, **spec),
                        lm_head=EDGE, embeddings=EDGE, progress=False)
    return q, q.export(tmp_path / f"{model_type}.gguf")


@pytest.mark.parametrize("model_type,bits", [("llama", 4), ("qwen2", 8)])
def test_import_is_the_files_blocks(tiny_model_dir, tmp_path, model_type, bits):
    exported, path = _gguf(tiny_model_dir, tmp_path, model_type, bits=bits, sym=True)
    q = lowbit.load(path)
    assert q.info["imported"] == "gguf" and q.source == str(path)
    assert q.plan.summary() == ("rtn W4-g32-sym ×14, rtn W8-g32-sym ×2" if bits == 4 else "rtn W8-g32-sym")
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    for hf, name in (("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
                     ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight"),
                     ("model.embed_tokens", "token_embd.weight")):
        t = tensors[name]
        theirs = torch.from_numpy(quants.dequantize(t.data, t.tensor_type))
        order = row_order(q.model.config, hf + ".weight", theirs.shape[0])
        if order is not None:
            theirs = torch.empty_like(theirs).index_copy_(0, order, theirs)
        assert torch.equal(q.model.get_submodule(hf).qtensor.dequantize(), theirs)
    # the same blocks we exported, so the same logits (exact path: reference-equal kernels)
    x = torch.tensor([q.tokenizer("for i in range(10):").input_ids])
    with torch.inference_mode():
        assert torch.allclose(q.model(x).logits, exported.model(x).logits, atol=1e-4, rtol=0)
    saved = lowbit.load(q.save(tmp_path / "saved"))
    assert saved.plan.summary() == q.plan.summary() and saved.source == str(path)


def test_q4_1_layers_stay_float(tiny_model_dir, tmp_path):
    """Q4_1's float minimum is not an integer zero point: those layers are not UniformQ."""
    _, path = _gguf(tiny_model_dir, tmp_path, bits=4, sym=False)
    q = lowbit.load(path)
    assert type(q.model.get_submodule("model.layers.0.mlp.up_proj")) is torch.nn.Linear
    assert isinstance(q.model.lm_head, QuantLinear)  # the Q8_0 embedding, and the tied head with it
    assert q.plan.summary() == "rtn W8-g32-sym"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qtype=st.sampled_from([GGML.Q4_0, GGML.Q8_0]), rows=st.integers(1, 4), blocks=st.integers(1, 3),
       raw=st.binary(min_size=0, max_size=4 * 3 * 34 + 3), cols_off=st.integers(-1, 1))
def test_fuzz_blocks(qtype, rows, blocks, raw, cols_off):
    """Any bytes: a UniformQ equal to gguf's dequantization (a NaN/Inf scale refused by the format's
    check, as the importer checks it) or a one-line LowbitError, never a crash."""
    size = rows * blocks * BLOCK_BYTES[qtype]
    data = np.frombuffer(raw.ljust(size, b"\x01")[:size + (cols_off > 0)], dtype=np.uint8)
    shape = (rows, blocks * 32 + (cols_off if cols_off < 0 else 0))
    try:
        qt = from_blocks(data.reshape(rows, -1) if data.size % rows == 0 else data[None], qtype, shape)
        check(qt.meta(), qt.tensors())
    except LowbitError as e:
        assert "\n" not in str(e)
        return
    theirs = quants.dequantize(data.reshape(rows, -1), qtype)
    assert np.array_equal(qt.dequantize().numpy(), theirs)


@pytest.mark.parametrize("edges", [EDGE, None])
def test_a_tied_head_the_file_does_not_hold_is_the_embedding(tiny_model_dir, tmp_path, edges):
    """A tied model's GGUF has no output.weight (llama.cpp ties it to token_embd): the imported model's
    head is its embedding, quantized (shared QTensor) or float, and gives the exported model's logits."""
    src = tiny_model_dir("llama", tie_word_embeddings=True)
    extra = dict(lm_head=edges, embeddings=edges) if edges else {}
    exported = lowbit.quantize(lowbit.load(src), lowbit.RTN(bits=4, group_size=32, sym=True), progress=False, **extra)
    path = exported.export(tmp_path / "tied.gguf")
    assert "output.weight" not in {t.name for t in GGUFReader(str(path)).tensors}
    q = lowbit.load(path)
    head, embed = q.model.get_output_embeddings(), q.model.get_input_embeddings()
    if edges:
        assert isinstance(head, QuantLinear) and torch.equal(head.qtensor.dequantize(), embed.qtensor.dequantize())
    else:
        assert head.weight is embed.weight and not head.weight.is_meta
    x = torch.tensor([q.tokenizer("for i in range(10):").input_ids])
    with torch.inference_mode():
        assert torch.allclose(q.model(x).logits, exported.model(x).logits, atol=1e-4, rtol=0)
