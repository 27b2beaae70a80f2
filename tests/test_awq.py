"""AWQ: folding is exact in float; the search never does worse than plain rounding on its objective."""

import pytest
import torch

import lowbit
from lowbit.calib import builtin
from lowbit.calib.runner import calibration_batches
from lowbit.models.blocks import capture_inputs, decoder_layers, run_block
from lowbit.methods import AWQ, RTN
from lowbit.methods.awq import GROUPS, _producer, fold_scales, search_scale


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma", "gemma2"])
def test_folding_leaves_the_float_block_unchanged(tiny_model_dir, tiny_tokenizer, model_type):
    extra = {"num_key_value_heads": 4} if model_type == "llama" else {}  # no GQA: o_proj is folded too
    model = lowbit.load(tiny_model_dir(model_type, **extra)).model
    batches = calibration_batches(tiny_tokenizer, builtin("calib"), 2, 32)
    inputs, kwargs = capture_inputs(model, batches)
    block = decoder_layers(model)[0]
    before = run_block(block, inputs, kwargs[0])
    folded = 0
    g = torch.Generator().manual_seed(0)
    for producer_names, consumers in GROUPS:
        producer = _producer(block, producer_names)
        layers = [block.get_submodule(n) for n in consumers]
        if isinstance(producer, torch.nn.Linear) and producer.out_features != layers[0].in_features:
            continue
        fold_scales(producer, layers, torch.rand(layers[0].in_features, generator=g) * 3 + 0.2)
        folded += 1
    assert folded == 4 if model_type == "llama" else folded >= 3
    after = run_block(block, inputs, kwargs[0])
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_scale_search_finds_the_salient_channels():
    """Inputs with a few huge channels: the search must scale them up (α > 0) and cut the error."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g)
    x[:, :3] *= 30
    w = torch.randn(64, 128, generator=g)
    spec = AWQ(bits=3, group_size=32)
    s = search_scale(x, x.abs().mean(0), [w], spec)
    assert s[:3].min() > s[3:].max()

    def err(scale):
        dq = RTN(bits=3, group_size=32)
        q = lowbit.UniformQ.from_float(w * scale, dq.bits, dq.group_size, dq.sym).dequantize() / scale
        return ((x @ q.T - x @ w.T) ** 2).mean()
    assert err(s) < 0.9 * err(torch.ones(128))


def test_teq_lowers_block_error(tiny_model_dir, tiny_tokenizer):
    """Trained scales must lower the quantized blocks' output error below untrained ones (= RTN)."""
    from lowbit.calib.runner import quantize_blocks
    from lowbit.recipes import block_quantizer, targets

    path = tiny_model_dir("llama", num_key_value_heads=4)
    batches = calibration_batches(tiny_tokenizer, builtin("calib"), 8, 48)
    total = {}
    for steps in (0, 40):
        model = lowbit.load(path).model
        spec = lowbit.TEQ(bits=2, group_size=32, sym=False, steps=steps, lr=2e-2)
        specs = {id(model.get_submodule(name)): spec for name in targets(model)}
        errors = quantize_blocks(model, batches, block_quantizer(specs), progress=False)
        total[steps] = sum(v for k, v in errors.items() if k.endswith("block"))
    assert total[40] < 0.99 * total[0]
