"""The sensitivity proxy on the real model: tr(ΔW H ΔWᵀ)/tokens from the block runner's statistics
ranks (layer, candidate) pairs as the model-level KL divergence of quantizing that one layer alone
does. A subset of layers here, 4 x 256 calibration tokens and one window of 256 to score (half the
earlier 8 x 256 and 512); benchmarks/recipes.py --proxy runs the whole table."""

import pytest
import torch

from lowbit.calib import load as load_text
from lowbit.eval.metrics import scorer
from lowbit.methods import METHODS
from lowbit.models import load_source
from lowbit.recipes import candidates
from lowbit.recipes.apply import replace
from lowbit.recipes.sensitivity import measure, rank_correlation

pytestmark = pytest.mark.slow
LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.8.mlp.down_proj", "model.layers.15.self_attn.o_proj",
          "model.layers.29.mlp.up_proj"]
CANDIDATES = ["rtn:W2-g64-asym", "rtn:W3-g128-asym", "rtn:W4-row-sym"]
WINDOW = 256  # tokens scored for the single-layer KLD


def test_rank_correlation_matches_its_definition():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 1, 2, 3], [5, 6, 7, 8]) == pytest.approx(0.9486832980505138)  # scipy's, with a tie


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
    assert rank_correlation(predicted, measured) >= 0.8, (predicted, measured)
