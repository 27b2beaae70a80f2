"""Logits processors against transformers' own, seeded reproducibility, and the sampled distribution."""

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from lowbit.errors import LowbitError
from lowbit.runtime.sampling import Sampler, SamplingParams, apply_penalties, min_p, top_k, top_p


def _logits(seed, n=311):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("seed", range(5))
def test_truncations_match_transformers(seed):
    x = _logits(seed)
    kept = lambda t: torch.isfinite(t)  # noqa: E731
    for k in (1, 7, 50):
        assert torch.equal(kept(top_k(x.clone(), k)), kept(TopKLogitsWarper(k)(None, x[None].clone())[0]))
    for p in (0.1, 0.5, 0.9, 0.99):
        assert torch.equal(kept(top_p(x.clone(), p)), kept(TopPLogitsWarper(p)(None, x[None].clone())[0]))
    for p in (0.01, 0.1, 0.5):
        assert torch.equal(kept(min_p(x.clone(), p)), kept(MinPLogitsWarper(p)(None, x[None].clone())[0]))


def test_top_p_and_min_p_by_hand():
    x = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.isfinite(top_p(x.clone(), 0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p(x.clone(), 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(top_p(x.clone(), 0.01)).tolist() == [True, False, False, False]  # never empty
    assert torch.isfinite(min_p(x.clone(), 0.2)).tolist() == [True, True, True, False]


def test_repetition_penalty_matches_transformers():
    x, context = _logits(7), [3, 5, 5, 200, 17]
    ours = apply_penalties(x.clone(), context, [], SamplingParams(repetition_penalty=1.3))
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([context]), x[None].clone())[0]
    assert torch.allclose(ours, theirs)
    assert torch.equal(ours[[0, 1, 2]], x[[0, 1, 2]])


def test_presence_and_frequency_penalties():
    x = torch.zeros(10)
    out = apply_penalties(x.clone(), [1, 2, 2], [2, 2, 4], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert out[2] == pytest.approx(-(0.5 + 2 * 0.25)) and out[4] == pytest.approx(-0.75)
    assert out[1] == 0 and out[0] == 0  # prompt tokens are not penalized by OpenAI's penalties


def test_greedy_is_argmax_and_seed_reproduces():
    x = _logits(1)
    assert Sampler(SamplingParams(temperature=0, seed=3))(x, [], []) == int(x.argmax())

    def draws(seed):
        s = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [s(x, [], []) for _ in range(30)]
    assert draws(11) == draws(11)
    assert draws(11) != draws(12)



@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=1.5, top_k=5, top_p=0.9, min_p=0.05),
                                    dict(temperature=1.0, presence_penalty=2.0)])
def test_an_allowed_mask_is_never_left(params):
    """Constrained decoding's mask (runtime/constrained.py): greedy takes the best allowed token, and no
    truncation or penalty draws outside the mask, even when the mask keeps only unlikely tokens."""
    import numpy as np

    x = _logits(2)
    allowed = np.zeros(len(x), bool)
    allowed[x.argsort()[:4].numpy()] = True  # the four least likely tokens
    s = Sampler(SamplingParams(seed=0, **params))
    draws = {s(x, [], [1, 2], allowed) for _ in range(50)}
    assert draws <= set(np.flatnonzero(allowed).tolist())
    if params["temperature"] == 0:
        assert draws == {int(x.masked_fill(torch.from_numpy(~allowed), -float("inf")).argmax())}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    s = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = torch.bincount(torch.tensor([s(probs.log(), [], []) for _ in range(4000)]), minlength=4)
    assert torch.allclose(counts / 4000, probs, atol=0.03)
    # temperature 0.5 squares the odds: p ~ probs**2
    s = Sampler(SamplingParams(temperature=0.5, seed=0))
    counts = torch.bincount(torch.tensor([s(probs.log(), [], []) for _ in range(4000)]), minlength=4)
    assert torch.allclose(counts / 4000, probs**2 / (probs**2).sum(), atol=0.03)
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {s(probs.log(), [], []) for _ in range(300)} == {0, 1}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(min_p=2), dict(repetition_penalty=0), dict(presence_penalty=3)])
def test_bad_values_are_refused(bad):
    with pytest.raises(LowbitError, match=next(iter(bad))):
        Sampler(SamplingParams(**bad))


def test_draw_never_picks_a_token_of_probability_zero():
    from lowbit.runtime.sampling import draw
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0])
    picks = torch.tensor([draw(probs, g) for _ in range(2000)])
    assert set(picks.tolist()) == {1, 3}
    assert abs(float((picks == 3).float().mean()) - 0.7) < 0.04


def test_draw_over_blocks_is_the_inverse_cdf():
    """The two-level draw (block sums, then one block's cumulative sum) picks the token the plain inverse
    CDF over the whole vocabulary picks for the same uniform: a vocabulary of several blocks and a ragged
    last one, mass on block edges, zero blocks, and the one token of a block."""
    from lowbit.runtime.sampling import CDF_BLOCK, draw
    g = torch.Generator().manual_seed(5)
    n = 3 * CDF_BLOCK + 37
    probs = torch.rand(n, generator=g) ** 8
    probs[CDF_BLOCK:2 * CDF_BLOCK] = 0.0  # a block with no mass
    probs[[CDF_BLOCK - 1, 2 * CDF_BLOCK, n - 1]] = 2.0  # heavy tokens at block edges and at the end
    probs /= probs.sum()
    cdf = probs.double().cumsum(0)
    ours, theirs = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    picks = []
    for _ in range(3000):
        u = torch.rand((), dtype=torch.float64, generator=theirs)
        picks.append(draw(probs, ours))
        assert picks[-1] == int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    assert all(probs[i] > 0 for i in picks) and {CDF_BLOCK - 1, 2 * CDF_BLOCK, n - 1} <= set(picks)


@pytest.mark.parametrize("params", [dict(temperature=0.7), dict(temperature=1.5, top_k=5, top_p=0.9, min_p=0.05),
                                    dict(temperature=0), dict(temperature=1.0, repetition_penalty=1.3,
                                                              presence_penalty=0.5)])
def test_sampling_leaves_the_callers_logits_alone(params):
    """The server samples several choices from one row of logits: no sampler may change it (only a
    penalty or a grammar mask takes a copy; temperature and truncations work on their own result)."""
    x = _logits(3)
    before = x.clone()
    Sampler(SamplingParams(seed=1, **params))(x, [1, 2, 3], [3, 4])
    assert torch.equal(x, before)
