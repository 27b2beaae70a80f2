"""Tender and the activation baselines: the integer oracle against the float path, the group maths, fitting.

The integer oracle (formats.activation.linear_integer) is what the native int8 kernels will be
tested against; here it is checked against an independent computation (Python integers), and the
fast float path the universal decoder runs is checked against it.
"""

import pytest
import torch
import torch.nn.functional as F

from lowbit.calib.runner import LayerStats
from lowbit.errors import LowbitError
from lowbit.formats import UniformQ
from lowbit.formats.activation import METHODS, ActQ, group_partials, horner, linear_integer, tender_accumulators
from lowbit.formats.hadamard import hadamard
from lowbit.methods import GANQ, GPTQ, METHODS as METHODS_BY_NAME, RTN, tender
from lowbit.methods import rtn as rtn_method
from lowbit.nn import ActQuantLinear


def _activations(t: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows with per-channel offsets and a few outlier channels (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) * torch.rand(k, generator=g) + torch.randn(k, generator=g)
    x[:, torch.randperm(k, generator=g)[:3]] *= 40
    return x


def _fitted(x: torch.Tensor, w: torch.Tensor, spec) -> tuple:
    stats = LayerStats(torch.zeros(x.shape[1], x.shape[1]), torch.zeros(x.shape[1]))
    stats.add(x)
    fit = tender.fit(w, stats, spec)
    qt = fit.quantize(rtn_method, spec)
    act, bias = fit.finish(qt, None)
    return qt, act, bias


@pytest.mark.parametrize("method, chunk", [(m, 16) for m in METHODS] + [("tender", 1), ("tender", 0)])
@pytest.mark.parametrize("group_size", [32, -1])
def test_integer_oracle_matches_the_float_path(method, chunk, group_size):
    k = 96 if method != "hadamard" else 80  # 80 = 20·4: a Paley order; the ragged 96 % 64 too
    x, w = _activations(37, k), torch.randn(29, k)
    spec = RTN(bits=8, group_size=group_size, act_bits=8, act_method=method, act_groups=6, act_chunk=chunk)
    qt, act, bias = _fitted(x, w, spec)
    layer = ActQuantLinear(qt, act, bias)
    exact = linear_integer(x, act, qt, layer.bias)
    assert torch.allclose(layer(x), exact, rtol=1e-5, atol=1e-4)
    assert ((exact - x @ w.T).norm() / (x @ w.T).norm()) < 0.05  # and both are close to the float layer


def test_tender_scales_are_powers_of_two_apart_and_codes_in_range():
    x, k = _activations(50, 64), 64
    _, act, _ = _fitted(x, torch.randn(8, k), RTN(bits=8, group_size=-1, act_bits=4, act_groups=5, act_chunk=0))
    q, s = act.codes(act.transform(x))
    s0 = act.maxima.max() / (act.qmax * 2 ** (act.groups - 1))
    assert torch.equal(s.expand(50, k), (s0 * torch.exp2(act.group.float())).expand(50, k))
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.equal(act.group, torch.sort(act.group).values)  # groups contiguous, ascending
    top = act.group == act.group.max()
    assert int(q[:, top].abs().max()) >= 7  # the top group spans the whole 4-bit range


@pytest.mark.parametrize("groups, chunk", [(1, 1), (5, 1), (8, 3), (16, 1), (12, 0)])
def test_fake_quantize_is_the_per_channel_formula_bit_for_bit(groups, chunk):
    """The float path rounds each Tender group in its own pass (inv_0·2^−g, s_0·2^g): it must equal the
    module docstring's formula over every channel at once, to the bit (signed zeros too); G = 16
    leaves groups empty, an all-zero row and channel have no range."""
    x = _activations(41, 96, seed=groups)
    _, act, _ = _fitted(x, torch.randn(8, 96), RTN(bits=8, group_size=-1, act_bits=4, act_groups=groups, act_chunk=chunk))
    y = x * torch.linspace(0.1, 3.0, 96)
    y[5], y[:, 7] = 0.0, 0.0
    xt = y[:, act.perm.long()] - act.bias
    exponent = torch.exp2(act.group.float())
    per_row = (xt.abs() * torch.exp2(groups - 1 - act.group.float())).amax(1)
    tmax = act.maxima.max().expand(41) if chunk == 0 else \
        F.pad(per_row, (0, -41 % chunk)).view(-1, chunk).amax(1).repeat_interleave(chunk)[:41]
    top = act.qmax * 2.0 ** (groups - 1)
    inv = torch.where(tmax > 0, top / torch.where(tmax > 0, tmax, torch.ones_like(tmax)), torch.zeros_like(tmax))
    q = (xt * (inv[:, None] / exponent)).round().clamp(-act.qmax - 1, act.qmax)
    expected = q * ((tmax / top)[:, None] * exponent)
    assert torch.equal(act.fake_quantize(y).view(torch.int32), expected.view(torch.int32))
    assert torch.equal(act.codes(act.transform(y))[0], q.int())
    token = ActQ("per-token", 8, 96)
    m = y.abs().amax(1, keepdim=True)
    expected = (y * torch.where(m > 0, 127 / m, torch.zeros_like(m))).round().clamp(-128, 127) * (m / 127)
    assert torch.equal(token.fake_quantize(y).view(torch.int32), expected.view(torch.int32))


def test_smoothing_search_rounds_weights_as_the_stored_format():
    """The α search's RTN weights (no packing) are UniformQ's dequantized weights, bit for bit."""
    w = torch.randn(24, 200)  # 200: a ragged last group of 128 and 32
    for bits, group_size, sym in ((4, -1, True), (4, 128, False), (8, 32, True), (3, 32, False)):
        spec = RTN(bits=bits, group_size=group_size, sym=sym)
        assert torch.equal(tender._rtn_dequantized(w, spec), UniformQ.from_float(w, bits, group_size, sym).dequantize())


def test_groups_follow_the_reference_thresholds():
    maxima = torch.tensor([8.0, 4.0, 4.01, 1.0, 0.99, 0.5, 0.0])
    # G = 4: T = 1, 2, 4, 8; group g holds T_(g-1) < m <= T_g (group 0: m <= 1)
    assert tender.groups_of(maxima, 4).tolist() == [3, 2, 3, 0, 0, 0, 0]
    assert tender.groups_of(maxima, 1).tolist() == [0] * 7


def test_horner_is_the_shifted_sum_and_exact_at_the_worst_case():
    """G = 16, 8-bit activations and weights all at their extreme: |acc| reaches 2^15 · 2^7 · 2^7 · K,
    past int32; the oracle's int64 sum equals Python's integers exactly."""
    k, g = 64, 16
    q = torch.full((2, k), -128, dtype=torch.int32)
    group = torch.tensor([i * g // k for i in range(k)], dtype=torch.uint8)
    w = torch.full((3, k), -128, dtype=torch.int64)
    acc = horner(group_partials(q, group, g, w, k))
    expected = sum(128 * 128 * 2 ** int(group[i]) for i in range(k))
    assert expected > 2**31 and acc.dtype == torch.int64 and bool((acc == expected).all())


def test_tender_accumulators_combine_groups_without_float_rescaling():
    x = _activations(20, 64, seed=1)
    qt, act, _ = _fitted(x, torch.randn(16, 64), RTN(bits=4, group_size=32, act_bits=8, act_groups=8))
    acc, s0 = tender_accumulators(x, act, qt)
    q, s = act.codes(act.transform(x))
    w = qt.codes().long() - 8
    direct = torch.stack([(q.long() * 2 ** act.group.long())[:, j * 32:(j + 1) * 32] @ w[:, j * 32:(j + 1) * 32].T
                          for j in range(2)], -1)
    assert torch.equal(acc, direct) and torch.equal(s0[:, None] * 2 ** act.group.float(), s.expand(20, 64))


def test_bias_fold_keeps_the_weight_only_layer():
    """With the activations unrounded, a Tender layer is exactly the weight-only one: the bias and
    the permutation only move terms around (x·Ŵᵀ = (x − b)[perm]·Ŵ[:, perm]ᵀ + b·Ŵᵀ)."""
    x, w = _activations(30, 64), torch.randn(24, 64)
    spec = RTN(bits=4, group_size=-1, act_bits=8, act_groups=8)
    qt, act, bias = _fitted(x, w, spec)
    assert bool(act.bias.any())  # these channels are offset: centring them wins
    weight_only = UniformQ.from_float(w, 4, -1, True).dequantize()
    assert torch.allclose(act.transform(x) @ qt.dequantize().T + bias, x @ weight_only.T, atol=1e-3)


def test_centring_is_chosen_by_the_output_error():
    """Offset channels are centred; inputs heavy-tailed around 0 (SwiGLU outputs: most rows small, a
    rare extreme) are not, since centring their extremes moves every other row away from 0."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=g)
    tail = torch.randn(400, 64, generator=g) * 0.05
    tail[torch.randint(0, 400, (6,), generator=g)] *= 400
    tail = tail.abs()  # one-sided: (max + min)/2 is far from where most rows are
    for x, centred in ((_activations(400, 64), True), (tail, False)):
        _, act, bias = _fitted(x, w, RTN(bits=8, group_size=-1, act_bits=8, act_groups=8))
        assert bool(act.bias.any()) == centred and (bias is not None) == centred


def test_tender_tmax_clips_nothing_and_follows_quiet_rows():
    """Run-time TMax (chunk ≥ 1) holds every channel inside its group's range, even channels far past
    their calibrated range, and a quiet row narrows every group together (exact: powers of two)."""
    x = _activations(64, 64, seed=4)
    _, act, _ = _fitted(x, torch.randn(8, 64), RTN(bits=8, group_size=-1, act_bits=4, act_groups=6, act_chunk=1))
    wild = x * torch.linspace(0.25, 3.0, 64)  # channels beyond their calibration, by channel
    xt = act.transform(wild)
    q, s = act.codes(xt)
    assert bool((xt - q * s).abs().le(s / 2 * (1 + 1e-6)).all())  # rounding error only: nothing clipped
    quiet = act.transform(x[:1])
    assert torch.equal(act.tmax(quiet / 4), act.tmax(quiet) / 4)
    chunked = ActQ.from_tensors({**act.meta(), "chunk": 16}, act.tensors())
    assert torch.equal(chunked.tmax(xt), act.tmax(xt).view(4, 16).amax(1).repeat_interleave(16))


def test_rotation_alone_keeps_the_layer():
    """Hadamard: x·H times the rotated W·H equals x·Wᵀ to float rounding (no rounding of either)."""
    x, w = _activations(40, 576), torch.randn(48, 576)
    stats = LayerStats(torch.zeros(576, 576), torch.zeros(576))
    stats.add(x)
    fit = tender.fit(w, stats, RTN(bits=8, group_size=-1, act_bits=4, act_method="hadamard"))
    assert torch.allclose(fit.act.transform(x) @ fit.weight.T, x @ w.T, rtol=1e-4, atol=1e-3)
    assert torch.allclose(fit.stats.hessian, hadamard(576).T @ stats.hessian @ hadamard(576), rtol=1e-4, atol=1e-2)


def test_tender_beats_per_tensor_on_outlier_channels():
    x, w = _activations(200, 128, seed=2), torch.randn(64, 128)
    errors = {}
    for method in ("tender", "per-tensor"):
        qt, act, bias = _fitted(x, w, RTN(bits=8, group_size=-1, act_bits=4, act_method=method, act_groups=8))
        errors[method] = float((linear_integer(x, act, qt, bias) - x @ w.T).norm())
    assert errors["tender"] < 0.5 * errors["per-tensor"]


@pytest.mark.parametrize("spec", [GPTQ(bits=4, group_size=32, act_bits=8, act_groups=8),
                                  GPTQ(bits=4, group_size=128, sym=False, act_bits=8, act_groups=16),  # 200: a ragged group
                                  RTN(bits=8, group_size=64, act_bits=4, act_groups=6),
                                  GANQ(bits=3, group_size=-1, iters=2, outlier_ratio=0.02, act_bits=8, act_groups=8)])
def test_grouped_weights_are_the_weight_only_ones_with_their_columns_moved(spec):
    """Channels ordered by (weight group, activation group, channel): each weight group keeps its
    column set, and the weight method quantizes in the input order, so Ŵ is the weight-only layer's Ŵ
    (scales, zero points, codebooks, outliers) with its columns permuted, bit for bit — GPTQ's error
    feedback and groups included."""
    k = 200 if spec.group_size == 128 else 96
    x, w = _activations(300, k, seed=5), torch.randn(24, k)
    stats = LayerStats(torch.zeros(k, k), torch.zeros(k))
    stats.add(x)
    fit = tender.fit(w, stats, spec)
    perm, group = fit.act.perm.long(), fit.act.group.long()
    gs = k if spec.group_size == -1 else spec.group_size
    assert torch.equal(perm // gs, torch.arange(k) // gs)  # no column leaves its weight group
    for j in range(0, k, gs):  # inside one: runs of one activation group, ascending, channels in order
        key = group[j:j + gs] * k + perm[j:j + gs]
        assert torch.equal(key, torch.sort(key).values)
    if spec.group_size != -1:
        assert bool((group[1:] < group[:-1]).any())  # several weight groups: the groups start again in each
    assert torch.equal(fit.weight, w[:, perm]) and torch.equal(fit.stats.hessian, stats.hessian[perm][:, perm])
    method = METHODS_BY_NAME[spec.name]
    weight_only, stored = method.quantize(w, stats, spec), fit.quantize(method, spec)
    assert torch.equal(stored.dequantize(), weight_only.dequantize()[:, perm])
    for name, t in weight_only.tensors().items():
        if name not in ("qweight", "outlier_rowptr", "outlier_cols", "outlier_values"):
            assert torch.equal(stored.tensors()[name], t), name


def test_a_permutation_across_weight_groups_is_refused():
    qt = UniformQ.from_float(torch.randn(4, 64), 4, 32, True)
    tender.columns_permuted(qt, torch.arange(64).flip(0) % 32 + torch.arange(64) // 32 * 32)  # inside groups: fine
    with pytest.raises(LowbitError, match="moves columns between weight groups of 32"):
        tender.columns_permuted(qt, torch.arange(64).flip(0))


def test_hadamard_orders():
    for n in (64, 576, 1536, 80):
        h = hadamard(n)
        assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-5)
    with pytest.raises(LowbitError, match="no Hadamard matrix of order 36"):
        hadamard(36)


@pytest.mark.parametrize("bad, match", [({"act_bits": 3}, "activation bits 3"), ({"act_bits": 8, "act_groups": 0}, "G = 0"),
                                        ({"act_bits": 8, "act_groups": 17}, "G = 17"),
                                        ({"act_bits": 8, "act_method": "foo"}, "activation method 'foo'")])
def test_bad_specs_are_one_line_errors(bad, match):
    with pytest.raises(LowbitError, match=match):
        RTN(**bad)


def test_nan_in_calibration_activations_is_refused():
    stats = LayerStats(torch.zeros(4, 4), torch.zeros(4))
    with pytest.raises(LowbitError, match="NaN or Inf"):
        stats.add(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]))


def test_stored_spec_checks():
    x = _activations(20, 32)
    _, act, _ = _fitted(x, torch.randn(8, 32), RTN(bits=8, group_size=32, act_bits=8))
    ActQ.check(act.meta(), act.tensors(), 32)
    with pytest.raises(LowbitError, match="for 32 input features, the weights have 64"):
        ActQ.check(act.meta(), act.tensors(), 64)
    broken = {**act.tensors(), "perm": torch.zeros(32, dtype=torch.int32)}
    with pytest.raises(LowbitError, match="not a permutation"):
        ActQ.check(act.meta(), broken)
    with pytest.raises(LowbitError, match=r"'group' is not in \[0, 8\)"):
        ActQ.check(act.meta(), {**act.tensors(), "group": torch.full((32,), 8, dtype=torch.uint8)})
