"""The automatic flow: candidates within the budget, the closest to the source kept, a report written."""

import json

import torch

import lowbit
from lowbit.calib import builtin
from lowbit.calib import load as load_text
from lowbit.cli import main
from lowbit.eval import evaluate
from lowbit.methods import config_for
from lowbit.methods import RTN
from lowbit.recipes import EDGE, split_holdout


def test_holdout_split_is_disjoint_and_fixed():
    text = builtin("calib")
    fit, held = split_holdout(text)
    assert fit + held == text and 0.05 < len(held) / len(text) < 0.15
    assert split_holdout(text) == (fit, held)


def test_auto_keeps_the_closest_method(tiny_model_dir):
    """The choice agrees with a measurement of its own: each candidate quantized alone on the fitting
    part of the text, its KL divergence from the float model on the held-out part; the kept model is
    the one with the smallest (its logits, not the last candidate's)."""
    path = tiny_model_dir("llama")
    opts = dict(calib_samples=6, calib_seq_len=48, progress=False)
    auto = lowbit.Auto(bits=3, group_size=32, candidates=("rtn", "gptq", "awq"))
    q = lowbit.quantize(path, auto, **opts)
    fit, held_out = split_holdout(load_text("calib"))  # the default calibration text, which auto splits
    source, ids = lowbit.load(path), torch.arange(3, 60).unsqueeze(0)
    alone, kld = {}, {}
    for name in auto.candidates:
        alone[name] = lowbit.quantize(path, config_for(name, bits=3, group_size=32), calib_text=fit, **opts)
        kld[name] = evaluate(alone[name].model, source.tokenizer, held_out, max_windows=8, source=source.model,
                             progress=False).kld
    winner = min(kld, key=kld.get)
    assert q.info["auto"]["chosen"] == winner
    assert q.plan == alone[winner].plan
    with torch.no_grad():
        assert torch.equal(q.model(ids).logits, alone[winner].model(ids).logits)


def test_auto_cli_respects_the_budget_and_writes_a_report(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "auto"
    rc = main(["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--method", "auto", "--bits", "3",
               "--group-size", "32", "--budget-minutes", "0", "--calib-samples", "4", "--calib-seq-len", "48",
               "--no-check"])
    assert rc == 0
    report = (out / "auto_report.md").read_text()
    assert "chose rtn" in report and report.count("skipped") == 4
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    # the chosen method over the blocks; the command's 8-bit head and embedding (recipes.EDGE) beside it
    assert [entry["spec"] for entry in config["plan"]] == [RTN(bits=3, group_size=32).to_dict(), EDGE.to_dict()]
    assert config["auto"]["chosen"] == "rtn"
    assert "| rtn |" in capsys.readouterr().out
