"""How evaluation scores (eval/metrics.py): llama-perplexity's windows and positions (`scoring="llama.cpp"`,
BOS in front and on each window's first token) against a hand computation; the quantized model on int8
activations by default in the API and CLI, fp32 with `exact`, the source always on fp32. Tiny models only."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.calib import builtin
from lowbit.cli import main
from lowbit.eval import metrics
from lowbit.kernels import switches


class WithBos:
    """The tiny tokenizer as one that puts BOS in front of a text (as Llama's do; llama.cpp's add_bos)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.bos_token_id = tokenizer, tokenizer.bos_token_id

    def __call__(self, text, add_special_tokens=True):
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


@pytest.fixture
def models(tiny_model_dir):
    src = lowbit.load(tiny_model_dir())
    q = lowbit.quantize(lowbit.load(tiny_model_dir()), lowbit.RTN(bits=4, group_size=32), lm_head=True, progress=False)
    return src, q


TEXT = builtin("eval")[:6000]


def test_llamacpp_windows_are_whole_disjoint_and_score_the_second_half():
    assert metrics.llamacpp_windows(10, 4) == [(0, 4, 3), (4, 8, 3)]  # the 2 tokens left over: not a window
    assert metrics.llamacpp_windows(2048, 512, max_windows=3) == [(0, 512, 257), (512, 1024, 257), (1024, 1536, 257)]
    assert metrics.llamacpp_windows(1025, 512) == [(0, 512, 257), (512, 1024, 257)]
    with pytest.raises(lowbit.LowbitError, match="at least 2 × ctx = 1024 tokens"):
        metrics.llamacpp_windows(1023, 512)  # llama-perplexity refuses fewer than two windows' worth


def test_windows_put_bos_in_front_and_on_each_window(tiny_tokenizer):
    tok = WithBos(tiny_tokenizer)
    text = TEXT[:800]
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    scored = metrics.scored_windows(tok, text, 16, scoring="llama.cpp")
    bos = tok.bos_token_id
    stream = [bos] + ids  # the text as llama.cpp tokenizes it
    assert len(scored) == len(stream) // 16
    for i, (window, first) in enumerate(scored):
        assert first == 9
        assert window.tolist() == [bos] + stream[i * 16 + 1:(i + 1) * 16]
    # a tokenizer that adds no BOS: the windows are the plain text's, nothing substituted
    plain = metrics.scored_windows(tiny_tokenizer, text, 16, scoring="llama.cpp")
    assert [w.tolist() for w, _ in plain] == [ids[i * 16:(i + 1) * 16] for i in range(len(ids) // 16)]


def _hand_llamacpp(model, stream: list[int], bos: int, ctx: int, windows: int) -> tuple[float, int]:
    """llama-perplexity's loop, written out: (perplexity, tokens scored) through the model's own forward."""
    nll, count = 0.0, 0
    for i in range(windows):
        window = torch.tensor(stream[i * ctx:(i + 1) * ctx])
        window[0] = bos
        with torch.no_grad():
            lp = F.log_softmax(model(window[None]).logits[0].float(), -1)
        for pos in range(ctx // 2 + 1, ctx):  # logits at pos-1 predict token pos
            nll -= lp[pos - 1, window[pos]].item()
            count += 1
    return math.exp(nll / count), count


def test_llamacpp_scoring_equals_a_hand_computation(models, tiny_tokenizer):
    src, q = models
    tok = WithBos(tiny_tokenizer)
    stream = tok(TEXT)["input_ids"]
    want, count = _hand_llamacpp(q.model, stream, tok.bos_token_id, 64, 3)
    got = metrics.evaluate(q.model, tok, TEXT, ctx=64, max_windows=3, scoring="llama.cpp", progress=False)
    assert (got.tokens, got.windows, got.scoring) == (count, 3, "llama.cpp") and count == 3 * 31
    assert got.ppl == pytest.approx(want, rel=1e-4)
    ours = metrics.evaluate(q.model, tok, TEXT, ctx=64, max_windows=3, progress=False)
    assert ours.tokens == 3 * 63 and ours.ppl != pytest.approx(got.ppl, rel=1e-3)  # other positions


def test_stride_is_ours_only(models, tiny_tokenizer):
    with pytest.raises(lowbit.LowbitError, match="stride is lowbit's scoring only"):
        metrics.evaluate(models[1].model, tiny_tokenizer, TEXT, ctx=64, stride=32, scoring="llama.cpp")


def _hand_ppl(model, tokenizer, int8: bool) -> float:
    """Our windows (ctx 64, disjoint) through the model's own forward, its matmuls on int8 or fp32."""
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    nll, count = 0.0, 0
    with switches.int8_activations_set(int8), torch.no_grad():
        for begin in range(0, 3 * 64, 64):
            window = ids[begin:begin + 64]
            lp = F.log_softmax(model(window[None]).logits[0, :-1].float(), -1)
            nll -= lp.gather(1, window[1:, None]).sum().item()
            count += len(window) - 1
    return math.exp(nll / count)


def test_int8_activations_and_exact(models, tiny_tokenizer):
    src, q = models
    run = dict(ctx=64, max_windows=3, progress=False)
    exact = metrics.evaluate(q.model, tiny_tokenizer, TEXT, source=src.model, **run)  # the library's default
    fast = metrics.evaluate(q.model, tiny_tokenizer, TEXT, source=src.model, exact=False, **run)
    assert exact.exact and not fast.exact
    assert not switches.int8_activations()  # the switch is back where it was
    # each is its own path's numbers: fp32 as before this option existed, int8 the engine's generation path
    want = {int8: _hand_ppl(q.model, tiny_tokenizer, int8) for int8 in (False, True)}
    assert exact.ppl == pytest.approx(want[False], rel=5e-6)
    assert fast.ppl == pytest.approx(want[True], rel=5e-6)
    assert abs(fast.ppl / exact.ppl - 1) > 2e-5 and fast.kld != exact.kld  # ~5e-5 apart on this model
    # the source is exact whatever the model runs on, even with the process-wide switch on
    assert fast.source_ppl == exact.source_ppl
    with switches.int8_activations_set(True):
        again = metrics.evaluate(q.model, tiny_tokenizer, TEXT, source=q.model, exact=False, **run)
    assert again.source_ppl == exact.ppl and again.ppl == fast.ppl


def test_cli_scores_int8_unless_exact(tiny_quantized_dir, capsys):
    args = ["eval", str(tiny_quantized_dir), "--ctx", "64", "--max-windows", "2", "--json"]
    results = []
    for extra in ([], ["--exact"], ["--scoring", "llama.cpp"]):
        assert main(args + extra) == 0
        results.append(json.loads(capsys.readouterr().out))
    default, exact, llamacpp = results
    assert (default["exact"], exact["exact"], llamacpp["exact"]) == (False, True, False)
    assert default["ppl"] != exact["ppl"] and default["tokens"] == exact["tokens"] == 2 * 63
    assert llamacpp["scoring"] == "llama.cpp" and llamacpp["tokens"] == 2 * 31
    assert main(args[:-1] + ["--exact"]) == 0
    assert "the model on fp32 activations" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [(["--scoring", "foo"], "scoring must be one of lowbit, llama.cpp, got 'foo'"),
                                           (["--scoring", "llama.cpp", "--stride", "32"], "stride")])
def test_cli_bad_scoring_is_one_line(tiny_quantized_dir, capsys, extra, needle):
    capsys.readouterr()
    assert main(["eval", str(tiny_quantized_dir), "--ctx", "64", "--max-windows", "2", *extra]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("lowbit: error: ") and needle in err and "Traceback" not in err


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_head_in_row_chunks_is_the_head(models, monkeypatch, chunk_rows):
    """_Head runs a quantized head a few rows at a time into its reused buffer: the same logits as the
    head on all rows at once (rows are independent; a kernel may take another path for one row: float
    rounding), whatever the chunk, for any number of rows."""
    _, q = models
    head = q.model.get_output_embeddings()
    assert type(head) is not torch.nn.Linear  # the chunked path
    monkeypatch.setattr(metrics._Head, "CHUNK_BYTES", chunk_rows * 4 * head.out_features)
    runs = metrics._Head(q.model)
    with torch.inference_mode():
        for n in (23, 5, 23):  # grown, then a shorter call into the same buffer
            states = torch.randn(n, head.in_features)
            torch.testing.assert_close(runs.logits(states), head(states).float(), rtol=1e-5, atol=1e-6)
