"""The generated CodebookQ (LUT) CPU kernels against the reference kernel: every bits × codebook
group × outliers, GEMV and GEMM, odd shapes and tails, 1 and 3 threads, every ISA this CPU runs
(others skip; they must still compile, see test_cpu_kernels.py)."""

import ctypes

import pytest
import torch
from test_cpu_kernels import ISAS, _close, _isa, check_gemv_gemm, needs_cc

from lowbit import kernels
from lowbit.formats import CODEBOOK_BITS, CodebookQ
from lowbit.kernels import reference
from lowbit.kernels.cpu import build, codebook, perf_model, threads


def _codebook(n: int, k: int, bits: int, group_size: int, outliers: bool, seed: int) -> CodebookQ:
    """Random indices and tables (entries of magnitudes 2^-20..2^5, fp16 subnormals and zero included,
    signs mixed) and, optionally, ~3% random outliers (a row without any among them)."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-k // group_size)
    idx = torch.randint(0, 2**bits, (n, k), generator=g)
    shape = (n, groups, 2**bits)
    tables = torch.randn(shape, generator=g) * 2.0 ** torch.randint(-20, 5, shape, generator=g)
    tables[0, 0, :2] = torch.tensor([0.0, 3e-7])
    sparse = None
    if outliers:
        sparse = torch.where(torch.rand(n, k, generator=g) < 0.03, torch.randn(n, k, generator=g), torch.zeros(n, k))
        sparse[1] = 0
    return CodebookQ.from_indices(idx, tables, bits, group_size, sparse)


@pytest.mark.parametrize("name", ISAS)
@pytest.mark.parametrize("bits", CODEBOOK_BITS)
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("outliers", [False, True])
def test_matches_reference(name, bits, group_size, outliers, thread_count):
    name = _isa(name)
    n, k = 37, 200  # N odd (no multiple of the GEMV rows or micro-tile), K ragged: last block and group
    qt = _codebook(n, k, bits, group_size, outliers, seed=bits * 7 + group_size)
    assert qt.has_outliers == outliers
    packed = codebook.prepare(qt, name)
    assert isinstance(packed, codebook.PackedCodebook)
    check_gemv_gemm(packed, qt, thread_count, (1, 3), seed=1)


@pytest.mark.parametrize("name", ISAS)
@pytest.mark.parametrize("bits", CODEBOOK_BITS)
def test_tiles_and_threads(name, bits, thread_count):
    """Big enough for several K chunks, row tiles and thread bands, with every tail non-empty."""
    name = _isa(name)
    n, k = 203, 2100
    qt = _codebook(n, k, bits, 64, True, seed=bits)
    packed = codebook.prepare(qt, name)
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(2))
    expected = reference.linear(x, qt)
    for t in (1, 2, 3):
        thread_count(t)
        _close(packed(x), expected, k)
        _close(packed(x[:1]), expected[:1], k)


@needs_cc
def test_sixteen_lane_layout_through_portable_c(monkeypatch, thread_count):
    """AVX-512's 16-lane layout (unmasked 2- and 4-bit indices included) through the portable C."""
    monkeypatch.setitem(perf_model.VECTOR_LANES, "scalar", 16)
    lib = build.open_library(build.compile_isa("scalar"))
    threads.apply(lib)
    for bits in CODEBOOK_BITS:
        qt = _codebook(19, 200, bits, 64, bits == 3, seed=16 + bits)
        packed = codebook.PackedCodebook(qt, "scalar", lib)
        for m in (1, 5):
            x = torch.randn(m, 200, generator=torch.Generator().manual_seed(m))
            _close(packed(x), reference.linear(x, qt), 200)


@needs_cc
def test_outliers_are_added_once(thread_count):
    """All-zero tables: y is the sparse part times x alone, whatever the thread count."""
    n, k = 29, 96
    qt = _codebook(n, k, 4, -1, True, seed=3)
    qt.codebook.zero_()
    packed = codebook.prepare(qt)
    x = torch.randn(4, k)
    expected = x @ qt.outliers_dense().t()
    for t in (1, 3):
        thread_count(t)
        _close(packed(x[:1]), expected[:1], k)
        _close(packed(x), expected, k)


@needs_cc
def test_registry_native_and_bf16(thread_count):
    """The registry picks the LUT kernel; int8 activations never apply to it; the native entry point
    (what the decode engine calls) gives the same numbers as the Python call."""
    qt = _codebook(24, 96, 4, 32, True, seed=5)
    bound = kernels.prepare(qt, "cpu")
    assert isinstance(bound, codebook.PackedCodebook)
    x = torch.randn(3, 96)
    _close(kernels.linear(x, qt), reference.linear(x, qt), 96)
    kernels.set_int8_activations(True)
    try:
        _close(bound(x[:1]), reference.linear(x[:1], qt), 96)
    finally:
        kernels.set_int8_activations(False)
    fn, args = bound.native(1)
    y = torch.empty(24)
    args.x, args.y = x[0].contiguous().data_ptr(), y.data_ptr()
    ctypes.CFUNCTYPE(None, ctypes.POINTER(build.Args))(fn)(ctypes.byref(args))
    _close(y, reference.linear(x[0], qt), 96)
    torch.testing.assert_close(bound(x.bfloat16()).float(), reference.linear(x.bfloat16().float(), qt),
                               rtol=2e-2, atol=2e-2)
