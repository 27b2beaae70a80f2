"""The Triton kernels (UniformQ, CodebookQ) against the reference kernel on odd shapes: every bits ×
group × sym, codebooks with and without outliers, batch 1 and 3 (GEMV) and 33 (GEMM), fp16 and bf16.

Runs on a CUDA GPU; skips without one or without triton (CI). TRITON_INTERPRET=1 runs it on the CPU
through Triton's interpreter (slow; its bf16 tl.dot is wrong and it has no bf16 atomics, so bf16 GEMM
and split-K are skipped in that mode).
"""

import os

import pytest
import torch

from lowbit import kernels
from lowbit.formats import BITS, GROUP_SIZES, CodebookQ, UniformQ
from lowbit.formats.codebook import CODEBOOK_BITS
from lowbit.kernels import reference

pytest.importorskip("triton", reason="triton is not installed")
from lowbit.kernels.gpu import triton_linear  # noqa: E402
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if torch.cuda.is_available():
    DEVICE = "cuda"
elif INTERPRET:
    DEVICE = "cpu"
else:
    pytest.skip("no CUDA GPU", allow_module_level=True)

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}
BATCHES = (1, 3, 33)  # GEMV, GEMV with a batch tail, GEMM with an M tail


def _check(lin, qt, n, k, g, dtypes=(torch.float16, torch.bfloat16), batches=BATCHES, **config):
    bias = torch.randn(n, generator=g)
    for dtype in dtypes:
        for batch in batches:
            if INTERPRET and dtype == torch.bfloat16 and (batch > triton_linear.GEMV_MAX_BATCH or config):
                continue
            x = torch.randn(batch, k, generator=g).to(dtype)
            b = bias if batch == 3 else None
            got = lin(x.to(DEVICE), None if b is None else b.to(DEVICE, dtype), **config)
            assert got.dtype == dtype and got.shape == (batch, n)
            want = reference.linear(x.float(), qt, None if b is None else b.to(dtype).float())
            tol = TOL[dtype]
            torch.testing.assert_close(got.cpu().float(), want, rtol=tol, atol=tol * want.abs().max().item(),
                                       msg=lambda m, d=dtype, b=batch: f"{d}, batch {b}: {m}")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False])
def test_uniform_matches_reference(bits, group_size, sym):
    g = torch.Generator().manual_seed(bits * 131 + group_size * 7 + sym)
    n, k = 37, 200  # N odd, K neither a multiple of 32 nor of the group: ragged last group and block
    qt = UniformQ.from_float(torch.randn(n, k, generator=g), bits, group_size, sym)
    _check(triton_linear.TritonLinear(qt, DEVICE), qt, n, k, g)


@pytest.mark.parametrize("bits", CODEBOOK_BITS)
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("outliers", [False, True])
def test_codebook_matches_reference(bits, group_size, outliers):
    g = torch.Generator().manual_seed(bits * 131 + group_size * 7 + outliers)
    n, k = 37, 200
    groups = 1 if group_size == -1 else -(-k // group_size)
    idx = torch.randint(0, 2**bits, (n, k), generator=g)
    sparse = None
    if outliers:  # ~2% of the weights, some rows with none
        sparse = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.02)
        sparse[::5] = 0
    qt = CodebookQ.from_indices(idx, torch.randn(n, groups, 2**bits, generator=g), bits, group_size, sparse)
    assert qt.has_outliers == outliers
    _check(triton_linear.TritonLinear(qt, DEVICE), qt, n, k, g)


@pytest.mark.parametrize("bits", [3, 4])
def test_many_tiles(bits):
    """Several K steps and row programs in both kernels, and a [batch, seq, K] input."""
    g = torch.Generator().manual_seed(bits)
    n, k = 301, 1000
    qt = UniformQ.from_float(torch.randn(n, k, generator=g), bits, 128, False)
    lin = triton_linear.TritonLinear(qt, DEVICE)
    _check(lin, qt, n, k, g, dtypes=(torch.float16,), batches=(1, 8, 40))
    x = torch.randn(2, 5, k, generator=g).half()
    torch.testing.assert_close(lin(x.to(DEVICE)).cpu().float(), reference.linear(x.float(), qt),
                               rtol=2e-3, atol=2e-3 * 30)
    cb = CodebookQ.from_indices(qt.codes(), torch.randn(n, 1, 2**bits, generator=g), bits, -1)
    _check(triton_linear.TritonLinear(cb, DEVICE), cb, n, k, g, dtypes=(torch.float16,), batches=(1, 40))


@pytest.mark.parametrize("codebook", [False, True])
def test_split_k(codebook):
    """Decode with K split over programs that add their partial sums into y (bias and outliers once)."""
    g = torch.Generator().manual_seed(11 + codebook)
    n, k = 45, 1000
    if codebook:
        sparse = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.02)
        qt = CodebookQ.from_indices(torch.randint(0, 8, (n, k), generator=g), torch.randn(n, 1, 8, generator=g),
                                    3, -1, sparse)
    else:
        qt = UniformQ.from_float(torch.randn(n, k, generator=g), 4, 64, True)
    _check(triton_linear.TritonLinear(qt, DEVICE), qt, n, k, g, batches=(1, 3), SPLIT=3, NBLK=4)


def test_float32_activations():
    g = torch.Generator().manual_seed(5)
    qt = UniformQ.from_float(torch.randn(45, 96, generator=g), 4, 32, True)
    _check(triton_linear.TritonLinear(qt, DEVICE), qt, 45, 96, g, dtypes=(torch.float32,))


@pytest.mark.skipif(DEVICE != "cuda", reason="QuantLinear dispatches by the input's device type")
def test_quant_linear_uses_triton_on_cuda():
    from lowbit.nn import QuantLinear

    g = torch.Generator().manual_seed(9)
    qt = UniformQ.from_float(torch.randn(64, 160, generator=g), 4, 32, False)
    layer = QuantLinear(qt, torch.randn(64, generator=g)).cuda()
    x = torch.randn(2, 160, generator=g).half()
    got = layer(x.cuda())
    assert isinstance(layer._prepared, triton_linear.TritonLinear)
    want = reference.linear(x.float(), qt, layer.bias.detach().cpu().half().float())
    torch.testing.assert_close(got.cpu().float(), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    assert kernels.kernel_for(qt, "cuda") == "uniform-b4-triton-float"
