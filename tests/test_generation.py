"""The generation loop on a tiny quantized model: exact greedy, streaming, stop rules, cache reuse, chat, CLI."""

import json
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.runtime import Chat, HFDecoder, SamplingParams, decoder_for
from lowbit.runtime.session import Detokenizer, StopStrings

PROMPT = "The quick brown fox"


@pytest.fixture
def q(tiny_quantized_dir):
    return lowbit.load(tiny_quantized_dir)


def _session(q, **kw):
    return q.session(**kw)


def test_greedy_equals_transformers_generate(q):
    s = _session(q, engine=False)
    ids = s.encode(PROMPT)
    out = s.generate(ids, 20)
    with torch.inference_mode():
        ref = q.model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    assert out.tokens == ref[:len(out.tokens)] and len(out.tokens) in (len(ref), 20)


def test_any_decoder_gives_the_universal_logits(q):
    """Whatever decoder_for picks (the native engine where it exists) agrees with the universal one."""
    ids = q.tokenizer(PROMPT).input_ids
    ours, ref = decoder_for(q.model, exact=True), HFDecoder(q.model)
    for step in (ids, [5], [17]):
        a, b = ours.forward(step), ref.forward(step)
        assert a.dtype == torch.float32 and a.shape == (ours.vocab_size,)
        assert torch.allclose(a, b, atol=2e-3 * b.abs().max()), type(ours).__name__
    assert ours.position == ref.position == len(ids) + 2


def test_fast_engine_tracks_the_exact_one(q):
    """decoder_for's default (int8 activations, 8-bit head: llama.cpp's trade) stays close to the exact
    engine: same greedy token, logits within a few percent of their range."""
    fast, exact = decoder_for(q.model), decoder_for(q.model, exact=True)
    if isinstance(exact, HFDecoder):
        pytest.skip("no native engine here")
    ids = q.tokenizer(PROMPT).input_ids
    for step in (ids, [5], [17]):
        a, b = fast.forward(step), exact.forward(step)
        assert not torch.equal(a, b)  # the settings took effect
        assert a.argmax() == b.argmax()
        assert (a - b).abs().max() < 0.05 * (b.max() - b.min())


def test_truncate_then_forward_equals_fresh(q):
    ids = q.tokenizer(PROMPT + " jumps over the lazy dog").input_ids
    d = HFDecoder(q.model)
    d.forward(ids)
    d.truncate(3)
    assert d.position == 3
    again = d.forward(ids[3:6])
    fresh = HFDecoder(q.model).forward(ids[:6])
    assert torch.allclose(again, fresh, atol=1e-5)


def test_streamed_text_is_the_completion(q):
    pieces = []
    out = _session(q).generate(_session(q).encode(PROMPT), 24, on_text=pieces.append)
    assert "".join(pieces) == out.text == q.tokenizer.decode(out.tokens, skip_special_tokens=True)
    assert out.finish_reason == "length" and len(out.tokens) == 24
    assert out.stats.new_tokens == 24 and out.stats.prompt_tokens == len(_session(q).encode(PROMPT))


def test_detokenizer_keeps_multibyte_characters_whole(tiny_tokenizer):
    text = "naïve café — 🎉 déjà vu, 東京"
    ids = tiny_tokenizer(text).input_ids
    d = Detokenizer(tiny_tokenizer, [])
    pieces = [d.add(t) for t in ids] + [d.add(final=True)]
    assert "".join(pieces) == tiny_tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_stop_strings_unit():
    s = StopStrings(["</s>", "STOP"])
    assert s.feed("ab") == ("ab", False)
    assert s.feed("c<") == ("c", False)  # "<" may start "</s>": held back
    assert s.feed("/") == ("", False)
    assert s.feed("s>tail") == ("", True)
    assert s.text == "abc"
    s = StopStrings(["</s>"])
    assert s.feed("x<") == ("x", False)
    assert s.flush() == "<" and s.text == "x<"


def test_stop_string_split_across_tokens(q):
    s = _session(q)
    ids = s.encode(PROMPT)
    full = s.generate(ids, 30)
    pieces = [q.tokenizer.decode(full.tokens[:i], skip_special_tokens=True) for i in range(31)]
    # a stop string made of the end of one token and the start of the next
    i = next(i for i in range(5, 29) if len(pieces[i]) - len(pieces[i - 1]) >= 2
             and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = pieces[i + 1][len(pieces[i]) - 1:len(pieces[i]) + 1]
    streamed = []
    out = s.generate(ids, 30, stop=[stop], on_text=streamed.append)
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.index(stop)] == "".join(streamed)
    assert stop not in "".join(streamed)


def test_stop_token_and_max_tokens(q):
    s = _session(q)
    ids = s.encode(PROMPT)
    full = s.generate(ids, 12)
    cut = full.tokens[5]
    if cut in full.tokens[:5]:
        pytest.skip("the tiny model repeats that token earlier")
    out = s.generate(ids, 12, stop_tokens=[cut])
    assert out.finish_reason == "stop" and out.tokens == full.tokens[:6]
    assert out.text == q.tokenizer.decode(full.tokens[:5], skip_special_tokens=True)
    assert s.generate(ids, 3).tokens == full.tokens[:3]


def test_prefix_cache_reuse_changes_nothing_but_time(q):
    # exact: with int8 decode activations the cached positions (decoded) and a fresh prefill (fp32
    # GEMM) round differently, so only the exact engine reproduces tokens bit for bit
    s = _session(q, exact=True)
    first = s.encode(PROMPT)
    a = s.generate(first, 8)
    longer = first + a.tokens + s.encode(" and then")
    b = s.generate(longer, 8)
    assert b.stats.cached_tokens == len(first) + len(a.tokens) - 1  # all but the last reply token was cached
    assert b.tokens == _session(q, exact=True).generate(longer, 8).tokens


def test_seeded_sampling_reproduces(q):
    s = _session(q)
    ids = s.encode(PROMPT)
    p = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.1, seed=5)
    assert s.generate(ids, 16, p).tokens == s.generate(ids, 16, p).tokens
    assert s.generate(ids, 16, p).tokens != s.generate(ids, 16, SamplingParams(temperature=1.0, seed=6)).tokens


def test_context_limits_and_cancel(q):
    s = _session(q, max_context=40)
    with pytest.raises(LowbitError, match="context"):
        s.generate(list(range(5, 45)), 4)
    out = s.generate(list(range(5, 35)), 100)
    assert out.finish_reason == "length" and len(out.tokens) == 40 - 30 + 1
    calls = []
    out = s.generate(list(range(5, 15)), 100, cancelled=lambda: len(calls.append(1) or calls) > 3)
    assert out.finish_reason == "cancelled" and len(out.tokens) == 2  # polled at the prefill and per token


def test_chat_keeps_the_cache_between_turns(q):
    chat = Chat(_session(q), system="You are terse.")
    one = chat.send("Hello there", 6)
    two = chat.send("Tell me more", 6)
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == one.text
    assert two.stats.cached_tokens > one.stats.prompt_tokens // 2
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "You are terse."}]


def test_chat_needs_a_template(q):
    q.tokenizer.chat_template = None
    with pytest.raises(LowbitError, match="chat template"):
        Chat(_session(q)).send("hi")


def test_api_generate_keeps_its_signature(q):
    text, stats = q.generate(PROMPT, 10, 0.0, None)
    assert stats.new_tokens == 10 and stats.prefill_tps > 0 and stats.decode_tps > 0
    assert text == _session(q).generate(_session(q).encode(PROMPT), 10).text


def _cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "lowbit", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_cli_chat_reads_turns_from_stdin(tiny_quantized_dir):
    r = _cli("chat", str(tiny_quantized_dir), "--max-tokens", "5", "--temperature", "0.7", "--top-k", "20",
             "--seed", "1", stdin="Hello there\n\n/reset\nHow are you?\nAnd then?\n")
    assert r.returncode == 0, r.stderr
    stats = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert len(stats) == 3 and "from cache" in stats[2]
    assert r.stdout.count("\n") == 3  # a reply a line (splitlines would also cut at control characters a reply may hold)


def _main(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_generate_and_bench_json(capsys, tiny_quantized_dir):
    rc, out, err = _main(capsys, "generate", tiny_quantized_dir, PROMPT, "--max-tokens", "6", "--threads", "1",
                         "--top-k", "5", "--temperature", "0.5", "--stop", "zzz")
    assert rc == 0 and out.startswith(PROMPT) and "decode" in err, err
    rc, out, err = _main(capsys, "bench", tiny_quantized_dir, "--json", "--prompt-tokens", "32", "--gen-tokens", "8",
                         "--runs", "1", "--threads", "1")
    assert rc == 0, err
    out = json.loads(out)
    assert out["prefill_tps"] > 0 and out["decode_tps"] > 0 and out["peak_rss_mb"] > 0
    assert out["bytes_per_token"] > 0 and out["roofline_pct"] > 0  # > 100% here: the tiny model fits in cache


@pytest.mark.parametrize("args", [["chat"], ["bench", "--json"], ["serve", "--port", "0"]])
def test_cli_missing_model_is_one_line(capsys, tmp_path, args):
    rc, _, err = _main(capsys, args[0], tmp_path / "no-such-model", *args[1:])
    assert rc == 1 and err.count("\n") == 1 and "no-such-model" in err, err


def test_cli_bad_sampling_value_is_one_line(capsys, tiny_quantized_dir):
    rc, _, err = _main(capsys, "generate", tiny_quantized_dir, "hi", "--top-p", "0")
    assert rc == 1 and err.startswith("lowbit: error: top_p"), err
