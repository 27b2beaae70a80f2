"""The cached source scores on the real embedded model (SmolLM2-135M-Instruct, vocabulary 49152): the
KL from the uint16 records is within 1e-4 of the exact KL (measured: ~5e-7 on all 33 windows, see
BENCHMARKS.md), perplexities exactly equal, and a second evaluation reads the file and gives the same
numbers. A few windows only."""

import copy

import pytest

import lowbit
from lowbit.calib import load as load_text
from lowbit.eval import evaluate, source_cache
from lowbit.models import load_source

pytestmark = pytest.mark.slow


def test_records_kl_is_the_exact_kl_on_smollm2(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    src = load_source()
    q = lowbit.quantize(copy.deepcopy(src.model), lowbit.RTN(bits=4, group_size=32), tokenizer=src.tokenizer,
                        progress=False)
    run = dict(max_windows=3, source=src.model, progress=False, exact=False)
    text = load_text("eval")
    exact = evaluate(q.model, src.tokenizer, text, **run)
    first, second = (evaluate(q.model, src.tokenizer, text, source_key="smollm2", **run) for _ in range(2))
    assert len(list(source_cache.directory().glob("*" + source_cache.SUFFIX))) == 1
    assert first == second and (first.ppl, first.source_ppl) == (exact.ppl, exact.source_ppl)
    assert first.kld != exact.kld and abs(first.kld - exact.kld) < 1e-4
