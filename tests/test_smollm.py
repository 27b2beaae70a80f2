"""The real embedded model (SmolLM2-135M-Instruct): loading, accuracy ordering, exact reload, CLI.

A few evaluation windows only; full-size evaluations live in benchmarks/ and BENCHMARKS.md.
"""

import copy
import json

import pytest
import torch

import lowbit
from lowbit.calib import load as load_text
from lowbit.cli import main
from lowbit.eval import evaluate, model_size
from lowbit.models import default_gguf, load_source
from lowbit.models.source import _from_pretrained

pytestmark = pytest.mark.slow
WINDOWS = 3


@pytest.fixture(scope="module")
def smollm():
    return load_source()


@pytest.fixture(scope="module")
def eval_text():
    return load_text("eval")


def _quantized(smollm, **spec):
    return lowbit.quantize(copy.deepcopy(smollm.model), lowbit.RTN(**spec), tokenizer=smollm.tokenizer,
                           progress=False)


def test_default_model_is_smollm2(smollm):
    cfg = smollm.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert smollm.source == "default"
    assert smollm.tokenizer.decode(smollm.tokenizer("Hello, world").input_ids) == "Hello, world"


def test_cached_conversion_equals_the_gguf(smollm, eval_text):
    """The default loads from a safetensors copy of the dequantized GGUF: it must be the same model."""
    gguf = default_gguf()
    model, tokenizer = _from_pretrained(gguf.parent, torch.float32, gguf.name)
    ids = tokenizer(eval_text).input_ids
    assert smollm.tokenizer(eval_text).input_ids == ids
    x = torch.tensor([ids[:128]])
    with torch.inference_mode():
        assert torch.equal(model(x).logits, smollm.model(x).logits)


def test_source_perplexity_is_sane(smollm, eval_text):
    r = evaluate(smollm.model, smollm.tokenizer, eval_text, max_windows=WINDOWS, progress=False)
    assert r.tokens == WINDOWS * 511 and r.windows == WINDOWS
    assert 5 < r.ppl < 30  # about 12 on the whole held-out split


def test_rtn_accuracy_ordering(smollm, eval_text):
    results = {}
    for bits in (8, 4, 3):
        q = _quantized(smollm, bits=bits, group_size=128)
        results[bits] = evaluate(q.model, smollm.tokenizer, eval_text, max_windows=WINDOWS, source=smollm.model,
                                 progress=False)
    src = results[8].source_ppl
    assert abs(results[8].ppl / src - 1) < 0.01  # W8 g128 within 1% of the source
    assert results[8].kld < results[4].kld < results[3].kld
    assert results[8].ppl < results[4].ppl < results[3].ppl


def test_save_load_generate_is_exact(smollm, tmp_path):
    q = _quantized(smollm, bits=4, group_size=64, sym=False)
    ids = smollm.tokenizer("The Python interpreter", return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = q.model(ids).logits
    q.save(tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, expected)
    text, stats = loaded.generate("The Python interpreter", max_new_tokens=4)
    assert stats.new_tokens == 4 and text.strip()
    size = model_size(loaded.model)
    assert len(size.layers) == 30 * 7
    assert size.quantized_bpw == pytest.approx(4 + 24 / 64)


def test_cli_quantize_eval_inspect(tmp_path, capsys):
    out = tmp_path / "w4"
    assert main(["quantize", "-o", str(out), "--bits", "4", "--group-size", "32", "--check-windows", "1"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "KL divergence" in printed and "tok/s" in printed
    assert "bits/weight" in printed and "sample: Once upon a time" in printed
    assert main(["eval", str(out), "--kld", "--json", "--max-windows", "1", "--ctx", "256"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"ppl", "tokens", "kld"} and result["tokens"] == 255 and result["kld"] > 0
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.29.mlp.down_proj" in table and "uniform 4b g32 sym" in table
    assert main(["generate", str(out), "Hello", "--max-new-tokens", "3", "--seed", "1",
                 "--temperature", "0.7"]) == 0
    printed = capsys.readouterr().out
    continuation, stats = lowbit.load(out).generate("Hello", 3, temperature=0.7, seed=1)  # the same draw
    assert stats.new_tokens == 3 and continuation.strip()
    assert printed == "Hello" + continuation  # the echoed prompt, then exactly the model's new text
