"""The Tender integer kernel (kernels/cpu/c/tender.h through kernels/cpu/tender.py) against the integer
oracle (formats.activation.linear_integer): random and odd shapes, every G, every weight width and
grid, chunks, one and several rows, both thread counts, and the worst case of the overflow bound."""

import pytest
import torch

from lowbit import kernels
from lowbit.formats import UniformQ
from lowbit.formats.activation import ActQ, linear_integer, tender_accumulators
from lowbit.kernels.cpu import codegen, isa, tender
from lowbit.nn import ActQuantLinear

pytestmark = pytest.mark.skipif(codegen.entry(isa.selected(), "uniform", 4, "tender") is None,
                                reason="no Tender kernel for this CPU's ISA: the fake-quantized path runs")
# this CPU's own kernel, and the AVX2 one (8-row tiles, maddubs, sign-form 8-bit codes) where it runs
ISAS = sorted({isa.selected()} | ({"avx2"} if isa.detect().supports("avx2") else set()))


def _act(k: int, bits: int, groups: int, chunk: int, seed: int, method: str = "tender") -> ActQ:
    g = torch.Generator().manual_seed(seed)
    if method != "tender":
        return ActQ(method, bits, k, 1, chunk, maxima=torch.rand(k, generator=g) * 4 if method == "per-tensor" else None)
    group = torch.sort(torch.randint(0, groups, (k,), generator=g)).values.to(torch.uint8)
    return ActQ("tender", bits, k, groups, chunk, torch.randn(k, generator=g), torch.randperm(k, generator=g).to(torch.int32),
                group, torch.rand(k, generator=g) * torch.exp2(group.float()))


def _check(y: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 rounding: the integer sums are exact, the float tail (scales, the weight groups' sum) rounds."""
    scale = ref.abs().amax(-1, keepdim=True).clamp(min=1e-6)
    assert ((y - ref).abs() / scale).max() < 2e-6, ((y - ref).abs() / scale).max()


CASES = [  # n, k, weight bits, group, sym, act bits, G, chunk, rows
    (29, 96, 8, 32, True, 8, 6, 1, 5), (31, 200, 4, -1, False, 8, 8, 1, 7), (17, 64, 3, 64, False, 4, 16, 3, 13),
    (40, 136, 2, 32, True, 4, 4, 0, 1), (65, 260, 8, -1, True, 8, 16, 1, 2), (16, 32, 4, 32, True, 8, 1, 1, 4),
    (3, 40, 8, 128, False, 8, 12, 2, 9), (100, 384, 4, 128, True, 8, 8, 1, 1)]


@pytest.mark.parametrize("n, k, wbits, gs, sym, abits, groups, chunk, m", CASES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("on", ISAS)
def test_kernel_equals_the_integer_oracle(n, k, wbits, gs, sym, abits, groups, chunk, m, threads, on):
    g = torch.Generator().manual_seed(n * k + m)
    qt = UniformQ.from_float(torch.randn(n, k, generator=g), wbits, gs, sym)
    act = _act(k, abits, groups, chunk, seed=m)
    if chunk == 0:
        act.maxima *= 50  # a static TMax that clips nothing (AVX2's 8-bit path clamps at -127, the oracle at -128)
    x = torch.randn(m, k, generator=g) * torch.rand(k, generator=g) * 3
    bias = torch.randn(n, generator=g)
    kernels.set_threads(threads)
    try:
        packed = tender.prepare(qt, act, on)
        _check(packed(x, bias), linear_integer(x, act, qt, bias))
        _check(packed(x[:1]), linear_integer(x[:1], act, qt))  # decode: one row, no bias
    finally:
        kernels.set_threads(2)


@pytest.mark.parametrize("n, k, wbits, gs, sym, abits, groups", [
    (37, 384, 4, 128, True, 8, 8), (29, 200, 8, 128, False, 8, 16), (17, 96, 4, 32, False, 4, 6),
    (40, 576, 4, 128, True, 8, 16), (9, 160, 3, 64, True, 8, 12)])
@pytest.mark.parametrize("on", ISAS)
def test_runs_restart_in_every_weight_group(n, k, wbits, gs, sym, abits, groups, on):
    """The fitting's order (methods/tender.py): channels sorted by (weight group, activation group), so
    every weight group holds runs of several activation groups, ascending inside it and starting again
    in the next (a ragged last group too): the kernel's layout takes them as they come."""
    g = torch.Generator().manual_seed(n + k + groups)
    raw = torch.randint(0, groups, (k,), generator=g)
    perm = torch.sort(torch.arange(k) // gs * groups + raw, stable=True).indices
    group = raw[perm]
    assert bool((group[1:] < group[:-1]).any())
    act = ActQ("tender", abits, k, groups, 1, torch.randn(k, generator=g), perm.to(torch.int32), group.to(torch.uint8),
               torch.rand(k, generator=g) * torch.exp2(group.float()))
    qt = UniformQ.from_float(torch.randn(n, k, generator=g), wbits, gs, sym)
    x = torch.randn(11, k, generator=g) * torch.rand(k, generator=g) * 3
    packed = tender.prepare(qt, act, on)
    assert packed.runs.shape[0] == sum(len(set(group[j:j + gs].tolist())) for j in range(0, k, gs))
    _check(packed(x, torch.ones(n)), linear_integer(x, act, qt, torch.ones(n)))
    _check(packed(x[:1]), linear_integer(x[:1], act, qt))


@pytest.mark.parametrize("groups", range(1, 17))
@pytest.mark.parametrize("on", ISAS)
def test_every_g(groups, on):
    qt = UniformQ.from_float(torch.randn(23, 160), 8 if groups % 2 else 4, 32, False)
    act, x = _act(160, 8, groups, 1, seed=groups), torch.randn(6, 160) * 5
    _check(tender.prepare(qt, act, on)(x), linear_integer(x, act, qt))


@pytest.mark.parametrize("method", ["per-token", "smoothquant", "per-tensor"])
def test_one_scale_methods_run_as_one_group(method):
    qt = UniformQ.from_float(torch.randn(37, 96), 8, 32, True)
    act, x = _act(96, 8, 1, 16, seed=3, method=method), torch.randn(21, 96) * 2  # chunk 16 means nothing to them
    _check(tender.prepare(qt, act)(x), linear_integer(x, act, qt))


@pytest.mark.parametrize("on", ISAS)
def test_worst_case_of_the_bound_is_exact(on):
    """Every code 255 (8-bit asym: a group of equal weights and one zero), every activation at the top
    of its group, half the channels in group 15 and half in group 0 of G = 16: the top run alone is
    within int32, its shift by 15 is not, so the kernel must flush to int64 — and stay exact."""
    n, k = 20, 256
    w = torch.ones(n, k)
    w[:, ::32] = 0
    qt = UniformQ.from_float(w, 8, 32, False)
    assert int(qt.codes().max()) == 255
    group = torch.cat([torch.zeros(k // 2), torch.full((k // 2,), 15)]).to(torch.uint8)
    act = ActQ("tender", 8, k, 16, 1, torch.zeros(k), torch.arange(k, dtype=torch.int32), group,
               torch.ones(k))
    x = -torch.exp2(group.float())[None].repeat(3, 1)  # |x'_k| · 2^(15 − g_k) equal: every code at −127
    packed = tender.prepare(qt, act, on)
    assert packed.narrow.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # the low half's groups stay in int32
    acc, _ = tender_accumulators(x, act, qt)
    assert acc.abs().max() > 2**31  # the sums themselves leave int32
    _check(packed(x), linear_integer(x, act, qt))


def test_nibbles_halve_the_codes_and_pad_runs_to_eight():
    qt4, qt8 = (UniformQ.from_float(torch.randn(32, 128), b, -1, True) for b in (4, 8))
    act = _act(128, 8, 8, 1, seed=1)
    p4, p8 = tender.prepare(qt4, act), tender.prepare(qt8, act)
    assert p4.nibble and not p8.nibble
    assert p4.qw.numel() * 2 == 32 * p4.kp and p8.qw.numel() == 32 * p8.kp
    assert all(int(u) * 8 % 8 == 0 for u in p4.runs[:, 1])


def test_the_layer_runs_the_kernel_and_the_reference_switch_the_float_path():
    qt, act = UniformQ.from_float(torch.randn(24, 64), 4, 32, True), _act(64, 8, 8, 1, seed=4)
    layer, x = ActQuantLinear(qt, act, torch.randn(24)), torch.randn(2, 3, 64)
    ref = linear_integer(x.reshape(-1, 64), act, qt, layer.bias).view(2, 3, 24)
    _check(layer(x), ref)
    kernels.use_reference(True)
    try:
        float_path = layer(x)
    finally:
        kernels.use_reference(False)
    assert torch.allclose(float_path, ref, rtol=1e-4, atol=1e-4)


def test_forms_it_does_not_run_fall_back():
    qt = UniformQ.from_float(torch.randn(8, 64), 4, 32, True)
    assert tender.prepare(qt, ActQ("per-block32", 8, 64)) is None
    assert tender.prepare(qt, ActQ("hadamard", 8, 64)) is None
    x = torch.randn(3, 64)
    act = ActQ("per-block32", 8, 64)
    assert torch.allclose(kernels.prepare_act(qt, act, "cpu")(x), linear_integer(x, act, qt), rtol=1e-4, atol=1e-4)
