"""UniformQ and its packing: exact round trips, the reference dequantization, honest sizes."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import BITS, GROUP_SIZES, UniformQ, check_spec, from_tensors
from lowbit.formats.packing import pack, packed_words, unpack

ODD_COLS = [1, 7, 31, 32, 33, 95, 100, 576]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols", ODD_COLS)
def test_pack_unpack_round_trip(bits, cols):
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    q = torch.randint(0, 2**bits, (9, cols), dtype=torch.uint8, generator=g)
    w = pack(q, bits)
    assert w.dtype == torch.int32 and w.shape == (9, packed_words(cols, bits))
    assert torch.equal(unpack(w, bits, cols), q)


@pytest.mark.parametrize("bits", BITS)
def test_packing_is_exact_size_and_bit_order(bits):
    # 32 codes of b bits are exactly b words; code j sits at bits [j*b, (j+1)*b) of the block
    q = torch.zeros(1, 32, dtype=torch.uint8)
    q[0, 1] = 1
    w = pack(q, bits)
    assert w.shape == (1, bits)
    assert w[0, 0].item() == 1 << bits
    assert torch.equal(pack(torch.full((1, 32), 2**bits - 1, dtype=torch.uint8), bits),
                       torch.full((1, bits), -1, dtype=torch.int32))


def test_unpack_empty_rows():
    assert unpack(pack(torch.zeros(0, 40, dtype=torch.uint8), 3), 3, 40).shape == (0, 40)


def _reference_dequant(qt: UniformQ) -> torch.Tensor:
    """Element-by-element restatement of the format, independent of the vectorised code."""
    n, k = qt.shape
    g = k if qt.group_size == -1 else qt.group_size
    codes = qt.codes().float()
    out = torch.empty(n, k)
    for j in range(k):
        s = qt.scales[:, j // g].float()
        z = 2.0 ** (qt.bits - 1) if qt.zeros is None else qt.zeros[:, j // g].float()
        out[:, j] = (codes[:, j] - z) * s
    return out


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False])
def test_dequantize_matches_definition_and_error_bound(bits, group_size, sym):
    torch.manual_seed(0)
    w = torch.randn(13, 100)  # 100 is not a multiple of 32, 64 or 128: ragged last group
    qt = UniformQ.from_float(w, bits, group_size, sym)
    deq = qt.dequantize()
    assert torch.equal(deq, _reference_dequant(qt))
    assert qt.scales.dtype == torch.float16
    assert int(qt.codes().max()) < 2**bits
    # round to nearest: errors within half a step, except values clamped at the range's ends
    # (sym: the side opposite the largest magnitude; asym: the rounded zero point), within one step
    g = 100 if group_size == -1 else group_size
    step = qt.scales.float().abs().repeat_interleave(g, dim=1)[:, :100]
    err = (deq - w).abs()
    assert (err <= step * 1.01).all()
    assert (err <= 0.5 * step * 1.01).float().mean() > (0.7 if bits == 2 else 0.95)
    rel = ((deq - w) ** 2).sum() / (w**2).sum()
    assert rel < {2: 0.4, 3: 0.08, 4: 0.02, 8: 1e-4}[bits]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
def test_quantizing_a_grid_is_exact(bits, sym):
    """Weights that already lie on a representable grid are reproduced exactly (the known optimum)."""
    torch.manual_seed(1)
    qt = UniformQ.from_float(torch.randn(8, 96), bits, 32, sym)
    grid = qt.dequantize()
    again = UniformQ.from_float(grid, bits, 32, sym)
    assert torch.equal(again.dequantize(), grid)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_mse_clip_never_worse_per_group(bits, sym):
    torch.manual_seed(2)
    w = torch.randn(16, 256) * torch.rand(16, 256) ** 4  # heavy tails: clipping pays
    plain = UniformQ.from_float(w, bits, 64, sym)
    clipped = UniformQ.from_float(w, bits, 64, sym, mse_clip=True)
    err = lambda qt: ((qt.dequantize() - w) ** 2).view(16, 4, 64).sum(-1)  # noqa: E731
    assert (err(clipped) <= err(plain) * (1 + 1e-5) + 1e-9).all()
    assert err(clipped).sum() < 0.99 * err(plain).sum()


def test_bits_per_weight_counts_scales_and_zeros():
    w = torch.randn(10, 256)
    assert UniformQ.from_float(w, 4, 128, True).bits_per_weight == pytest.approx(4 + 16 / 128)
    assert UniformQ.from_float(w, 4, 128, False).bits_per_weight == pytest.approx(4 + 24 / 128)
    assert UniformQ.from_float(w, 3, 32, True).bits_per_weight == pytest.approx(3 + 16 / 32)
    assert UniformQ.from_float(w, 8, -1, True).bits_per_weight == pytest.approx(8 + 16 / 256)


def test_all_zero_group_and_constant_rows():
    w = torch.zeros(3, 64)
    w[1] = 0.25
    for sym in (True, False):
        qt = UniformQ.from_float(w, 4, 32, sym)
        assert torch.isfinite(qt.dequantize()).all()
        assert torch.allclose(qt.dequantize(), w, atol=1e-3)


def test_tensors_meta_round_trip():
    qt = UniformQ.from_float(torch.randn(5, 70), 3, 64, False)
    back = from_tensors(qt.meta(), qt.tensors())
    assert back.meta() == qt.meta()
    assert torch.equal(back.dequantize(), qt.dequantize())


@pytest.mark.parametrize("bits,group", [(5, 128), (1, 128), (16, 128), (4, 100), (4, 0), (4, 256)])
def test_unsupported_spec(bits, group):
    with pytest.raises(LowbitError):
        check_spec(bits, group)
