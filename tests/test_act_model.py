"""Activation-quantized models end to end (tiny llama): quantize, save, reload exactly, run on the
universal path and the native engine (the same integer kernel), inspect, the CLI's scheme strings, bad input."""

import copy
import json
import shutil

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.nn import ActQuantLinear
from lowbit.runtime.engine import _fused, load_decoder

OPTS = dict(calib_samples=2, calib_seq_len=48, progress=False)


@pytest.fixture(scope="module")
def tender_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny llama, GPTQ W4 g32 weights with Tender A8 activations (G 6), saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **TINY, vocab_size=len(tiny_tokenizer))
    model = AutoModelForCausalLM.from_config(config)
    q = lowbit.quantize(model, lowbit.GPTQ(bits=4, group_size=32, act_bits=8, act_groups=6), tokenizer=tiny_tokenizer, **OPTS)
    out = tmp_path_factory.mktemp("tender") / "w4a8"
    q.save(out)
    ids = torch.randint(0, len(tiny_tokenizer), (1, 24))
    with torch.no_grad():
        logits = q.model(ids).logits
    return out, ids, logits


def test_reload_is_exact_and_runs_on_the_engine(tender_dir):
    out, ids, logits = tender_dir
    q = lowbit.load(out)
    layers = [m for m in q.model.modules() if isinstance(m, ActQuantLinear)]
    assert len(layers) == 14  # 7 linears × 2 blocks
    # channels by (weight group, group): the groups start again in each weight group, on the engine too
    assert any(bool((m.act.group[1:] < m.act.group[:-1]).any()) for m in layers)
    assert q.plan.specs[0].act_groups == 6 and q.plan.specs[0].scheme == "W4A8-tender-g32-sym-G6-c1"
    with torch.no_grad():
        assert torch.equal(q.model(ids).logits, logits)
    mlp = q.model.model.layers[0].mlp  # equal activation quantizers: the engine runs gate/up as one layer
    assert isinstance(_fused([mlp.gate_proj, mlp.up_proj]), ActQuantLinear)
    engine = load_decoder(q.model, kv_dtype="fp32")  # every W·A· layer through the same integer kernel
    ref = logits[0, -1]
    prefill = engine.forward(ids[0])
    engine.truncate(0)
    engine.forward(ids[0, :-1])
    decode = engine.forward(ids[0, -1:])  # the last token alone: the one-row path
    for got in (prefill, decode):  # fp32 rounding apart (the engine's attention and norms round their own
        # way, and where that moves an input across a rounding boundary one activation code moves one step)
        assert ((got - ref).abs().max() / ref.abs().max()) < 1e-3
    text, stats = q.generate("Once upon", max_new_tokens=4)
    assert stats.new_tokens >= 1
    assert q.evaluate(max_windows=1, progress=False).ppl > 1


def test_inspect_shows_the_activation_spec(tender_dir, capsys):
    assert main(["inspect", str(tender_dir[0])]) == 0
    assert "uniform 4b g32 sym A8 tender G6 c1" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["per-token", "per-tensor", "per-block32", "smoothquant", "hadamard"])
def test_each_baseline_quantizes_saves_and_reloads(tiny_model_dir, tmp_path, method):
    q = lowbit.quantize(lowbit.load(tiny_model_dir("llama")), lowbit.RTN(bits=8, group_size=32, act_bits=8,
                                                                         act_method=method), **OPTS)
    q.save(tmp_path / "m")
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "m").model(ids).logits, q.model(ids).logits)


def test_cli_scheme_with_its_checkpoint(tiny_model_dir, tmp_path, capsys):
    """The command runs calibrated specs through the block checkpoint: the activation specs survive it."""
    out = tmp_path / "w8a8"
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--scheme", "W8A8-per-token-g32",
                 "--calib-samples", "2", "--calib-seq-len", "48", "--no-check"]) == 0
    assert "rtn W8A8-per-token-g32-sym" in capsys.readouterr().out
    acts = json.loads((out / "config.json").read_text())["quantization_config"]["activations"]
    assert len(acts) == 14 and {a["method"] for a in acts.values()} == {"per-token"}
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(tmp_path / "x"), "--scheme", "W8A8-tender-g32",
                 "--act-bits", "4", "--no-check"]) == 1
    assert "drop act_bits or the scheme" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_block_methods_refuse_weight_transforming_activations(tiny_model_dir):
    with pytest.raises(LowbitError, match="awq quantizes whole blocks itself"):
        lowbit.quantize(lowbit.load(tiny_model_dir("llama")), lowbit.AWQ(bits=4, group_size=32, act_bits=8), **OPTS)


def test_activations_need_a_tokenizer_for_calibration(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    with pytest.raises(LowbitError, match="needs calibration text"):
        lowbit.quantize(model, lowbit.RTN(bits=8, group_size=32, act_bits=8), progress=False)


def _damage(src, dst, change):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    change(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("change, needle", [
    (lambda qc: qc["activations"]["model.layers.0.mlp.down_proj"].update(in_features=64), "for 64 input features"),
    (lambda qc: qc["activations"]["model.layers.0.mlp.down_proj"].update(bits=3), "bits 3"),
    (lambda qc: qc["activations"]["model.layers.0.mlp.down_proj"].update(groups=17), "groups 17"),
    (lambda qc: qc["activations"]["model.layers.0.mlp.down_proj"].update(method="tender-x"), "unknown"),
    (lambda qc: qc["activations"].update({"lm_head.x": qc["activations"]["model.layers.0.mlp.down_proj"]}), "damaged"),
    (lambda qc: qc["activations"].pop("model.layers.0.mlp.down_proj"), "activation tensors but"),
])
def test_damaged_activation_specs_are_refused(tender_dir, tmp_path, change, needle):
    bad = _damage(tender_dir[0], tmp_path / "bad", change)
    with pytest.raises(LowbitError, match=needle) as e:
        lowbit.load(bad)
    assert "\n" not in str(e.value)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

values = st.none() | st.booleans() | st.integers(-3, 2**31) | st.sampled_from([0, 4, 8, 16, 17, 128, 256]) \
    | st.text(max_size=12) | st.sampled_from(["tender", "per-token", "hadamard"]) | st.lists(st.integers(), max_size=2)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(["method", "bits", "in_features", "groups", "chunk", "extra"]), values,
                               min_size=1, max_size=3))
def test_fuzz_activation_specs(tender_dir, tmp_path_factory, changes):
    """Whatever a stored activation spec says, loading refuses it in one line or loads a working model."""
    bad = _damage(tender_dir[0], tmp_path_factory.mktemp("fuzz") / "m",
                  lambda qc: qc["activations"]["model.layers.1.self_attn.o_proj"].update(changes))
    try:
        q = lowbit.load(bad)
    except LowbitError as e:
        assert "\n" not in str(e)
    else:
        with torch.no_grad():
            assert torch.isfinite(q.model(tender_dir[1]).logits).all()


def test_gptq_weights_of_a_tender_model_are_the_weight_only_models(tiny_tokenizer):
    """A Tender layer stays its weight-only self until the block runner has passed the block's outputs
    on (recipes/apply.py: `pending`, `finished`), so GPTQ fits every block on the weight-only model's
    inputs: the codes are that model's, columns moved by the ActQ's permutation, in every block (fitted
    on the W·A· model's own inputs they part from block 1 on)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY, vocab_size=len(tiny_tokenizer)))
    both = [lowbit.quantize(copy.deepcopy(model), lowbit.GPTQ(bits=4, group_size=32, **acts), tokenizer=tiny_tokenizer,
                            **OPTS).model for acts in ({}, {"act_bits": 8, "act_groups": 6})]
    pairs = [(m, dict(both[1].named_modules())[n]) for n, m in both[0].named_modules() if hasattr(m, "qtensor")]
    acts = [(w, a) for w, a in pairs if isinstance(a, ActQuantLinear)]
    assert len(acts) == 7 * TINY["num_hidden_layers"]
    for w, a in acts:
        perm = a.act.perm.long()
        assert torch.equal(a.qtensor.codes(), w.qtensor.codes()[:, perm])
        assert torch.equal(a.qtensor.scales, w.qtensor.scales)
