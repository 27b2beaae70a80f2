"""compressed-tensors pack-quantized: transformers with the compressed-tensors package loads our export
with our logits; the package's own decompression of every exported layer is our dequantization; the
directory imports back into lowbit exactly (the same codes, scales, zero points); damaged or foreign
directories get one-line errors (fuzzed)."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.compressed_tensors import _checked_scheme
from lowbit.recipes import Plan, targets

pytest.importorskip("compressed_tensors")


def _mixed(tiny_model_dir, sym: bool):
    model = lowbit.load(tiny_model_dir("llama"))
    specs = {"self_attn": lowbit.RTN(bits=4, group_size=-1, sym=sym), "gate": lowbit.RTN(bits=3, group_size=32, sym=sym),
             "up": lowbit.RTN(bits=2, group_size=64, sym=sym), "down": lowbit.RTN(bits=8, group_size=128, sym=sym)}
    plan = Plan({n: next(s for k, s in specs.items() if k in n) for n in targets(model.model)}
                | {"lm_head": lowbit.RTN(bits=8, group_size=32)})
    return lowbit.quantize(model, plan, progress=False)


def _logits(model, tokenizer):
    x = torch.tensor([tokenizer("def f(x):\n    return x * 2").input_ids])
    with torch.inference_mode():
        return model(x).logits


def test_transformers_loads_mixed_export_with_our_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    q = _mixed(tiny_model_dir, sym=True)
    out = q.export(tmp_path / "ct", to="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and len(qc["config_groups"]) == 4 and qc["ignore"] == ["lm_head"]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.allclose(hf(torch.tensor([[1, 2, 3]])).logits, q.model(torch.tensor([[1, 2, 3]])).logits,
                          atol=1e-5, rtol=0)
    assert torch.allclose(_logits(hf, q.tokenizer), _logits(q.model, q.tokenizer), atol=1e-5, rtol=0)


def test_package_decompresses_our_asym_layers_to_our_weights(tiny_model_dir, tmp_path):
    """Asymmetric layers through the package's own PackedQuantizationCompressor.decompress (transformers
    0.20.1-era loading of asym pack-quantized files stumbles on the zero point's packed shape, so the
    compressor is called directly)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    q = _mixed(tiny_model_dir, sym=False)
    out = q.export(tmp_path / "ct", to="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    state = load_file(out / "model.safetensors")
    checked = 0
    for group in qc["config_groups"].values():
        scheme = QuantizationScheme(**group)
        for name in group["targets"]:
            tensors = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".weight_")}
            theirs = PackedQuantizationCompressor.decompress(tensors, scheme)["weight"]
            assert torch.equal(theirs, q.model.get_submodule(name).qtensor.dequantize()), name
            checked += 1
    assert checked == 14


@pytest.mark.parametrize("sym", [True, False])
def test_import_round_trip_is_exact(tiny_model_dir, tmp_path, sym):
    q = _mixed(tiny_model_dir, sym=sym)
    out = q.export(tmp_path / "ct", to="compressed-tensors")
    back = lowbit.load(out)
    assert back.info["imported"] == "compressed-tensors" and back.plan.summary().count("×") == 4
    for name in targets(lowbit.load(tiny_model_dir("llama")).model):
        a, b = q.model.get_submodule(name).qtensor, back.model.get_submodule(name).qtensor
        assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors()), name
    assert torch.allclose(_logits(back.model, back.tokenizer), _logits(q.model, q.tokenizer), atol=1e-6, rtol=0)


def _damage(out: Path, config=None, tensors=None):
    if config is not None:
        raw = json.loads((out / "config.json").read_text())
        config(raw["quantization_config"])
        (out / "config.json").write_text(json.dumps(raw))
    if tensors is not None:
        state = load_file(out / "model.safetensors")
        tensors(state)
        save_file(state, out / "model.safetensors")


@pytest.mark.parametrize("config, tensors, needle", [
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=5), None, "lowbit imports int weights"),
    (lambda qc: [g["weights"].update(actorder="group") for g in qc["config_groups"].values()], None,
     "weight_g_idx is missing"),
    (lambda qc: qc.update(format="float-quantized"), None, "lowbit imports 'pack-quantized'"),
    (None, lambda s: s.pop("model.layers.1.mlp.up_proj.weight_scale"), "weight_scale is missing"),
    (None, lambda s: s.update({"model.layers.0.self_attn.q_proj.weight_packed":
                               s["model.layers.0.self_attn.q_proj.weight_packed"][:, :3].contiguous()}), "weight_packed is"),
    (None, lambda s: s.update({"model.layers.0.mlp.down_proj.weight_scale":
                               s["model.layers.0.mlp.down_proj.weight_scale"].float() * 1.0001}), "fp16 cannot hold"),
    (None, lambda s: s.update({"model.layers.0.mlp.down_proj.weight_g_idx": torch.zeros(128, dtype=torch.int32)}),
     "unexpected tensor weight_g_idx"),
], ids=["bits-5", "act-order", "foreign-format", "missing-scale", "short-packed", "fp32-scales", "g_idx"])
def test_damaged_directories(tiny_model_dir, tmp_path, capsys, config, tensors, needle):
    from lowbit.cli import main

    out = _mixed(tiny_model_dir, sym=False).export(tmp_path / "ct", to="compressed-tensors")
    _damage(out, config, tensors)
    with pytest.raises(LowbitError, match=needle):
        lowbit.load(out)
    assert main(["inspect", str(out)]) == 1
    err = capsys.readouterr().err
    assert needle.split()[0] in err and err.count("\n") == 1


def test_codebook_layers_are_refused(tiny_model_dir, tmp_path):
    from lowbit.formats import CodebookQ
    from lowbit.formats.packing import pack
    from lowbit.nn import QuantLinear

    q = lowbit.quantize(lowbit.load(tiny_model_dir("llama")), lowbit.RTN(bits=4, group_size=32), progress=False)
    n, k = q.model.get_submodule("model.layers.1.mlp.up_proj").qtensor.shape
    codebook = CodebookQ(pack(torch.zeros(n, k, dtype=torch.uint8), 3), torch.zeros(n, 1, 8, dtype=torch.float16),
                         3, -1, (n, k))
    q.model.set_submodule("model.layers.1.mlp.up_proj", QuantLinear(codebook))
    with pytest.raises(LowbitError, match="up_proj is codebook 3b row: compressed-tensors export writes UniformQ"):
        q.export(tmp_path / "ct", to="compressed-tensors")
    with pytest.raises(LowbitError, match="up_proj is codebook 3b row.*GPTQ export writes UniformQ"):
        q.export(tmp_path / "gptq", to="gptq")
    assert not (tmp_path / "ct").exists() and not (tmp_path / "gptq").exists()


_json = st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.sampled_from(["int", "float", "group",
                     "channel", "tensor", "re:.*"]), lambda c: st.lists(c, max_size=3) | st.dictionaries(
                     st.sampled_from(["num_bits", "type", "strategy", "group_size", "symmetric", "dynamic",
                                      "actorder", "weights", "input_activations"]), c, max_size=6), max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(spec=_json)
def test_fuzz_config_groups(spec):
    try:
        bits, group, sym, act_order = _checked_scheme(Path("x"), "group_0", spec)
    except LowbitError as e:
        assert "\n" not in str(e)
        return
    assert bits in (2, 3, 4, 8) and group in (32, 64, 128, -1) and isinstance(sym, bool) and isinstance(act_order, bool)
