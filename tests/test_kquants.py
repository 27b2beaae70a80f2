"""K-quants (Q2_K ... Q6_K) and the GGUF export of layers no 32-block type holds: our blocks decode,
by the `gguf` package's own dequantizers (ggml's reference), to exactly the values our packer intended,
on random data of odd magnitudes, all-zero, one-signed and constant blocks; the fit's error falls with
the bits and follows the importance weights; rows that are not whole super-blocks take llama.cpp's
fallback types, exactly where our integer grid fits them; the refusals."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGML
from gguf import GGUFReader, quants
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.ggml_blocks import holds, to_blocks
from lowbit.io.gguf_write import gguf_type
from lowbit.io.kquants import KINDS, quantize

TYPES = list(KINDS)


def _exact(w: torch.Tensor, qtype, importance=None) -> torch.Tensor:
    data, values = quantize(w, qtype, importance)
    assert data.dtype == np.uint8 and data.shape == (w.shape[0], w.shape[1] // 256 * KINDS[qtype].nbytes)
    assert np.array_equal(quants.dequantize(data, qtype), values.numpy())
    return values


def _awkward(seed: int) -> torch.Tensor:
    """Rows of Gaussian weights at many magnitudes, with zero, negative-only, positive-only, constant
    and outlier super-blocks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 512, generator=g) * 0.02
    w[0, :256] = 0
    w[1] = -w[1].abs()
    w[2] = w[2].abs()
    w[3] *= 1e3
    w[4] *= 1e-5
    w[5, :256] = -0.5
    w[6, 7] = 3.0
    w[7] = torch.randint(-3, 3, (512,), generator=g).float() * 0.01  # already on a coarse grid
    w[8, ::2] = 0
    w[9] = torch.linspace(-1, 1, 512)
    w[10, 256:] = 7.0
    w[11] *= 60.0
    return w


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_blocks_decode_to_what_we_meant(qtype):
    w = _awkward(0)
    values = _exact(w, qtype)
    assert torch.equal(values[0, :256], torch.zeros(256))
    imp = torch.rand(512, generator=torch.Generator().manual_seed(1)) ** 4
    imp[:16] = 0  # dead inputs
    _exact(w, qtype, imp)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(TYPES), st.integers(0, 2**31 - 1), st.floats(1e-6, 1e4), st.booleans())
def test_blocks_exact_on_any_scale(qtype, seed, scale, weighted):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 256, generator=g) * scale + torch.randn(3, 1, generator=g) * scale
    _exact(w, qtype, torch.rand(256, generator=g) if weighted else None)


def test_error_falls_with_the_bits_and_follows_importance():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(2)) * 0.02
    errs = [float(((_exact(w, t) - w) ** 2).sum() / (w ** 2).sum()) for t in TYPES]
    print({t.name: round(e, 5) for t, e in zip(TYPES, errs)})
    assert all(a > 1.8 * b for a, b in zip(errs, errs[1:]))
    # measured on N(0, 1) rows: Q2_K 0.077 Q3_K 0.024 Q4_K 0.0052 Q5_K 0.0012 Q6_K 0.0003 (ggml's
    # published figures for its own reference quantizer are of these orders)
    assert errs[2] < 0.006 and errs[4] < 0.0004
    imp = torch.ones(1024)
    imp[::4] = 100.0  # every fourth input matters: the fit spends its levels there
    for qtype in TYPES:
        plain, weighted = _exact(w, qtype), _exact(w, qtype, imp)
        err = [float((imp * (v - w) ** 2).sum()) for v in (plain, weighted)]
        assert err[1] < err[0], qtype.name


@pytest.mark.parametrize("bits, group, sym, qtype, bound", [
    (3, 128, True, GGML.Q3_K, 1e-4), (3, 128, False, GGML.Q3_K, 5e-4), (4, 128, False, GGML.Q4_K, 5e-4),
    (2, 64, True, GGML.Q2_K, 0.01), (2, 64, False, GGML.Q2_K, 0.01)])
def test_a_lower_bit_grid_lands_on_the_k_quant(bits, group, sym, qtype, bound):
    """A UniformQ layer's values sit on a grid the K-quant of its bits nearly holds (the sub-block
    levels are the same; only the scales are requantized): measured 7e-6 (W3 g128 sym -> Q3_K), 1.6e-4,
    1.4e-4 (W4 g128 asym -> Q4_K), 3.8e-3 and 4.8e-3 (W2 g64 -> Q2_K: 4-bit sub-block scales and
    mins) against 0.023, 0.005 and 0.075 on Gaussian weights."""
    w = torch.randn(64, 1536, generator=torch.Generator().manual_seed(4)) * 0.02
    src = lowbit.UniformQ.from_float(w, bits, group, sym).dequantize()
    err = float(((_exact(src, qtype) - src) ** 2).sum() / (src ** 2).sum())
    print(f"W{bits} g{group} {'sym' if sym else 'asym'} -> {qtype.name}: {err:.2e}")
    assert err < bound


def test_refusals():
    with pytest.raises(LowbitError, match="256"):
        quantize(torch.randn(2, 320), GGML.Q4_K)
    with pytest.raises(LowbitError, match="not a K-quant"):
        quantize(torch.randn(2, 256), GGML.Q4_0)
    with pytest.raises(LowbitError, match="not finite"):
        quantize(torch.full((1, 256), float("nan")), GGML.Q6_K)
    with pytest.raises(LowbitError, match="one per input column"):
        quantize(torch.randn(2, 256), GGML.Q3_K, torch.ones(255))
    with pytest.raises(LowbitError, match="one per input column"):
        quantize(torch.randn(2, 256), GGML.Q3_K, -torch.ones(256))
    with pytest.raises(LowbitError, match="too large"):
        quantize(torch.full((1, 256), 3e38).float() * torch.linspace(-1, 1, 256), GGML.Q4_K)


@pytest.mark.parametrize("bits, sym, group, cols, want, exact", [
    (3, True, 128, 512, GGML.Q3_K, False), (2, False, 64, 512, GGML.Q2_K, False),
    (4, False, 128, 512, GGML.Q4_K, False), (8, False, 32, 512, GGML.Q8_0, False),
    (4, True, 128, 512, GGML.Q4_0, True), (8, True, 64, 512, GGML.Q8_0, True),  # exact at their own size
    (3, True, 128, 576, GGML.Q4_0, True), (2, False, 64, 576, GGML.Q4_0, True),  # llama.cpp's fallbacks
    (3, False, -1, 576, GGML.Q4_0, True), (4, False, 128, 576, GGML.Q5_0, True),
])
def test_type_choice_and_fallbacks_decode_exactly(bits, sym, group, cols, want, exact):
    w = torch.randn(32, cols, generator=torch.Generator().manual_seed(3))
    qt = lowbit.UniformQ.from_float(w, bits, group, sym)
    assert gguf_type(qt) == want and holds(qt, want) == exact
    if exact:
        data, _ = to_blocks(qt, want)
        assert np.array_equal(quants.dequantize(data, want), qt.dequantize().numpy())


def test_export_reports_and_decodes_to_the_report(tiny_model_dir, tmp_path):
    """Tiny rows (64/128 columns) take the fallbacks: W3 in Q4_0 exactly (error 0); an 8-bit asymmetric
    head and embedding in Q8_0 by ggml's quantizer, its reported error what the file decodes to."""
    edge = lowbit.RTN(bits=8, group_size=32, sym=False)
    q = lowbit.quantize(lowbit.load(tiny_model_dir("llama")), lowbit.RTN(bits=3, group_size=32), lm_head=edge,
                        embeddings=edge, progress=False)
    report = []
    path = lowbit.io.write_gguf(q.model, tmp_path / "w3.gguf", q.tokenizer, report=report)
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    by_name = {r.name: r for r in report}
    down = q.model.get_submodule("model.layers.0.mlp.down_proj").qtensor
    t = tensors["blk.0.ffn_down.weight"]
    assert t.tensor_type == GGML.Q4_0 and by_name["model.layers.0.mlp.down_proj"].rel_err == 0.0
    assert np.array_equal(quants.dequantize(t.data, t.tensor_type), down.dequantize().numpy())
    emb = q.model.get_submodule("model.embed_tokens").qtensor.dequantize()
    t = tensors["token_embd.weight"]
    got = torch.from_numpy(quants.dequantize(t.data, t.tensor_type))
    assert t.tensor_type == GGML.Q8_0
    assert by_name["model.embed_tokens"].rel_err == pytest.approx(float(((got - emb) ** 2).sum() / (emb ** 2).sum()))
    assert 0 < by_name["model.embed_tokens"].rel_err < 1e-4
    assert {r.gguf_type for r in report} == {"Q4_0", "Q8_0"}
