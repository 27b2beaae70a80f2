"""QuantX recipes: candidates, exact costs, the knapsack solver against brute force, the recipe under
each budget on a tiny model, and recipe files through the command line (written, edited, applied,
refused)."""

import itertools
import json
import random
import re
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.formats import CodebookQ, UniformQ
from lowbit.formats.packing import pack
from lowbit.recipes import QuantX, candidates, recipe_file
from lowbit.recipes.cost import Machine, stored_bytes, this_machine
from lowbit.recipes.quantx import _fused_groups, decode_seconds, parse_size, plan
from lowbit.recipes.sensitivity import block_linears, measure
from lowbit.recipes.solve import Option, solve

FAST = ("rtn",)  # RTN candidates: the sensitivity pass in well under a second on the tiny model


def test_candidate_sets_and_tokens():
    default = candidates.parse(["default"])
    assert len(default) == 16 and {(s.bits, s.group_size) for s in default} == \
        {(b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128, -1)}
    assert all(s.name == "gptq" and s.sym == (s.bits >= 4) for s in default)
    for spec in candidates.parse(["all"]):
        assert candidates.parse_one(candidates.name(spec)) == spec
    assert [candidates.name(s) for s in candidates.parse(["codebook", "rtn:W4-g128,rtn:W4-g128-sym"])] == \
        ["ganq:W2-lut-row", "ganq:W3-lut-row", "ganq:W4-lut-row", "rtn:W4-g128-sym"]
    for bad, needle in [("awq:W4-g128", "layer-wise method"), ("gptq:W3-lut-row", "made by ganq"),
                        ("gptq:W5-g64", "bits=5"), ("W4-g128", "METHOD:SCHEME")]:
        with pytest.raises(LowbitError, match=needle):
            candidates.parse([bad])
    assert candidates.fits(lowbit.GPTQ(group_size=128), 128) and not candidates.fits(lowbit.GPTQ(group_size=128), 96)


@pytest.mark.parametrize("shape", [(7, 200), (64, 96), (3, 33)])
def test_costs_are_the_stored_bytes(shape):
    w = torch.randn(*shape)
    for spec in candidates.parse(["default"]):
        if candidates.fits(spec, shape[1]):
            assert stored_bytes(spec, shape) == UniformQ.from_float(w, spec.bits, spec.group_size, spec.sym).nbytes
    for spec in candidates.parse(["codebook"]):
        qt = CodebookQ(pack(torch.zeros(shape, dtype=torch.uint8), spec.bits),
                       torch.zeros(shape[0], 1, 2 ** spec.bits, dtype=torch.float16), spec.bits, -1, shape)
        assert stored_bytes(spec, shape) == qt.nbytes
    assert abs(8 * stored_bytes(lowbit.GPTQ(bits=4, group_size=128), (576, 1536)) / (576 * 1536) - 4.125) < 1e-9


def test_decode_time_follows_bytes_and_threads():
    m = Machine(this_machine().cpu, this_machine().isa, 2, (10e9, 16e9))
    small = m.seconds(50_000, 64, 576)  # too small to wake a second thread
    assert small == pytest.approx(50_000 / 10e9)
    assert m.seconds(4_000_000, 4096, 4096) == pytest.approx(4_000_000 / 16e9)


def test_solver_is_optimal_on_small_problems():
    rng = random.Random(0)
    for _ in range(300):
        items = [[Option(rng.randint(1, 20), rng.random() * 10, (i, j)) for j in range(rng.randint(1, 4))]
                 for i in range(rng.randint(1, 5))]
        budget = rng.randint(1, 60)
        feasible = [sum(o.loss for o in c) for c in itertools.product(*items) if sum(o.cost for o in c) <= budget]
        if not feasible:
            with pytest.raises(LowbitError, match="below the least reachable cost"):
                solve(items, budget)
            continue
        got = solve(items, budget)
        assert sum(o.cost for o in got) <= budget
        assert sum(o.loss for o in got) == pytest.approx(min(feasible), abs=1e-9)
    # with a coarse resolution the budget still holds and the loss is no better than the optimum
    items = [[Option(rng.randint(1, 50), rng.random(), j) for j in range(6)] for _ in range(8)]
    exact, coarse = solve(items, 200), solve(items, 200, resolution=10)
    assert sum(o.cost for o in coarse) <= 200 and sum(o.loss for o in coarse) >= sum(o.loss for o in exact) - 1e-12


def test_sizes_parse():
    assert parse_size("60MB") == 60_000_000 and parse_size("1.5GiB") == 3 * 2**29 and parse_size("123") == 123
    with pytest.raises(LowbitError, match="not a number of bytes"):
        parse_size("lots")
    with pytest.raises(LowbitError, match="exactly one budget"):
        QuantX(target_bpw=3.5, target_tps=100)
    with pytest.raises(LowbitError, match="exactly one budget"):
        QuantX()


def test_fused_groups_follow_the_engine():
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + \
            [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert _fused_groups(names) == [names[:3], [names[3]], names[4:6], [names[6]]]
    assert _fused_groups(names[1:]) == [[n] for n in names[1:4]] + [names[4:6], [names[6]]]  # no q: no q/k/v


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY
    config = AutoConfig.for_model("llama", **TINY, vocab_size=len(tiny_tokenizer))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = tmp_path_factory.mktemp("tiny-recipe")
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def test_budgets_are_met_and_more_budget_predicts_less_loss(tiny):
    src = lowbit.load(tiny)
    text, names = lowbit.calib.builtin("calib"), block_linears(src.model)
    sens = measure(src.model, src.tokenizer, text, candidates.parse(FAST), names, 4, 48, progress=False)
    fitting = lambda n: {candidates.name(c) for c in candidates.parse(FAST) if candidates.fits(c, sens.shapes[n][1])}
    assert set(sens.loss) == set(names) and all(set(sens.loss[n]) == fitting(n) for n in names)

    def _recipe(tiny, **budget):
        return plan(src.model, QuantX(candidates=FAST, **budget), src.tokenizer, text, progress=False, sens=sens)

    found = {bpw: _recipe(tiny, target_bpw=bpw) for bpw in (2.5, 3.5, 4.5)}
    for bpw, r in found.items():
        assert r.summary["predicted"]["bpw"] <= bpw + 1e-9
        weights = sum(row["bytes"] * 8 / row["bpw"] for row in r.rows)
        assert sum(row["bytes"] * 8 for row in r.rows) / weights == pytest.approx(r.summary["predicted"]["bpw"])
    losses = [found[b].summary["predicted"]["loss"] for b in (2.5, 3.5, 4.5)]
    assert losses[0] > losses[1] > losses[2]
    assert len({row["choice"] for row in found[3.5].rows}) > 1  # a mix, not one uniform scheme
    with pytest.raises(LowbitError, match=r"closest reachable is --target-bpw 2\.\d+"):
        _recipe(tiny, target_bpw=1.0)
    size = _recipe(tiny, target_size="200KB")  # the float head and embedding alone are ~154 KB
    assert size.summary["predicted"]["bytes"] <= 200_000 and 2 < size.summary["predicted"]["bpw"] < 8
    with pytest.raises(LowbitError, match=r"closest reachable is --target-size 1[5-7]\d,\d{3} bytes"):
        _recipe(tiny, target_size="100KB")
    with pytest.raises(LowbitError, match=r"closest reachable is --target-tps") as too_fast:
        _recipe(tiny, target_tps=1e9)
    fastest = float(str(too_fast.value).split()[-1])
    fast = _recipe(tiny, target_tps=0.95 * fastest)
    assert 0.95 * fastest <= fast.summary["predicted"]["tokens_per_s"] <= fastest


def test_recipe_file_round_trip_edit_apply_and_refusals(tiny, tmp_path, capsys):
    r = tmp_path / "r.yaml"
    assert main(["recipe", str(tiny), "--target-bpw", "3.5", "--candidates", "rtn", "--sensitivity-samples", "4",
                 "--calib-seq-len", "48", "-o", str(r)]) == 0
    assert "predicted: " in capsys.readouterr().out
    text = r.read_text()
    read = recipe_file.read(r)
    assert read.layers["lm_head"] == lowbit.RTN(bits=8, group_size=32)  # the command line's 8-bit head
    out = tmp_path / "q"
    assert main(["quantize", str(tiny), "--recipe", str(r), "-o", str(out), "--no-check"]) == 0
    assert lowbit.load(out).plan.layers == read.plan(lowbit.load(tiny).model).layers
    eager = lowbit.load(tiny)  # the command read the blocks lazily, one at a time: the same recipe
    same = plan(eager.model, QuantX(target_bpw=3.5, candidates=FAST, sensitivity_samples=4), eager.tokenizer,
                lowbit.calib.load("calib"), {n: lowbit.RTN(bits=8, group_size=32) for n in read.layers
                                               if not n.startswith("model.layers.")}, 48, progress=False)
    assert {n: candidates.name(s) for n, s in same.plan.layers.items() if n.startswith("model.layers.")} == \
        {n: candidates.name(s) for n, s in read.layers.items() if n.startswith("model.layers.")}

    # edited by hand: one regex group gives every down projection 8 bits, named layers still win
    edited = tmp_path / "edited.yaml"
    lines = [ln for ln in text.splitlines() if "down_proj" not in ln]
    edited.write_text("\n".join(lines).replace("layers:", "groups:\n  - {match: 'model\\.layers\\.\\d+\\.mlp\\.down_proj', "
                                                         "spec: 'rtn:W8-g32-sym'}\nlayers:") + "\n")
    layers = recipe_file.read(edited).plan(lowbit.load(tiny).model).layers
    assert layers["model.layers.1.mlp.down_proj"] == lowbit.RTN(bits=8, group_size=32)

    # refused before any work, one line each, nothing written
    bad = {"missing.yaml": text.replace("model.layers.1.mlp.up_proj", "model.layers.7.mlp.up_proj"),
           "wide.yaml": text.replace("model.layers.0.self_attn.q_proj:", "model.layers.0.self_attn.q_proj: rtn:W4-g128-sym #"),
           "malformed.yaml": text.replace("layers:", "layers: [", 1),
           "nomatch.yaml": text.replace("layers:", "groups: [{match: 'decoder\\.\\d+', spec: 'rtn:W4-g32'}]\nlayers:")}
    capsys.readouterr()
    for name, content in bad.items():
        (tmp_path / name).write_text(content)
        target = tmp_path / f"out-{name}"
        assert main(["quantize", str(tiny), "--recipe", str(tmp_path / name), "-o", str(target), "--no-check"]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("lowbit: error:"), err
        assert not target.exists()
        assert {"missing.yaml": "model.layers.7.mlp.up_proj, which the model does not have",
                "wide.yaml": "group size 128 does not fit layer model.layers.0.self_attn.q_proj",
                "malformed.yaml": "is not valid YAML at line", "nomatch.yaml": "matches none of the model's layers",
                }[name] in err, err
    assert main(["recipe", str(tiny), "--target-bpw", "1", "--candidates", "rtn", "--sensitivity-samples", "2",
                 "--calib-seq-len", "48", "-o", str(tmp_path / "none.yaml")]) == 1
    assert "closest reachable is --target-bpw" in capsys.readouterr().err
    assert not (tmp_path / "none.yaml").exists()


def test_quantize_with_a_budget_directly(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny), "--target-bpw", "3", "--candidates", "rtn:W2-g32-asym", "rtn:W4-g32-sym",
                 "--sensitivity-samples", "4", "--calib-seq-len", "48", "-o", str(out), "--no-check"]) == 0
    q = lowbit.load(out)
    body = [s for s in q.size().layers if s.name.startswith("model.layers.")]
    bits = sum(s.nbytes * 8 for s in body) / sum(s.params for s in body)
    assert 2.5 < bits <= 3.0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["recipe"]["target"] == {"bpw": 3.0}


_yaml_values = st.recursive(st.none() | st.booleans() | st.integers(-9, 300) | st.text(max_size=12)
                            | st.sampled_from(["gptq:W4-g128-sym", "rtn:W3-row-asym", "ganq:W2-lut-row", "awq"]),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300),
                 st.dictionaries(st.sampled_from(["lowbit_recipe", "layers", "groups", "target", "x"]), _yaml_values,
                                 max_size=4).map(lambda d: yaml.safe_dump({"lowbit_recipe": 1, **d}))))
def test_fuzz_recipe_reader(text):
    """Any text, and YAML shaped like a recipe: a RecipeFile or one LowbitError line, nothing else."""
    try:
        recipe = recipe_file.parse(text)
    except LowbitError as e:
        assert "\n" not in str(e)
        return
    assert all(isinstance(n, str) for n in recipe.layers)


def _report_rows(path) -> dict[str, list[str]]:
    """recipe_report.md's layer rows: layer -> its cells."""
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in path.read_text().splitlines()
            if ln.startswith("| model.")]
    return {r[0]: r[1:] for r in rows}


def test_budget_run_reports_every_layer_predicted_and_measured(tiny, tmp_path, capsys):
    """`quantize --target-bpw` writes recipe_report.md: every block linear once, with its choice and exact
    bpw as saved, its predicted loss (the sensitivity pass) and measured loss (the block runner); in the
    first block both see the same float inputs and the same GPTQ, so they agree; the decode speed is
    predicted (cost model) and measured (the check's bench of the saved model)."""
    out = tmp_path / "q"
    assert main(["quantize", str(tiny), "--target-bpw", "3", "--candidates", "gptq:W2-g32-asym", "gptq:W4-g32-sym",
                 "--sensitivity-samples", "4", "--calib-samples", "4", "--calib-seq-len", "48", "-o", str(out),
                 "--check-windows", "1"]) == 0
    assert f"per-layer report (choice, predicted and measured loss, bpw, tok/s): {out / 'recipe_report.md'}" \
        in capsys.readouterr().out
    q = lowbit.load(out)
    rows, record = _report_rows(out / "recipe_report.md"), q.info["recipe"]["report"]
    names = block_linears(lowbit.load(tiny).model)
    assert list(rows) == names == list(record["layers"])
    sizes = {s.name: s for s in q.size().layers}
    for n, (choice, bpw, predicted, measured, ratio, micros) in rows.items():
        assert choice == candidates.name(q.plan.layers[n])
        assert float(bpw) == pytest.approx(8 * sizes[n].nbytes / sizes[n].params, abs=5e-4)
        assert float(predicted) > 0 and float(measured) > 0 and float(micros) > 0
        layer = record["layers"][n]
        assert float(ratio) == pytest.approx(layer["measured_loss"] / layer["predicted_loss"], abs=0.006)
        if n.startswith("model.layers.0."):
            assert layer["measured_loss"] == pytest.approx(layer["predicted_loss"], rel=1e-4), n
    assert record["layers"]["model.layers.1.mlp.down_proj"]["measured_loss"] != pytest.approx(
        record["layers"]["model.layers.1.mlp.down_proj"]["predicted_loss"], rel=1e-4)  # block 0 quantized upstream
    text = (out / "recipe_report.md").read_text()
    assert "target: bpw 3.0" in text
    assert re.search(r"decode tokens/s: predicted \d+ .*, measured \d+ \(the saved model, bench\)", text), text


def test_recipe_file_run_reports_the_notes_as_predictions(tiny, tmp_path, capsys):
    r, out = tmp_path / "r.yaml", tmp_path / "q"
    assert main(["recipe", str(tiny), "--target-bpw", "3.5", "--candidates", "rtn:W2-g32-asym", "gptq:W4-g32-sym",
                 "--sensitivity-samples", "4", "--calib-seq-len", "48", "-o", str(r)]) == 0
    read = recipe_file.read(r)
    names = block_linears(lowbit.load(tiny).model)
    assert set(read.predicted) == set(names)  # the head and embedding carry no prediction
    assert main(["quantize", str(tiny), "--recipe", str(r), "-o", str(out), "--calib-samples", "4",
                 "--calib-seq-len", "48", "--no-check"]) == 0
    rows = _report_rows(out / "recipe_report.md")
    assert list(rows) == names and {c[0] for c in rows.values()} == {"rtn:W2-g32-asym", "gptq:W4-g32-sym"}
    for n, (choice, _, predicted, measured, _, _) in rows.items():
        assert float(predicted) == pytest.approx(read.predicted[n], rel=1e-2)
        assert float(measured) > 0  # a calibrated plan: the block runner quantizes (and measures) RTN layers too
    assert "measured — (run without --no-check to measure)" in (out / "recipe_report.md").read_text()
    # rounded without calibration: nothing measures a layer's loss
    (tmp_path / "rtn.yaml").write_text(r.read_text().replace("gptq:W4-g32-sym", "rtn:W4-g32-sym"))
    assert main(["quantize", str(tiny), "--recipe", str(tmp_path / "rtn.yaml"), "-o", str(tmp_path / "rtn"),
                 "--no-check"]) == 0
    capsys.readouterr()
    assert {c[3] for c in _report_rows(tmp_path / "rtn" / "recipe_report.md").values()} == {"—"}


def test_decode_seconds_fuses_like_the_engine_and_matches_the_tps_budget(tiny):
    src = lowbit.load(tiny)
    machine = Machine(this_machine().cpu, this_machine().isa, 2, (10e9, 16e9))
    specs = candidates.parse(["rtn:W2-g32-asym", "rtn:W4-g32-sym"])
    sens = measure(src.model, src.tokenizer, lowbit.calib.builtin("calib"), specs, None, 4, 48, progress=False)
    budget = lambda tps: plan(src.model, QuantX(target_tps=tps, candidates=("rtn:W2-g32-asym", "rtn:W4-g32-sym")),
                              src.tokenizer, "", progress=False, machine=machine, sens=sens)
    with pytest.raises(LowbitError, match="closest reachable is --target-tps") as too_fast:
        budget(1e12)
    fastest = float(str(too_fast.value).split()[-1])
    for tps in (0.5 * fastest, 0.9 * fastest):  # the report's prediction is the budget's own
        r = budget(tps)
        assert 1 / decode_seconds(src.model, r.plan.layers, machine)[1] == \
            pytest.approx(r.summary["predicted"]["tokens_per_s"], rel=1e-9)
    names = block_linears(src.model)
    same = {n: specs[1] for n in names}
    mixed = {**same, "model.layers.0.self_attn.k_proj": specs[0]}
    fused, _ = decode_seconds(src.model, same, machine)
    split, _ = decode_seconds(src.model, mixed, machine)
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    separate = sum(machine.seconds(stored_bytes(specs[1], tuple(src.model.get_submodule(n).weight.shape)),
                                   *src.model.get_submodule(n).weight.shape) for n in qkv)
    assert sum(fused[n] for n in qkv) <= separate  # one matmul streams the three: never slower
    assert split["model.layers.0.self_attn.q_proj"] == pytest.approx(
        machine.seconds(stored_bytes(specs[1], tuple(src.model.get_submodule(qkv[0]).weight.shape)),
                        *src.model.get_submodule(qkv[0]).weight.shape))


def test_benchmark_draws_ppl_against_bpw_in_and_out_of_domain(tmp_path, monkeypatch):
    """benchmarks/recipes.py --png: the recipes' frontier, the uniform schemes and llama.cpp's types, one
    panel per corpus, log perplexity against bits per weight."""
    from matplotlib.image import imread
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import recipes as bench

    scores = lambda ppl: {"pydoc": {"ppl": ppl, "kld": 0.1}, "prose": {"ppl": 2 * ppl, "kld": 0.2}}
    rows = [{"model": "recipe {\"bpw\": 3.0}", "bpw": 3.0, **scores(30.0)},
            {"model": "recipe {\"bpw\": 4.0}", "bpw": 4.0, **scores(20.0)},
            {"model": "uniform gptq:W4-g64-sym", "bpw": 4.25, **scores(21.0)},
            {"model": "llama.cpp Q4_0", "bpw": 4.5, **scores(19.0)}]
    assert bench.draw(rows, str(tmp_path / "r.png")) == [["recipe", "uniform", "llama.cpp"]] * 2
    image = imread(tmp_path / "r.png")
    assert image.shape[1] > image.shape[0] > 300
    assert bench.draw(rows[:2], str(tmp_path / "only.png")) == [["recipe"]] * 2
