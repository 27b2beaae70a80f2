"""The generated CPU kernels against the reference kernel: every bits × group × sym, GEMV and GEMM,
odd shapes and tails, 1 and 2 threads, every ISA this CPU runs (others skip; they must still compile)."""

import warnings

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.formats import BITS, GROUP_SIZES, UniformQ
from lowbit.formats.packing import pack
from lowbit.kernels import reference
from lowbit.kernels.cpu import build, float16, isa, perf_model, threads, uniform
from lowbit.kernels.cpu.layout import interleave

ISAS = ("scalar", "avx2", "avx512", "avx512vnni")
needs_cc = pytest.mark.skipif(build.compiler() is None, reason="no C compiler")


def _isa(name: str) -> str:
    if build.compiler() is None:
        pytest.skip("no C compiler")
    if not isa.detect().supports(name):
        pytest.skip(f"this CPU lacks {name}")
    return name


def _close(got, expected, k):
    # fp32 sums in another order: error grows with the length of the dot product and its magnitude
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * k ** 0.5 * expected.abs().max().item())


def check_gemv_gemm(packed, qt, thread_count, counts, seed: int) -> None:
    """`packed` against the reference at each thread count: GEMV, GEMM with [..., K] input, GEMM with an
    M tail (one vector of tokens, a partial second one, several blocks of tokens), with and without bias."""
    g = torch.Generator().manual_seed(seed)
    n, k = qt.shape
    bias = torch.randn(n, generator=g)
    for t in counts:
        thread_count(t)
        for batch in ((1,), (2, 3), (9,), (37,)):
            x = torch.randn(*batch, k, generator=g)
            _close(packed(x, bias), reference.linear(x, qt, bias), k)
            _close(packed(x), reference.linear(x, qt), k)


@pytest.mark.parametrize("name", ISAS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False])
def test_matches_reference(name, bits, group_size, sym, thread_count):
    name = _isa(name)
    g = torch.Generator().manual_seed(bits * 7 + group_size)
    n, k = 37, 200  # N odd, K neither a multiple of 32 nor of the group: ragged last group and block
    qt = UniformQ.from_float(torch.randn(n, k, generator=g), bits, group_size, sym)
    check_gemv_gemm(uniform.prepare(qt, name), qt, thread_count, (1, 2), seed=bits)


@pytest.mark.parametrize("name", ISAS)
@pytest.mark.parametrize("bits", [3, 4])
def test_tiles_and_threads(name, bits, thread_count):
    """Big enough for several K chunks, row tiles and thread bands, with every tail non-empty."""
    name = _isa(name)
    g = torch.Generator().manual_seed(bits)
    n, k = 203, 2100
    qt = UniformQ.from_float(torch.randn(n, k, generator=g), bits, 64, False)
    packed = uniform.prepare(qt, name)
    x = torch.randn(13, k, generator=g)
    expected = reference.linear(x, qt)
    for t in (1, 2, 3):
        thread_count(t)
        _close(packed(x), expected, k)
        _close(packed(x[:1]), expected[:1], k)


@pytest.fixture
def int8_activations():
    kernels.set_int8_activations(True)
    yield
    kernels.set_int8_activations(False)


@pytest.mark.parametrize("name", ("avx2", "avx512", "avx512vnni"))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False])
def test_int8_activation_gemv_gemm(name, bits, group_size, sym, thread_count, int8_activations):
    """u8 codes × s8 activations (maddubs on AVX2/AVX-512, VNNI dpbusd), one token (GEMV) and several
    (GEMM: every token-tile tail), vs the reference on the same rounded activations."""
    name = _isa(name)
    g = torch.Generator().manual_seed(bits * 5 + group_size)
    n, k = 45, 296  # 10 blocks: g32 kernels take 8 (AVX2) or 16 (AVX-512) blocks at a time, so a tail
    qt = UniformQ.from_float(torch.randn(n, k, generator=g), bits, group_size, sym)
    if bits == 8:  # the extreme codes, where the signed dot (|q − 128| = 128) and int16 pairs are tight
        qt.qweight.copy_(pack(torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8) * 255, 8))
    packed = uniform.prepare(qt, name)
    assert packed.qfn is not None
    bias = torch.randn(n, generator=g)
    for m in (1, 2, 5, 9):
        x = torch.randn(m, k, generator=g) * 3
        x[0, 5] = 40.0  # an outlier only changes its own block's scale
        x[-1, 64:96] = 0.0  # an all-zero block: scale 0
        for t in (1, 2):
            thread_count(t)
            _close(packed(x, bias), reference.linear(uniform.quantize_activations(x), qt, bias), k)
    # the integer sums at their bound: every code at its maximum meets s8 activations of ±127
    top = UniformQ(pack(torch.full((n, k), 2**bits - 1, dtype=torch.uint8), bits), qt.scales, qt.zeros, bits,
                   group_size, (n, k))
    for x in (torch.ones(1, k), torch.ones(3, k), -torch.ones(6, k)):
        _close(uniform.prepare(top, name)(x), reference.linear(x, top), k)


@pytest.mark.parametrize("name", ("avx2", "avx512", "avx512vnni"))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_int8_tile_kernels_batch_independent(name, bits, sym, thread_count, int8_activations):
    """A decode batch (up to TILE_TOKENS tokens: the tile kernels, codegen._tileq) gives each token
    exactly what it gets alone, at every count that splits into token groups differently (8 = 8, 9 = 5 + 4,
    17 = 6 + 6 + 5 on AVX-512 VNNI), and matches the reference on the rounded activations; one token past
    TILE_TOKENS takes the GEMM and still matches."""
    name = _isa(name)
    g = torch.Generator().manual_seed(bits + 11 * sym)
    n, k = 40, 232  # 3 tiles (the last partly padding) × 8 blocks (the last ragged), g64: 2-block groups
    qt = UniformQ.from_float(torch.randn(n, k, generator=g), bits, 64, sym)
    packed = uniform.prepare(qt, name)
    x = torch.randn(perf_model.TILE_TOKENS + 1, k, generator=g)
    alone = torch.cat([packed(x[i:i + 1]) for i in range(len(x))])
    for t in (1, 2):
        thread_count(t)
        for m in (2, 3, 8, 9, 17, perf_model.TILE_TOKENS):
            assert torch.equal(packed(x[:m]), alone[:m]), m
        _close(packed(x), reference.linear(uniform.quantize_activations(x), qt), k)
    _close(alone, reference.linear(uniform.quantize_activations(x), qt), k)


@pytest.mark.parametrize("name", ("avx2", "avx512", "avx512vnni"))
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_int8_gemm_chunks_tiles_and_threads(name, bits, thread_count, int8_activations):
    """The int8 GEMM over several K chunks (unequal last group), tile pairs with a lone last tile, and
    thread bands; asymmetric, so every block's zero point comes off in integers."""
    name = _isa(name)
    g = torch.Generator().manual_seed(bits)
    n, k = 203, 2100
    qt = UniformQ.from_float(torch.randn(n, k, generator=g), bits, 64, False)
    packed = uniform.prepare(qt, name)
    x = torch.randn(13, k, generator=g)
    expected = reference.linear(uniform.quantize_activations(x), qt)
    for t in (1, 2, 3):
        thread_count(t)
        _close(packed(x), expected, k)


@pytest.mark.parametrize("name", ISAS)
def test_float16_kernel_matches_fp16_linear(name, thread_count):
    """Unquantized fp16 weights (the engine's float layers): GEMV and the tiled GEMM against F.linear
    on the same fp16-rounded weights; K not a multiple of 32 (zero-padded rows), odd N, token tails."""
    name = _isa(name)
    g = torch.Generator().manual_seed(16)
    for n, k in ((37, 200), (70, 576)):
        w, bias = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        packed = float16.prepare(w, name)
        for t in (1, 2):
            thread_count(t)
            for m in (1, 2, 5, 37):
                x = torch.randn(m, k, generator=g)
                _close(packed(x, bias), torch.nn.functional.linear(x, w.half().float(), bias), k)


def test_interleave_puts_word_j_of_a_tile_side_by_side():
    """layout.interleave: tiles of `rows` rows, element (r, c) at tile r // rows, c · rows + r % rows,
    a short last tile padded with zero rows."""
    t = torch.arange(1, 16, dtype=torch.int32).view(5, 3)
    out = interleave(t, 4)
    assert out.shape == (8, 3)
    tiles = out.view(2, 3, 4)
    for r in range(5):
        for c in range(3):
            assert tiles[r // 4, c, r % 4] == t[r, c]
    assert (tiles[1, :, 1:] == 0).all()


@needs_cc
def test_sixteen_lane_layout_through_portable_c(monkeypatch, thread_count):
    """AVX-512's 16-lane bit layout, run through the portable C built for 16 lanes, so it is checked
    even on CPUs without AVX-512."""
    monkeypatch.setitem(perf_model.VECTOR_LANES, "scalar", 16)
    lib = build.open_library(build.compile_isa("scalar"))
    threads.apply(lib)
    g = torch.Generator().manual_seed(16)
    for bits in BITS:
        qt = UniformQ.from_float(torch.randn(19, 200, generator=g), bits, 64, bits % 2 == 0)
        packed = uniform.PackedUniform(qt, "scalar", lib)
        for m in (1, 5):
            x = torch.randn(m, 200, generator=g)
            _close(packed(x), reference.linear(x, qt), 200)


@pytest.mark.parametrize("name", ("avx512", "avx512vnni"))
@needs_cc
def test_avx512_sources_compile(name):
    """Even where they cannot run: a CPU with AVX-512 must never meet a source that fails to build."""
    assert build.compile_isa(name).is_file()


@needs_cc
def test_registry_uses_generated_kernel_and_bf16(thread_count):
    qt = UniformQ.from_float(torch.randn(24, 96), 4, 32, True)
    bound = kernels.prepare(qt, "cpu")
    assert isinstance(bound, uniform.PackedUniform)
    x = torch.randn(3, 96)
    _close(kernels.linear(x, qt), reference.linear(x, qt), 96)
    y = bound(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.linear(x.bfloat16().float(), qt), rtol=2e-2, atol=2e-2)


def test_force_reference():
    qt = UniformQ.from_float(torch.randn(8, 64), 4, 32, True)
    try:
        kernels.use_reference()
        assert kernels.kernel_for(qt) == "reference"
        assert not isinstance(kernels.prepare(qt, "cpu"), uniform.PackedUniform)
    finally:
        kernels.use_reference(False)


def test_no_compiler_falls_back(monkeypatch):
    monkeypatch.setattr(build, "compiler", lambda: None)
    build.load.cache_clear()
    try:
        qt = UniformQ.from_float(torch.randn(8, 64), 4, 32, True)
        with pytest.warns(RuntimeWarning, match="reference kernel"):
            bound = kernels.prepare(qt, "cpu")
        x = torch.randn(2, 64)
        torch.testing.assert_close(bound(x), reference.linear(x, qt))
    finally:
        build.load.cache_clear()


@needs_cc
def test_quant_linear_model_logits(tiny_model_dir):
    """The real path: QuantLinear layers of a quantized model, prefill (GEMM) and one decode step (GEMV)."""
    q = lowbit.quantize(str(tiny_model_dir()), lowbit.RTN(bits=4, group_size=32)).model
    ids = torch.randint(0, 200, (1, 11))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fast = q(ids).logits, q(ids[:, :1]).logits
        kernels.use_reference()
        try:
            ref = q(ids).logits, q(ids[:, :1]).logits
        finally:
            kernels.use_reference(False)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@needs_cc
def test_read_probe_reads_every_word():
    """lb_read, the DRAM yardstick of eval.bench.bandwidth: it must touch every word (its four chains'
    sums come back), else the bandwidth it reports would be fiction."""
    import ctypes

    from lowbit.eval.bench import bandwidth

    lib = build.load(isa.selected())
    threads.apply(lib)
    lib.lb_read.restype = ctypes.c_uint64
    buf = torch.arange(1, 4097, dtype=torch.int64)
    chains = [int(buf[j::4].sum()) for j in range(4)]
    assert lib.lb_read(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(buf.nbytes), 1) == \
        chains[0] ^ chains[1] ^ chains[2] ^ chains[3]
    assert 1e8 < bandwidth(1, gib=1 / 64) < 1e13
