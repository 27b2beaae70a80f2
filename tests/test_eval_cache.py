"""The reference's cached states (eval/metrics.SourceScores): a second evaluation against the same
source reads them instead of running the source, with the very same numbers; a damaged, foreign or
stale cache is computed again; a changed source is a new key."""

import os

import pytest
import torch

import lowbit
from lowbit import api
from lowbit.eval import metrics
from lowbit.models import fingerprint


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "eval"


def _files(cache):
    return sorted(cache.glob("*.safetensors")) if cache.exists() else []


def test_second_evaluation_reads_the_cached_states(tiny_model_dir, tmp_path, cache):
    api.quantize_to(tiny_model_dir(), tmp_path / "q", lowbit.RTN(bits=3, group_size=32), check_windows=0,
                    progress=False)
    q = api.load(tmp_path / "q")
    first = q.evaluate(kld=True, ctx=128, max_windows=3, progress=False)
    [saved] = _files(cache)
    states = metrics.load_file(saved)["states"]
    # a streamed HF source keeps every position's last-block output; the engine the scored positions'
    assert states.dtype == torch.float32 and states.shape[0] in (first.tokens, first.tokens + first.windows)
    again = q.evaluate(kld=True, ctx=128, max_windows=3, progress=False)
    assert (again.kld, again.source_ppl, again.ppl) == (first.kld, first.source_ppl, first.ppl)
    # the states are what is read: other values there give other numbers (so the file is really used)
    metrics.save_file({"states": states * 0.5}, str(saved))
    assert q.evaluate(kld=True, ctx=128, max_windows=3, progress=False).source_ppl != first.source_ppl
    # damaged or of another shape: computed again, the same numbers as without a cache, and rewritten
    for damage in (b"not a safetensors file", None):
        if damage is None:
            metrics.save_file({"states": states[:-1].contiguous()}, str(saved))
        else:
            saved.write_bytes(damage)
        redo = q.evaluate(kld=True, ctx=128, max_windows=3, progress=False)
        assert (redo.kld, redo.source_ppl) == (first.kld, first.source_ppl)
        assert torch.equal(metrics.load_file(saved)["states"], states)
    # another text window (ctx) is another key
    q.evaluate(kld=True, ctx=96, max_windows=2, progress=False)
    assert len(_files(cache)) == 2


def test_engine_source_states_are_cached_too(tiny_model_dir, cache):
    """An eager source on the engine (as the default GGUF is): the scored positions' final states."""
    path = tiny_model_dir()
    src, q = lowbit.load(path), lowbit.quantize(lowbit.load(path), lowbit.RTN(bits=4, group_size=32))
    text = lowbit.calib.builtin("eval")[:4000]
    runs = [metrics.evaluate(q.model, src.tokenizer, text, ctx=100, max_windows=4, source=src.model,
                             progress=False, source_key="a tiny source") for _ in range(2)]
    [saved] = _files(cache)
    states = metrics.load_file(saved)["states"]
    assert states.shape[0] == runs[0].tokens
    assert runs[0] == runs[1] and runs[0].kld > 0
    metrics.save_file({"states": states * 0.5}, str(saved))  # what is read is the file
    assert metrics.evaluate(q.model, src.tokenizer, text, ctx=100, max_windows=4, source=src.model,
                            progress=False, source_key="a tiny source").source_ppl != runs[0].source_ppl


def test_fingerprint_follows_the_source_files(tiny_model_dir):
    src = tiny_model_dir()
    before = fingerprint(str(src))
    weights = next(src.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert fingerprint(str(src)) != before
    assert fingerprint("default") == fingerprint("default")
