"""GPTQ and the block-by-block calibration runner."""

import pytest
import torch

import lowbit
from lowbit.calib import builtin
from lowbit.calib.runner import LayerStats, calibration_batches, quantize_blocks
from lowbit.models.blocks import capture_inputs, decoder_layers, run_block
from lowbit.errors import LowbitError
from lowbit.methods import GPTQ, RTN, quantize_weight


def _correlated_stats(k=256, tokens=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5)
    x[:, :4] *= 8  # a few outlier channels, as in real activations
    stats = LayerStats(torch.zeros(k, k), torch.zeros(k))
    for chunk in x.split(1000):
        stats.add(chunk)
    return stats


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn_on_output_error(bits, group_size, sym):
    stats = _correlated_stats()
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1))
    rtn = quantize_weight(w, None, RTN(bits=bits, group_size=group_size, sym=sym))
    for act_order in (False, True):
        gptq = quantize_weight(w, stats, GPTQ(bits=bits, group_size=group_size, sym=sym, act_order=act_order))
        assert gptq.meta() == rtn.meta()  # same format and layout, act-order or not
        assert {k: v.shape for k, v in gptq.tensors().items()} == {k: v.shape for k, v in rtn.tensors().items()}
        assert stats.relative_error(w, gptq.dequantize()) < 0.8 * stats.relative_error(w, rtn.dequantize())


def test_relative_error_matches_direct_computation():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 64, generator=g)
    stats = LayerStats(torch.zeros(64, 64), torch.zeros(64))
    stats.add(x)
    w, w_hat = torch.randn(10, 64, generator=g), torch.randn(10, 64, generator=g)
    direct = ((x @ (w - w_hat).T).norm() / (x @ w.T).norm()).item()
    assert stats.relative_error(w, w_hat) == pytest.approx(direct, rel=1e-4)
    assert torch.allclose(stats.abs_mean, x.abs().mean(0), rtol=1e-5)


def test_gptq_is_exact_on_grid_weights():
    """Weights already representable with static groups are the optimum: GPTQ must keep them."""
    stats = _correlated_stats(k=128)
    grid = quantize_weight(torch.randn(32, 128), None, RTN(bits=3, group_size=32)).dequantize()
    out = quantize_weight(grid, stats, GPTQ(bits=3, group_size=32, act_order=True))
    assert torch.equal(out.dequantize(), grid)


def test_gptq_handles_dead_inputs_and_ragged_groups():
    stats = _correlated_stats(k=100)
    stats.hessian[:, 7] = 0
    stats.hessian[7, :] = 0  # an input channel that is always zero
    w = torch.randn(20, 100)
    qt = quantize_weight(w, stats, GPTQ(bits=4, group_size=64))
    assert torch.isfinite(qt.dequantize()).all() and qt.scales.shape == (20, 2)



@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("qwen2", {}), ("gemma", {}),
                                              ("gemma2", {"sliding_window": 8})])
def test_runner_reproduces_the_float_model(tiny_model_dir, tiny_tokenizer, model_type, extra):
    model = lowbit.load(tiny_model_dir(model_type, **extra)).model
    batches = calibration_batches(tiny_tokenizer, builtin("calib"), 3, 40)
    assert [b.shape for b in batches] == [(1, 40)] * 3
    again = calibration_batches(tiny_tokenizer, builtin("calib"), 3, 40)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # deterministic
    inputs, kwargs = capture_inputs(model, batches)
    for block, kw in zip(decoder_layers(model), kwargs):
        inputs = run_block(block, inputs, kw)
    with torch.no_grad():
        for x, ids in zip(inputs, batches):
            expected = model.get_decoder()(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            torch.testing.assert_close(model.get_decoder().norm(x), expected)


@pytest.mark.parametrize("fp_targets", [True, False])
def test_block_targets_follow_the_float_model_or_the_block(tiny_model_dir, tiny_tokenizer, fp_targets):
    """Every block's inputs come from the quantized blocks before it; its targets are, with fp_targets
    (SignRound), the float model's own hidden states, else the float block's outputs on its
    inputs, which drift from those once earlier blocks are rounded (to 2 bits here)."""
    model = lowbit.load(tiny_model_dir("llama", num_hidden_layers=3)).model
    batches = calibration_batches(tiny_tokenizer, builtin("calib"), 2, 40)
    decoder = model.get_decoder()
    with torch.no_grad():
        hidden = [decoder(input_ids=ids, output_hidden_states=True).hidden_states for ids in batches]
    seen = []

    def round_block(block, inputs, kwargs, targets, stats):
        seen.append(targets)
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = quantize_weight(m.weight.detach(), None, RTN(bits=2, group_size=32)).dequantize()
        return {}

    quantize_blocks(model, batches, round_block, progress=False, fp_targets=fp_targets)
    last = len(seen) - 1
    for i, targets in enumerate(seen):
        for t, h in zip(targets, hidden):
            got = decoder.norm(t) if i == last else t
            if fp_targets or i == 0:
                torch.testing.assert_close(got, h[i + 1])
            else:
                assert not torch.allclose(got, h[i + 1], atol=1e-3)


def test_calibration_text_too_short(tiny_tokenizer):
    with pytest.raises(LowbitError, match="not 50"):
        calibration_batches(tiny_tokenizer, "a few words only " * 100, 50, 64)
