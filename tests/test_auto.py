"""The automatic flow: candidates within the budget, the closest to the source kept, a report written."""

import json

import lowbit
from lowbit.calib import builtin
from lowbit.cli import main
from lowbit.recipes import split_holdout


def test_holdout_split_is_disjoint_and_fixed():
    text = builtin("calib")
    fit, held = split_holdout(text)
    assert fit + held == text and 0.05 < len(held) / len(text) < 0.15
    assert split_holdout(text) == (fit, held)


def test_auto_keeps_the_closest_method(tiny_model_dir):
    q = lowbit.quantize(tiny_model_dir("llama"), lowbit.Auto(bits=3, group_size=32, candidates=("rtn", "gptq", "awq")),
                        calib_samples=6, calib_seq_len=48, progress=False)
    info = q.lowbit_info["auto"]
    rows = {r["method"]: r for r in info["rows"]}
    assert set(rows) == {"rtn", "gptq", "awq"}
    best = min(rows.values(), key=lambda r: r["kld"])
    assert info["chosen"] == best["method"] == q.lowbit_info["method"]["method"]


def test_auto_cli_respects_the_budget_and_writes_a_report(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "auto"
    rc = main(["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--method", "auto", "--bits", "3",
               "--group-size", "32", "--budget-minutes", "0", "--calib-samples", "4", "--calib-seq-len", "48",
               "--no-check"])
    assert rc == 0
    report = (out / "auto_report.md").read_text()
    assert "chose rtn" in report and report.count("skipped") == 4
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["method"]["method"] == "rtn" and config["auto"]["chosen"] == "rtn"
    assert "| rtn |" in capsys.readouterr().out
