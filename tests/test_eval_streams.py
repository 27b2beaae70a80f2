"""Windows scored on several streams (eval/streams.py: each its own engine on one thread): the runner
itself, and evaluations that give the one-stream numbers bit for bit."""

import threading

import pytest
import torch

import lowbit
from lowbit.calib import load as load_text
from lowbit.eval import evaluate, metrics, source_cache, streams
from lowbit.kernels.cpu import threads as kernel_threads


def test_streams_run_side_by_side_and_results_keep_job_order():
    together = threading.Barrier(3, timeout=30)  # every stream's first job waits for the other two
    made, seen = [], set()

    def make():
        made.append(object())
        return made[-1]

    def work(state, j):
        if state not in seen:
            seen.add(state)
            together.wait()
        return j * j

    assert streams.run(20, "first", make, work, 3) == [j * j for j in range(20)]
    assert len(made) == 2 and len(seen) == 3


def test_an_error_stops_every_stream():
    ran = []

    def work(state, j):
        ran.append(j)
        if j == 2:
            raise ValueError("bad window")
        return j

    with pytest.raises(ValueError, match="bad window"):
        streams.run(1000, None, lambda: None, work, 2)
    assert len(ran) < 10


def test_one_stream_is_the_calling_thread():
    caller, done = threading.get_ident(), []
    out = streams.run(3, "s", lambda: pytest.fail("one stream builds nothing"),
                      lambda s, j: (s, threading.get_ident() == caller), 1, lambda: done.append(1))
    assert out == [("s", True)] * 3 and len(done) == 3


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The evaluation cache in a scratch folder (the compiled kernels stay where they are)."""
    monkeypatch.setattr(source_cache, "directory", lambda: tmp_path / "eval")


def test_two_streams_give_the_one_stream_numbers(tiny_model_dir, tiny_tokenizer, cache, thread_count, monkeypatch):
    """Two threads: the warm evaluation runs two streams (two engines built), its numbers those of
    the first, cold one (one stream, in window order, writing the records) and of one thread, bit for
    bit; the kernels' and torch's thread counts are the caller's afterwards."""
    path = tiny_model_dir()
    src, q = lowbit.load(path), lowbit.quantize(lowbit.load(path), lowbit.RTN(bits=4, group_size=32), progress=False)
    counts, builds = [], []
    run, build = streams.run, metrics.load_decoder
    monkeypatch.setattr(streams, "run", lambda *a: counts.append(a[4]) or run(*a))
    monkeypatch.setattr(metrics, "load_decoder", lambda *a, **k: builds.append(1) or build(*a, **k))
    text, kw = load_text("eval"), dict(ctx=128, max_windows=8, progress=False, exact=False)
    thread_count(2)
    intra = torch.get_num_threads()
    cold = evaluate(q.model, src.tokenizer, text, source=src.model, source_key="tiny", **kw)
    assert counts == [1] and len(builds) == 2  # the model's engine and the source's
    warm = evaluate(q.model, src.tokenizer, text, source=src.model, source_key="tiny", **kw)
    assert counts == [1, 2] and len(builds) == 4
    assert kernel_threads.get() == 2 and torch.get_num_threads() == intra
    ppl_only = evaluate(q.model, src.tokenizer, text, **kw)
    thread_count(1)
    one = evaluate(q.model, src.tokenizer, text, source=src.model, source_key="tiny", **kw)
    assert counts[-2:] == [2, 1]
    assert warm == cold == one and ppl_only.ppl == one.ppl
