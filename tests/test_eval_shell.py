"""`lowbit eval` loads a lowbit directory as a shell for the native engine (io/shell.py) and its
tokenizer from tokenizer.json (io/tokenizer_file.py), without transformers' modeling code: the engine
gets the same weights and RoPE tables, so logits, perplexity and KLD are bit-identical to the
transformers-built model's; configurations the shell does not reproduce load through transformers."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.calib import load as load_text
from lowbit.eval import metrics
from lowbit.io import shell, tokenizer_file
from lowbit.runtime import engine


def _same_model(a, b) -> None:
    """The same tensors under the same names, and the same RoPE tables for the engine."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    layers, hd = a.config.num_hidden_layers, a.model.layers[0].self_attn.head_dim
    (ta, _), (tb, _) = (engine._rope_tables(m, ["full_attention"] * layers, 512, hd) for m in (a, b))
    assert all(torch.equal(x, y) for pa, pb in zip(ta, tb) for x, y in zip(pa, pb))


def _same_logits(a, b, tokenizer, windows: int, modes=(True, False)) -> None:
    """Every logit of the first `windows` windows, on fp32 and/or int8 activations (`modes`: exact)."""
    scored = metrics.scored_windows(tokenizer, load_text("eval"), 512, max_windows=windows)
    for exact in modes:
        sa, sb = (metrics.logit_scorer(m, 512, exact=exact) for m in (a, b))
        for ids, first in scored:
            assert torch.equal(sa(ids, first).clone(), sb(ids, first))


def test_shell_gives_the_transformers_models_logits(tiny_quantized_dir):
    quick, full = lowbit.load(tiny_quantized_dir, shell=True), lowbit.load(tiny_quantized_dir)
    assert isinstance(quick.model, shell.ShellForCausalLM) and isinstance(quick.tokenizer, tokenizer_file.FileTokenizer)
    assert not isinstance(full.model, shell.ShellForCausalLM)
    _same_model(quick.model, full.model)
    _same_logits(quick.model, full.model, full.tokenizer, windows=2)
    for scoring in ("lowbit", "llama.cpp"):
        run = dict(max_windows=2, progress=False, scoring=scoring)
        assert quick.evaluate(**run) == full.evaluate(**run)


def test_shell_forward_is_the_transformers_models(tiny_quantized_dir):
    """Where the engine does not run (the universal path), the shell's forward is the real model's."""
    quick, full = lowbit.load(tiny_quantized_dir, shell=True), lowbit.load(tiny_quantized_dir)
    ids = torch.arange(20)[None]
    assert torch.equal(quick.model(ids).logits, full.model(ids).logits)
    assert not any(p.is_meta for p in quick.model.full().parameters())


def test_tied_float_head_is_tied(tiny_model_dir, tmp_path):
    src = lowbit.load(tiny_model_dir("llama", tie_word_embeddings=True))
    lowbit.quantize(src, lowbit.RTN(bits=4, group_size=32), progress=False).save(tmp_path / "q")
    quick, full = lowbit.load(tmp_path / "q", shell=True), lowbit.load(tmp_path / "q")
    assert isinstance(quick.model, shell.ShellForCausalLM)
    assert quick.model.lm_head.weight is quick.model.model.embed_tokens.weight
    _same_model(quick.model, full.model)
    _same_logits(quick.model, full.model, full.tokenizer, windows=1)


@pytest.mark.parametrize("change", [{"model_type": "qwen2"}, {"hidden_act": "gelu"},
                                    {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}])
def test_configs_the_shell_does_not_reproduce_load_through_transformers(tiny_quantized_dir, tmp_path, change):
    d = shutil.copytree(tiny_quantized_dir, tmp_path / "q")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **change}))
    assert not isinstance(lowbit.load(d, shell=True).model, shell.ShellForCausalLM)


@pytest.mark.parametrize("change", [{"add_bos_token": True}, {"tokenizer_class": "LlamaTokenizer"},
                                    {"bos_token": "<never-added>"}, {"added_tokens_decoder": {}}])
def test_tokenizer_configs_transformers_would_change_are_not_read(tiny_quantized_dir, tmp_path, change):
    d = shutil.copytree(tiny_quantized_dir, tmp_path / "q")
    assert tokenizer_file.read(d) is not None
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
    assert tokenizer_file.read(d) is None


def test_eval_command_imports_no_transformers_modeling(tiny_quantized_dir):
    """The point of the shell: `lowbit eval` of a lowbit Llama never imports transformers' modeling
    code (nor torch._dynamo, which initializing a module on meta would pull in)."""
    code = ("import sys; from lowbit.cli import main; main(['eval', sys.argv[1], '--max-windows', '1', '--json']); "
            "print([m for m in ('transformers.modeling_utils', 'torch._dynamo', 'transformers.tokenization_utils_base')"
            " if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_quantized_dir)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result, imported = out.stdout.strip().splitlines()
    assert json.loads(result)["windows"] == 1 and imported == "[]"


@pytest.mark.slow
def test_smollm2_shell_is_bit_identical(smollm_w4_dir):
    """The real model (W4A16-g32, W8 head shared with the embedding): tokens of the whole held-out text,
    weights, RoPE tables and every logit of a window (int8 activations, as `lowbit eval` runs it),
    equal."""
    quick, full = lowbit.load(smollm_w4_dir, shell=True), lowbit.load(smollm_w4_dir)
    assert isinstance(quick.model, shell.ShellForCausalLM) and isinstance(quick.tokenizer, tokenizer_file.FileTokenizer)
    text = load_text("eval")
    ids = [t(text, add_special_tokens=False)["input_ids"] for t in (quick.tokenizer, full.tokenizer)]
    assert ids[0] == ids[1]
    assert metrics._bos(quick.tokenizer) == metrics._bos(full.tokenizer)
    _same_model(quick.model, full.model)
    _same_logits(quick.model, full.model, full.tokenizer, windows=1, modes=(False,))
