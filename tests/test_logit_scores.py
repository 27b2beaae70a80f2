"""Per-row scores of logits (kernels/cpu/logit_scores): the native pass gives each row's log-loss and
KL(source ‖ model) as float64 computes them (closer than torch's float log-softmax), NaN stays NaN, any
row stride is read right; evaluate() built on it gives the plain torch computation's ppl and KLD."""

import math

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.calib import builtin
from lowbit.eval import metrics
from lowbit.kernels.cpu import logit_scores


def _float64(zm, zs, target):
    lq, lp = F.log_softmax(zm.double(), -1), F.log_softmax(zs.double(), -1)
    pick = target[:, None]
    return torch.stack([-lq.gather(1, pick)[:, 0], -lp.gather(1, pick)[:, 0], (lp.exp() * (lp - lq)).sum(-1)], 1)


def _logits(rows=16, vocab=49157, seed=0):
    """Logits shaped like a language model's: a broad body, a few tokens far above it (max ~40, one of
    them the target), a vocabulary as large as SmolLM2's and no multiple of the vector width; the
    source close to the model."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(rows, vocab, generator=g) * 4
    top = torch.randint(0, vocab, (rows, 3), generator=g)
    zs.scatter_(1, top, 40.0 + torch.rand(rows, 3, generator=g))
    zm = zs + torch.randn(rows, vocab, generator=g) * 0.3
    return zm, zs, top[:, 0]


def test_native_scores_are_float64s():
    zm, zs, target = _logits()
    want = _float64(zm, zs, target)
    got = logit_scores.row_scores(zm, zs, target)
    assert got.dtype == torch.float64 and got.shape == (16, 3)
    assert torch.allclose(got, want, rtol=1e-6, atol=2e-7)  # each row to float rounding of its last step
    assert torch.allclose(got.sum(0), want.sum(0), rtol=1e-6, atol=0)  # the sums evaluate reports
    torch.testing.assert_close(logit_scores.reference(zm, zs, target), want, rtol=1e-5, atol=2e-5)
    alone = logit_scores.row_scores(zm, None, target)  # the model's log-loss only
    assert torch.equal(alone[:, 0], got[:, 0]) and not alone[:, 1:].any()


def test_rows_of_any_stride_and_nan():
    zm, zs, target = _logits(rows=9, vocab=300)
    wide = torch.zeros(9, 512)
    wide[:, :300] = zm  # rows 512 floats apart
    assert torch.equal(logit_scores.row_scores(wide[:, :300], zs, target), logit_scores.row_scores(zm, zs, target))
    zm[4, 17] = float("nan")
    got = logit_scores.row_scores(zm, zs, target)
    assert got[4, 0].isnan() and got[4, 2].isnan() and not got[3].isnan().any() and not got[5].isnan().any()
    with pytest.raises(ValueError, match="target"):
        logit_scores.row_scores(zm, zs, torch.full((9,), 300))


def test_evaluate_is_the_plain_torch_computation(tiny_model_dir, tiny_tokenizer):
    """ppl, source ppl and KLD of evaluate() against the models' own forward and F.log_softmax /
    F.kl_div in float64, window by window: to float rounding through transformers (the scores alone
    differ), to the engine's own rounding on the native engine (tests/test_engine.py holds it to
    transformers')."""
    src = lowbit.load(tiny_model_dir())
    q = lowbit.quantize(lowbit.load(tiny_model_dir()), lowbit.RTN(bits=3, group_size=32), lm_head=True, progress=False)
    text = builtin("eval")[:6000]
    nll = src_nll = kl = 0.0
    with torch.no_grad():
        for window, first in metrics.scored_windows(tiny_tokenizer, text, 64, max_windows=3):
            lq, lp = (F.log_softmax(m(window[None]).logits[0, first - 1:-1].double(), -1) for m in (q.model, src.model))
            target = window[first:, None]
            nll -= lq.gather(1, target).sum().item()
            src_nll -= lp.gather(1, target).sum().item()
            kl += F.kl_div(lq, lp, log_target=True, reduction="sum").item()
    for engine, rel in ((False, 1e-7), (True, 1e-5)):
        got = metrics.evaluate(q.model, tiny_tokenizer, text, ctx=64, max_windows=3, source=src.model,
                               progress=False, engine=engine)
        assert got.tokens == 3 * 63
        assert got.ppl == pytest.approx(math.exp(nll / got.tokens), rel=rel)
        assert got.source_ppl == pytest.approx(math.exp(src_nll / got.tokens), rel=rel)
        assert got.kld == pytest.approx(kl / got.tokens, rel=10 * rel, abs=1e-7) and got.kld > 0  # float32 (lp − lq)


def _p_weighted_spread(zm, record):
    """E_p|log q − E_p log q| of each row, p the record's (what bounds the cross term's error)."""
    codes, meta = record
    k = codes.double()
    p = torch.where(k > 0, torch.exp(meta[:, :1] + (k - 1) * meta[:, 1:2]), 0)
    p = p / p.sum(-1, keepdim=True)
    lq = F.log_softmax(zm.double(), -1)
    mean = (p * lq).sum(-1, keepdim=True)
    return (p * (lq - mean).abs()).sum(-1)


@pytest.mark.parametrize("rows,vocab", [(1, 17), (7, 300), (33, 49157)])
def test_records_are_the_torch_records(rows, vocab):
    """The native record (codes, [lo, step, target log-loss, Σ p log p]) is reference_records' on odd
    shapes: codes within one (a logit on a rounding boundary), scalars to float rounding."""
    zm, zs, target = _logits(rows, vocab, seed=rows)
    codes, meta = logit_scores.records(zs, target)
    want_codes, want_meta = logit_scores.reference_records(zs, target)
    assert codes.dtype == torch.uint16 and codes.shape == (rows, vocab) and meta.shape == (rows, 4)
    assert (codes.int() - want_codes.int()).abs().max() <= 1
    torch.testing.assert_close(meta, want_meta, rtol=1e-6, atol=5e-6)
    exact = _float64(zm, zs, target)
    assert torch.allclose(meta[:, 2], exact[:, 1], rtol=1e-6, atol=2e-7)  # the source's log-loss: exact
    assert torch.equal(meta[:, 2], logit_scores.row_scores(zm, zs, target)[:, 1])  # bit for bit as uncached
    lp = F.log_softmax(zs.double(), -1)
    assert torch.allclose(meta[:, 3], (lp.exp() * lp).sum(-1), rtol=1e-6, atol=2e-7)  # Σ p log p: exact


@pytest.mark.parametrize("rows,vocab", [(1, 17), (7, 300), (64, 49157)])
def test_kl_from_a_record_is_within_its_bound(rows, vocab):
    """KL against a record: the model's and the source's log-losses exact, the KL within the rounding
    bound of its codes (half a step of log p: ≤ 2·h·E_p|log q − E_p log q| a row, h = 32/131068), its
    mean far closer (unbiased rounding), and what the torch reference of the record computes."""
    zm, zs, target = _logits(rows, vocab, seed=rows + 1)
    record = logit_scores.records(zs, target)
    got, exact = logit_scores.row_scores(zm, None, target, record), _float64(zm, zs, target)
    assert torch.allclose(got[:, :2], exact[:, :2], rtol=1e-6, atol=2e-7)
    bound = 2 * (32 / 131068) * _p_weighted_spread(zm, record) + 1e-6
    assert ((got[:, 2] - exact[:, 2]).abs() <= bound).all()
    assert abs((got[:, 2] - exact[:, 2]).mean()) < 1e-5
    torch.testing.assert_close(got, logit_scores.reference(zm, None, target, record), rtol=1e-5, atol=2e-6)
    assert not torch.equal(got[:, 2], exact[:, 2]) or rows == 1  # really computed from the codes
    torch.testing.assert_close(logit_scores.reference(zm, None, target, logit_scores.reference_records(zs, target)),
                               got, rtol=1e-5, atol=2e-6)


def test_records_of_flat_wide_and_nan_rows():
    """A constant row (step 0), a row wider than 32 nats (its tail coded 0: no mass), and NaN (NaN
    scalars, which evaluate refuses and the cache never keeps); rows of any stride."""
    zs = torch.zeros(3, 40)
    zs[1] = torch.linspace(-60, 0, 40)
    zs[2, 5] = float("nan")
    target = torch.tensor([3, 39, 0])
    codes, meta = logit_scores.records(zs, target)
    k = codes.int()
    assert meta[0, 1] == 0 and (k[0] == 1).all() and meta[0, 2] == pytest.approx(math.log(40), rel=1e-6)
    assert (k[1][zs[1] < -32] == 0).all() and k[1, -1] == 65535 and (k[1][zs[1] >= -32] > 0).all()
    assert meta[2].isnan().any()
    zm = torch.randn(3, 40)
    got = logit_scores.row_scores(zm, None, target, (codes, meta))
    assert not got[:2].isnan().any() and got[2, 1:].isnan().any()
    assert got[0, 2] == pytest.approx(_float64(zm[:1], zs[:1], target[:1])[0, 2].item(), abs=1e-6)
    wide = torch.zeros(3, 64)
    wide[:, :40] = zs
    again = logit_scores.records(wide[:, :40], target)
    assert torch.equal(again[0], codes) and torch.equal(again[1][:2], meta[:2])
