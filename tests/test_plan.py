"""Plans: scheme strings, per-layer specs applied and recorded, plans the runner refuses, and
directories written before plans (format 1) loading with the plan they imply."""

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.formats import CodebookQ, UniformQ, describe
from lowbit.recipes import Plan, parse_scheme, targets

OPTS = dict(calib_samples=4, calib_seq_len=48, progress=False)


@pytest.mark.parametrize("scheme, spec", [
    ("W4A16-g128", lowbit.RTN(bits=4, group_size=128)), ("W3A16-g64-asym", lowbit.RTN(bits=3, group_size=64, sym=False)),
    ("W2-row", lowbit.RTN(bits=2, group_size=-1)), ("W8", lowbit.RTN(bits=8, group_size=128)),
    ("W4-g32-sym", lowbit.RTN(bits=4, group_size=32)),
    ("W4A8-tender", lowbit.RTN(bits=4, group_size=128, act_bits=8, act_method="tender")),
    ("W4A4-tender-row-G12-static", lowbit.RTN(bits=4, group_size=-1, act_bits=4, act_groups=12, act_chunk=0)),
    ("W8A8-smoothquant-g32", lowbit.RTN(bits=8, group_size=32, act_bits=8, act_method="smoothquant"))])
def test_scheme_strings(scheme, spec):
    assert parse_scheme(scheme) == spec
    assert parse_scheme(spec.scheme) == spec  # the config's own name parses back


@pytest.mark.parametrize("scheme, needle", [("W4A3-g128", "activation bits 3"), ("4bit", "not of the form"),
                                            ("W4A16-tender", "A16 keeps activations in float"),
                                            ("W4A8-per-token-G4", "Tender's settings"), ("W4A8-tender-G17", "G = 17"),
                                            ("W5A16", "bits=5"), ("W4A16-g100", "group size 100")])
def test_bad_scheme_strings(scheme, needle):
    with pytest.raises(LowbitError, match=needle):
        parse_scheme(scheme)


def test_quantize_takes_a_scheme_string(tiny_model_dir):
    path, ids = tiny_model_dir("llama"), torch.arange(3, 30).unsqueeze(0)
    by_scheme = lowbit.quantize(path, "W3A16-g32-asym", progress=False)
    by_config = lowbit.quantize(path, lowbit.RTN(bits=3, group_size=32, sym=False), progress=False)
    assert by_scheme.plan == by_config.plan
    with torch.no_grad():
        assert torch.equal(by_scheme.model(ids).logits, by_config.model(ids).logits)


def test_each_layer_gets_its_own_spec_and_the_plan_round_trips(tiny_model_dir, tmp_path):
    """GPTQ 3-bit on the MLPs' down projections, RTN 4-bit g32 asym elsewhere, one layer left in float:
    every layer is stored in its own format, and loading rebuilds the same plan and logits."""
    path = tiny_model_dir("llama")
    model = lowbit.load(path).model
    rtn, gptq = lowbit.RTN(bits=4, group_size=32, sym=False), lowbit.GPTQ(bits=3, group_size=64)
    layers = {name: gptq if name.endswith("down_proj") else rtn for name in targets(model)}
    del layers["model.layers.1.self_attn.o_proj"]
    plan = Plan(layers)
    q = lowbit.quantize(path, plan, **OPTS)
    formats = {name: m.meta for name, m in q.model.named_modules() if hasattr(m, "qtensor")}
    assert formats.keys() == layers.keys()
    assert isinstance(q.model.get_submodule("model.layers.1.self_attn.o_proj"), nn.Linear)
    for name, meta in formats.items():
        assert (meta["bits"], meta["group_size"], meta["sym"]) == (layers[name].bits, layers[name].group_size,
                                                                   layers[name].sym)
    assert q.info["calibration"]["samples"] == 4
    q.save(tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    assert loaded.plan == plan and loaded.source == str(path.absolute())
    ids = torch.arange(3, 30).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, q.model(ids).logits)


def test_plans_the_runner_cannot_run_are_refused(tiny_model_dir):
    path = tiny_model_dir("llama")
    names = targets(lowbit.load(path).model, lm_head=True)
    awq, gptq = lowbit.AWQ(bits=4, group_size=32), lowbit.GPTQ(bits=4, group_size=32)
    mixed = Plan({n: awq if n.endswith("proj") and "mlp" in n else gptq for n in names if n != "lm_head"})
    with pytest.raises(LowbitError, match="mixes awq with gptq W4-g32-sym inside the decoder blocks"):
        lowbit.quantize(path, mixed, **OPTS)
    with pytest.raises(LowbitError, match="gives gptq to lm_head, outside the decoder blocks"):
        lowbit.quantize(path, Plan({n: gptq for n in names}), **OPTS)
    with pytest.raises(LowbitError, match="names model.layers.9.mlp.up_proj, which the model does not have"):
        lowbit.quantize(path, Plan({"model.layers.9.mlp.up_proj": gptq}), **OPTS)
    with pytest.raises(LowbitError, match="a scheme string such as"):
        lowbit.quantize(path, {"bits": 4}, **OPTS)


@pytest.fixture
def old_style_dir(tiny_model_dir, tmp_path):
    """Factory: a directory as lowbit wrote it before plans (format 1): quantization_config records one
    "method" for every module, with lm_head/embeddings flags and no "plan"."""
    def make(spec, **options):
        path = tiny_model_dir("llama")
        q = lowbit.quantize(path, spec, **({**OPTS, **options} if spec.needs_calib else {"progress": False, **options}))
        out = tmp_path / f"old-{spec.name}"
        q.save(out)
        config = json.loads((out / "config.json").read_text())
        qc = config["quantization_config"]
        config["quantization_config"] = {
            "quant_method": "lowbit", "format_version": 1, "method": spec.to_dict(), "source": qc["source"],
            "lm_head": options.get("lm_head", False), "embeddings": False, "modules": qc["modules"],
            **({"calibration": qc["calibration"]} if "calibration" in qc else {})}
        (out / "config.json").write_text(json.dumps(config, indent=2))
        return out, q
    return make


@pytest.mark.parametrize("spec, options", [(lowbit.RTN(bits=4, group_size=32), {}),
                                           (lowbit.GPTQ(bits=3, group_size=32), {"lm_head": True})])
def test_old_directories_load_with_the_plan_they_imply(old_style_dir, spec, options):
    out, q = old_style_dir(spec, **options)
    loaded = lowbit.load(out)
    assert loaded.plan == q.plan  # GPTQ's head was rounded to nearest then too: the plan says so
    assert loaded.source == q.source and ("calibration" in loaded.info) == spec.needs_calib
    ids = torch.arange(3, 30).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, q.model(ids).logits)
    text, stats = loaded.generate("Once upon a time", max_new_tokens=3)
    assert stats.new_tokens >= 1


def test_cli_scheme_option(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "w3"
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--scheme", "W3A16-g32-asym",
                 "--no-check"]) == 0
    assert "rtn W3-g32-asym" in capsys.readouterr().out
    plan = json.loads((out / "config.json").read_text())["quantization_config"]["plan"]
    assert [entry["spec"] for entry in plan] == [lowbit.RTN(bits=3, group_size=32, sym=False).to_dict(),
                                                 lowbit.recipes.EDGE.to_dict()]  # the head and embedding
    assert sorted(plan[1]["layers"]) == ["lm_head", "model.embed_tokens"]
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(tmp_path / "x"), "--scheme", "W4A16-g32",
                 "--bits", "3", "--no-check"]) == 1
    assert "drop bits or the scheme" in capsys.readouterr().err


def test_describe_each_format():
    w = torch.randn(8, 64)
    assert describe(UniformQ.from_float(w, 4, 32, True).meta()) == "uniform 4b g32 sym"
    assert describe(UniformQ.from_float(w, 3, -1, False).meta()) == "uniform 3b row asym"
    idx, codebook = torch.randint(0, 8, (8, 64)), torch.randn(8, 1, 8)
    outliers = torch.zeros(8, 64)
    outliers[0, 0] = 1.0
    assert describe(CodebookQ.from_indices(idx, codebook, 3, -1).meta()) == "codebook 3b row"
    assert describe(CodebookQ.from_indices(idx, codebook, 3, -1, outliers=outliers).meta()) == "codebook 3b row +outliers"
