"""The kernel registry and the reference kernel, checked against F.linear on dequantized weights."""

import pytest
import torch
import torch.nn.functional as F

from lowbit import kernels
from lowbit.formats import BITS, GROUP_SIZES, UniformQ
from lowbit.kernels import reference


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("n,k,batch", [(17, 100, (1,)), (64, 129, (3, 5)), (1, 32, (2,))])
def test_reference_matches_f_linear(bits, group_size, sym, n, k, batch):
    g = torch.Generator().manual_seed(bits + n + k)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(*batch, k, generator=g)
    bias = torch.randn(n, generator=g)
    qt = UniformQ.from_float(w, bits, group_size, sym)
    expected = F.linear(x, qt.dequantize(), bias)
    got = reference.linear(x, qt, bias)
    assert got.shape == (*batch, n)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(reference.linear(x.bfloat16(), qt),
                               F.linear(x.bfloat16(), qt.dequantize(torch.bfloat16)))
    # whatever kernel the registry picks agrees with the oracle up to fp32 summation order
    torch.testing.assert_close(kernels.linear(x, qt, bias), expected, rtol=1e-4, atol=1e-4 * k ** 0.5)


def test_registry_prefers_registered_kernel_and_falls_back():
    qt = UniformQ.from_float(torch.randn(4, 32), 4, 32, True)
    assert kernels.lookup("uniform", "cpu") is reference.linear or ("uniform", "cpu") in kernels.REGISTRY
    calls = []

    def fake(x, q, b):
        calls.append(q)
        return reference.linear(x, q, b)

    saved, saved_prepare = dict(kernels.REGISTRY), dict(kernels.PREPARE)
    try:
        kernels.register("uniform", "cpu")(fake)
        kernels.linear(torch.randn(2, 32), qt)
        assert calls == [qt]
        assert kernels.lookup("uniform", "no-such-device") is reference.linear
    finally:
        kernels.REGISTRY.clear()
        kernels.REGISTRY.update(saved)
        kernels.PREPARE.clear()
        kernels.PREPARE.update(saved_prepare)
