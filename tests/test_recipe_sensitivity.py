"""The sensitivity proxy on the real model: p · tr(ΔW H ΔWᵀ)/tokens from the block runner's statistics
ranks (layer, candidate) pairs as the model-level KL divergence of quantizing that one layer alone
does, and better than the layer's output error without its propagation p (v_proj and q_proj among the
layers: the pairs the output error alone misjudges). A subset of layers here, 4 x 256 calibration
tokens and one window of 256 to score; benchmarks/recipes.py --proxy runs the whole table. The
sensitivity pass's shared work (stacked GPTQ, one H per input) equals the work done one at a time."""

import pytest
import torch

from lowbit.calib import load as load_text
from lowbit.eval.metrics import scorer
from lowbit.calib.runner import LayerStats, gather_stats
from lowbit.methods import METHODS, config_for
from lowbit.methods.gptq import quantize_many
from lowbit.models import load_source
from lowbit.recipes import candidates
from lowbit.recipes.apply import replace
from lowbit.recipes.sensitivity import group_losses, measure, output_error, rank_correlation, shared_stats
LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.v_proj", "model.layers.8.mlp.down_proj",
          "model.layers.15.self_attn.o_proj", "model.layers.20.mlp.gate_proj", "model.layers.29.mlp.up_proj"]
CANDIDATES = ["rtn:W2-g64-asym", "rtn:W3-g128-asym", "rtn:W4-row-sym"]
WINDOW = 256  # tokens scored for the single-layer KLD


def test_rank_correlation_matches_its_definition():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 1, 2, 3], [5, 6, 7, 8]) == pytest.approx(0.9486832980505138)  # scipy's, with a tie


def test_stacked_gptq_and_shared_losses_equal_one_layer_and_spec_at_a_time():
    torch.manual_seed(0)
    x = torch.randn(512, 96) * torch.rand(96) * 3
    x[:, 7] = 0  # a dead input
    stats = LayerStats(x.T @ x, x.abs().sum(0), 512)
    specs = tuple(config_for("gptq", bits=b, group_size=g, sym=b >= 4) for b in (2, 3, 4, 8) for g in (32, -1))
    weights = [torch.randn(40, 96) * 0.02, torch.randn(24, 96) * 0.05]
    for w in weights:
        for spec, qt in zip(specs, quantize_many(w, stats, specs)):
            assert torch.equal(qt.dequantize(), METHODS["gptq"].quantize(w, stats, spec).dequantize())
    specs += (config_for("rtn", bits=3, group_size=32, sym=False),)
    for w, losses in zip(weights, group_losses(weights, stats, specs)):
        for spec in specs:
            alone = output_error(w, METHODS[spec.name].quantize(w, stats, spec).dequantize(), stats)
            assert losses[candidates.name(spec)] == pytest.approx(alone, rel=1e-5)


@torch.no_grad()
def test_one_hessian_per_layer_input():
    src = load_source()
    block = src.model.model.layers[0]
    names = {id(m): n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    x = [torch.randn(1, 16, 576)]
    pos = torch.arange(16)[None]
    kwargs = {"position_embeddings": src.model.model.rotary_emb(x[0], pos), "position_ids": pos}
    groups, out = shared_stats(block, x, kwargs, names)
    assert [members for members, _ in groups] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                  ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                                                  ["mlp.down_proj"]]
    per_layer, ref_out = gather_stats(block, x, kwargs)  # the block runner's: one H per layer
    for members, stats in groups:
        assert all(torch.equal(stats.hessian, per_layer[m].hessian) for m in members)
    assert torch.equal(out[0], ref_out[0])


@pytest.mark.slow
@torch.no_grad()
def test_proxy_ranks_like_the_single_layer_kld():
    src = load_source()
    model, specs = src.model, candidates.parse(CANDIDATES)
    sens = measure(model, src.tokenizer, load_text("calib"), specs, LAYERS, samples=4, seq_len=256, progress=False)
    ids = torch.tensor(src.tokenizer(load_text("eval"))["input_ids"][:WINDOW])
    reference = scorer(model, WINDOW)(ids)
    predicted, measured = [], []
    for name in LAYERS:
        float_layer = model.get_submodule(name)
        for spec in specs:
            replace(model, name, float_layer, METHODS[spec.name].quantize(float_layer.weight, None, spec))
            lp = scorer(model, WINDOW)(ids)
            measured.append(float((reference.exp() * (reference - lp)).sum(-1).mean()))
            predicted.append(sens.loss[name][candidates.name(spec)])
        model.set_submodule(name, float_layer)
    for i in range(0, len(LAYERS) * 3, 3):  # within a layer: fewer bits, more loss, in both
        assert predicted[i] > predicted[i + 1] > predicted[i + 2] and measured[i] > measured[i + 1] > measured[i + 2]
    owners = [n for n in LAYERS for _ in specs]
    unscaled = [sens.raw(n, candidates.name(s)) for n in LAYERS for s in specs]
    assert unscaled == pytest.approx([p / sens.propagation[n] / sens.amplification[n] for p, n in zip(predicted, owners)])
    rho, rho_unscaled = rank_correlation(predicted, measured), rank_correlation(unscaled, measured)
    ratios = sorted(p / m for p, m in zip(predicted, measured))
    print(f"Spearman: proxy {rho:.3f}, layer output error alone {rho_unscaled:.3f}; "
          f"predicted / measured KLD {ratios[0]:.2f} .. {ratios[-1]:.2f}, median {ratios[len(ratios) // 2]:.2f}")
    assert rho >= 0.85 and rho > rho_unscaled + 0.05, (rho, rho_unscaled, predicted, measured)
    assert 0.2 < ratios[len(ratios) // 2] < 5, ratios  # the proxy is in nats of KLD, to first order
