"""The source's cached scores (eval/metrics.SourceScores, eval/source_cache.py): a second evaluation
against the same source reads them instead of loading and running the source, with the very same
numbers; the KL from the record is the exact one to its rounding; a damaged, foreign or stale cache is
computed again; a changed source is a new key; the cache stays under its cap, least recently used out
first; whatever the bytes, the reader never raises."""

import os
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit import api
from lowbit.eval import metrics, source_cache
from lowbit.models import fingerprint


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "eval"


def _files(cache):
    return sorted(cache.glob("*" + source_cache.SUFFIX)) if cache.exists() else []


def _rewrite_meta(path, rows, change):
    """Apply `change` to the file's meta column values in place (the header and size stay valid)."""
    data = bytearray(path.read_bytes())
    at = len(data) - rows * 32
    meta = torch.frombuffer(data[at:], dtype=torch.float64).view(rows, 4).clone()
    change(meta)
    data[at:] = meta.numpy().tobytes()
    path.write_bytes(bytes(data))


@pytest.fixture
def quantized(tiny_model_dir, tmp_path):
    api.quantize_to(tiny_model_dir(), tmp_path / "q", lowbit.RTN(bits=3, group_size=32), check_windows=0,
                    progress=False)
    return api.load(tmp_path / "q")


def test_second_evaluation_reads_the_cache_and_never_loads_the_source(quantized, cache, monkeypatch):
    q = quantized
    first = q.evaluate(kld=True, ctx=128, max_windows=3, progress=False)
    [saved] = _files(cache)
    data = saved.read_bytes()
    monkeypatch.setattr(api, "load_reference", lambda source: pytest.fail("the source was loaded"))
    again = q.evaluate(kld=True, ctx=128, max_windows=3, progress=False)
    assert (again.kld, again.source_ppl, again.ppl) == (first.kld, first.source_ppl, first.ppl)
    # the file is what is read: other values there give other numbers
    _rewrite_meta(saved, first.tokens, lambda m: m[:, 2].mul_(0.5))
    assert q.evaluate(kld=True, ctx=128, max_windows=3, progress=False).source_ppl != first.source_ppl
    monkeypatch.undo()
    monkeypatch.setenv("LOWBIT_CACHE", str(cache.parent))
    # damaged, foreign, truncated or with impossible values: computed again, the same numbers, rewritten
    for damage in (b"not a cache file", data[:-8], data.replace(b"128", b"129", 1), None):
        if damage is None:
            saved.write_bytes(data)
            _rewrite_meta(saved, first.tokens, lambda m: m[:, 1].fill_(float("nan")))
        else:
            saved.write_bytes(damage)
        redo = q.evaluate(kld=True, ctx=128, max_windows=3, progress=False)
        assert (redo.kld, redo.source_ppl, redo.ppl) == (first.kld, first.source_ppl, first.ppl)
        assert saved.read_bytes() == data
    # another text window (ctx) is another key
    q.evaluate(kld=True, ctx=96, max_windows=2, progress=False)
    assert len(_files(cache)) == 2


def test_cached_kl_is_the_exact_kl_to_its_rounding(tiny_model_dir, cache):
    """An eager source on the engine (as the default GGUF is) and through transformers: with a key the
    KL's cross term comes from the record, the same first run and second, within 1e-4 (here ~1e-7) of
    the exact KL of a run without one; perplexities exactly equal."""
    path = tiny_model_dir()
    src, q = lowbit.load(path), lowbit.quantize(lowbit.load(path), lowbit.RTN(bits=4, group_size=32))
    text = lowbit.calib.builtin("eval")[:4000]
    for engine in (True, False):
        run = dict(ctx=100, max_windows=4, source=src.model, progress=False, engine=engine)
        exact = metrics.evaluate(q.model, src.tokenizer, text, **run)
        cached = [metrics.evaluate(q.model, src.tokenizer, text, source_key="a tiny source", **run) for _ in range(2)]
        assert cached[0] == cached[1] and cached[0].kld > 0
        assert (cached[0].ppl, cached[0].source_ppl) == (exact.ppl, exact.source_ppl)
        assert cached[0].kld != exact.kld and abs(cached[0].kld - exact.kld) < 1e-4
    assert len(_files(cache)) == 2  # the engine is part of the key


def test_a_loader_is_called_only_without_a_cache(tiny_model_dir, cache):
    path = tiny_model_dir()
    src, q = lowbit.load(path), lowbit.quantize(lowbit.load(path), lowbit.RTN(bits=4, group_size=32))
    text = lowbit.calib.builtin("eval")[:3000]
    calls = []

    def load():
        calls.append(1)
        return src.model
    runs = [metrics.evaluate(q.model, src.tokenizer, text, ctx=100, max_windows=2, source=load, progress=False,
                             source_key="k") for _ in range(2)]
    assert runs[0] == runs[1] and calls == [1]


def test_cache_stays_under_its_cap_least_recently_used_out_first(tiny_model_dir, cache, monkeypatch):
    path = tiny_model_dir()
    src, q = lowbit.load(path), lowbit.quantize(lowbit.load(path), lowbit.RTN(bits=4, group_size=32))
    text = lowbit.calib.builtin("eval")[:6000]

    def run(ctx):
        return metrics.evaluate(q.model, src.tokenizer, text, ctx=ctx, max_windows=3, source=src.model,
                                progress=False, source_key="k")
    run(100)
    [one] = _files(cache)
    size = one.stat().st_size
    cache.joinpath("old.safetensors").write_bytes(b"x" * 10)  # version 1's states: the oldest
    os.utime(cache / "old.safetensors", ns=(0, 0))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache / f".abc{source_cache.SUFFIX}.partial-{int(dead.stdout)}"
    stale.write_bytes(b"half")
    monkeypatch.setenv("LOWBIT_EVAL_CACHE_MB", str((2 * size + 100) / 2**20))
    run(90)
    assert not stale.exists() and not (cache / "old.safetensors").exists() and len(_files(cache)) == 2
    run(100)  # read: now the most recently used
    run(80)  # a third file: the least recently used (ctx 90's) goes
    assert len(_files(cache)) == 2 and one.exists()
    assert sum(f.stat().st_size for f in _files(cache)) <= 2 * size + 100
    monkeypatch.setenv("LOWBIT_EVAL_CACHE_MB", str(size / 2 / 2**20))
    with pytest.warns(UserWarning, match="not cached"):
        alone = run(70)  # larger than the whole cap: scored all the same, not kept
    assert alone.kld > 0 and len(_files(cache)) == 2


def test_a_failed_write_costs_only_the_cache(tiny_model_dir, cache):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("")  # the cache's folder cannot be made
    path = tiny_model_dir()
    src, q = lowbit.load(path), lowbit.quantize(lowbit.load(path), lowbit.RTN(bits=4, group_size=32))
    text = lowbit.calib.builtin("eval")[:3000]
    with pytest.warns(UserWarning, match="could not cache"):
        got = metrics.evaluate(q.model, src.tokenizer, text, ctx=100, max_windows=2, source=src.model,
                               progress=False, source_key="k")
    assert got.kld > 0


def test_fingerprint_follows_the_source_files(tiny_model_dir):
    src = tiny_model_dir()
    before = fingerprint(str(src))
    weights = next(src.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert fingerprint(str(src)) != before
    assert fingerprint("default") == fingerprint("default")


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _valid_file(tmp_path, rows=5, vocab=7):
    digest = "ab" * 32
    zs, target = torch.randn(rows, vocab), torch.arange(rows) % vocab
    from lowbit.kernels.cpu.logit_scores import records
    writer = source_cache.Writer(tmp_path / "f.scores", digest, rows)
    writer.write(records(zs, target))
    writer.commit()
    return (tmp_path / "f.scores").read_bytes(), digest, rows


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_reader_never_raises(tmp_path, data):
    """Random bytes, or a valid file cut, extended or with bytes overwritten anywhere: None or a cache
    whose records read (a flip inside the codes or a meta value still in range is not detected)."""
    good, digest, rows = _valid_file(tmp_path)
    kind = data.draw(st.sampled_from(["random", "cut", "extend", "overwrite"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=600))
    elif kind == "cut":
        blob = good[:data.draw(st.integers(0, len(good) - 1))]
    elif kind == "extend":
        blob = good + data.draw(st.binary(min_size=1, max_size=64))
    else:
        at = data.draw(st.integers(0, len(good) - 1))
        patch = data.draw(st.binary(min_size=1, max_size=16))
        blob = good[:at] + patch + good[at + len(patch):]
    path = tmp_path / "g.scores"
    path.write_bytes(blob)
    got = source_cache.read(path, digest, rows)
    assert got is None or blob == good or kind == "overwrite"
    if got is not None:
        codes, meta = got.record(1, rows - 1)
        assert codes.shape == (rows - 1, 7) and meta.isfinite().all()
    assert source_cache.read(path, digest, rows + 1) is None
