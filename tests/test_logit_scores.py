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
