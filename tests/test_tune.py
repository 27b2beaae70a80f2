"""`lowbit tune`: it caches winners per machine, perf_model.plan follows them, a bad cache file only
warns, and the kernels stay exact under tuned plans. The user's cache is never touched ($LOWBIT_CACHE
points at a temporary directory; the kernel library is loaded before, from the usual place)."""

import json

import pytest
import torch

from lowbit import cli
from lowbit.formats import UniformQ
from lowbit.kernels import reference
from lowbit.kernels.cpu import build, isa, perf_model, threads, tune, uniform

CPU = isa.detect()
ISA = isa.selected()
needs_cc = pytest.mark.skipif(build.compiler() is None, reason="no C compiler")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    if build.compiler() is not None:
        build.load(ISA)  # compiled or found in the real cache, before it moves
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    return tmp_path


def _write(t: int, **winners) -> None:
    """A cache file for `t` threads as `lowbit tune` writes it, with these winners."""
    path = perf_model.tune_path(CPU, ISA, t)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": perf_model.TUNE_VERSION, "key": perf_model.tune_key(CPU, ISA, t),
                                "winners": {**vars(perf_model.Constants()), **winners}}))


def _plan(m: int, t: int, n: int = 4096, k: int = 4096, constants=None) -> perf_model.Plan:
    return perf_model.plan(CPU, ISA, n, k, n * k // 2, m, t, constants)


@needs_cc
def test_quick_tune_caches_winners_that_plan_uses(cache, capsys):
    assert cli.main(["tune", "--quick"]) == 0
    out = capsys.readouterr().out
    t = threads.get()
    path = perf_model.tune_path(CPU, ISA, t)
    assert path.is_file() and str(path) in out and "winner:" in out and "GEMM" in out
    data = json.loads(path.read_text())
    assert perf_model.tuned(CPU, ISA, t) == perf_model.Constants(**data["winners"])
    # the GEMV winner serves both activation paths: every shape is timed on int8 and on fp32 x
    assert data["tables"][0]["shapes"] == [f"{n}x{k} {a}" for n, k in tune.QUICK_GEMV for a in ("int8", "fp32")]
    for table in data["tables"]:
        assert all(s > 0 for row in table["rows"] for s in row["seconds"])
        assert table["winner"] in {row["candidate"] for row in table["rows"]}

    assert cli.main(["tune", "--show"]) == 0
    assert str(path) in capsys.readouterr().out
    assert cli.main(["tune", "--reset"]) == 0
    assert not path.exists()
    assert cli.main(["tune", "--show"]) == 0
    assert "nothing cached" in capsys.readouterr().out


def test_cached_winners_change_the_plan(cache):
    default_gemv, default_gemm = _plan(1, 2, 192, 576), _plan(32, 2)
    assert default_gemv.threads == 1  # 62 KB of weights: below the model's 2 × 64 KiB
    _write(2, min_bytes_per_thread=1024, l1_share=0.125, l2_share=1.0)
    gemv, gemm = _plan(1, 2, 192, 576), _plan(32, 2)
    assert gemv.threads == 2
    assert gemm.kc == default_gemm.kc // 4 and gemm.nb > default_gemm.nb
    assert gemm == _plan(32, 2, constants=perf_model.Constants(1024, 0.125, 1.0))
    assert _plan(32, 1) == _plan(32, 1, constants=perf_model.Constants())  # other thread counts: untouched
    _write(2)  # the defaults, written back: the plan follows the file again
    assert _plan(32, 2) == default_gemm


@pytest.mark.parametrize("text", [
    "{not json", "[]", "\udcff", json.dumps({"version": 1, "key": "another-machine", "winners": {}}),
    "VALID:" + json.dumps({"min_bytes_per_thread": 0}), "VALID:" + json.dumps({"l1_share": float("nan")}),
    "VALID:" + json.dumps({"l2_share": "half"}), "VALID:" + json.dumps({"min_bytes_per_thread": 1e400}),
    "VALID:null"])
def test_bad_cache_file_warns_and_falls_back(cache, text):
    path = perf_model.tune_path(CPU, ISA, 2)
    path.parent.mkdir(parents=True)
    if text.startswith("VALID:"):  # well-formed, but the winners are not
        winners = json.loads(text[6:])
        text = json.dumps({"version": perf_model.TUNE_VERSION, "key": path.stem,
                           "winners": None if winners is None else {**vars(perf_model.Constants()), **winners}})
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache"):
        assert _plan(32, 2) == _plan(32, 2, constants=perf_model.Constants())
    assert cli.main(["tune", "--show", "--threads", "2"]) == 1  # a one-line error, not a traceback


def test_cache_path_that_is_a_directory_warns(cache):
    perf_model.tune_path(CPU, ISA, 2).mkdir(parents=True)
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache"):
        assert _plan(1, 2) == _plan(1, 2, constants=perf_model.Constants())


@needs_cc
def test_kernels_exact_under_tuned_plans(cache, thread_count):
    """Tiles of 32 columns and NR rows, and threads for every GEMV: many tiles, tails and bands."""
    n, k = 203, 1000
    g = torch.Generator().manual_seed(3)
    qt = UniformQ.from_float(torch.randn(n, k, generator=g), 3, 64, False)
    x = torch.randn(7, k, generator=g)
    expected = reference.linear(x, qt)
    for t in (1, 2):
        _write(t, min_bytes_per_thread=1, l1_share=1e-9, l2_share=1e-9)
        thread_count(t)
        packed = uniform.prepare(qt, ISA)
        assert packed.plan(1).threads == t and packed.plan(7).kc == 32
        assert packed.plan(7).nb == perf_model.MICRO_TILE[ISA][1]
        for rows in (x, x[:1]):
            got = packed(rows)
            torch.testing.assert_close(got, expected[:len(rows)], rtol=1e-4,
                                       atol=1e-5 * k ** 0.5 * expected.abs().max().item())


@pytest.mark.parametrize("faster,wins", [(0.98, False), (0.90, True)])
def test_a_candidate_must_beat_the_default_by_the_margin(faster, wins):
    """Noise-sized gains keep the model's constants; real ones replace them."""
    default, other = perf_model.Constants(), perf_model.Constants(min_bytes_per_thread=1024)
    shapes = [("a", None, 1, False), ("b", None, 1, False)]
    plans = {(s, c): perf_model.Plan(i + 1, 4, 32) for s, *_ in shapes for i, c in enumerate(("d", "o"))}
    seconds = {(s, p): 1.0 if p.threads == 1 else faster for (s, _), p in plans.items()}
    table = tune._table("t", [("d", default), ("o", other)], shapes, plans, seconds)
    assert table["winner"] == ("o" if wins else "d")
    assert [r["score"] for r in table["rows"]] == pytest.approx([1 / faster, 1.0])


def test_threads_must_be_positive(cache, capsys):
    assert cli.main(["tune", "--quick", "--threads", "0"]) == 1
    assert "--threads 0" in capsys.readouterr().err
