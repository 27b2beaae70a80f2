"""lm-eval's `local-completions` model against `lowbit serve`: a loglikelihood_rolling task on local data
(tests/data/lowbit_pydoc_rolling.yaml over paragraphs of lowbit's own held-out pydoc text, written here
from the installed corpus; the hub is switched off) scores the served SmolLM2 W4, and its word
perplexity and bits per byte equal what `lowbit.eval.evaluate` (what `lowbit eval` runs) computes on the
same text with the same scoring.

The same scoring: lm-eval scores a document as rolling windows whose first one starts with a prefix
token (the tokenizer's BOS, here <|im_start|>) and scores every document token; `evaluate` scores
every token of its text but the first. So our side scores BOS + document, one window per document
(`ctx` 2048 holds each paragraph; lm-eval's `max_length` 2048 does too, so neither side splits a
document and the windows are identical), adds up the log-losses (ppl ** tokens) and divides by the
document's words (lm-eval's count: pieces between runs of whitespace) or bytes. The server runs
--exact --kv-cache fp32, the path `evaluate` scores on, so the two agree to float rounding.
"""

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import lowbit
from lowbit.calib import load as load_text
from lowbit.eval import evaluate

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow
TASKS = Path(__file__).parent / "data"
PARAGRAPHS = 6
CTX = 2048


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(smollm_w4_dir):
    """`lowbit serve` on the model, in a process of its own; its base URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "serve", str(smollm_w4_dir), "--port", str(port),
                             "--name", "smollm2-w4", "--exact", "--kv-cache", "fp32", "--max-context", str(CTX),
                             "--parallel", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"lowbit serve did not start: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_lm_eval_rolling_perplexity_equals_lowbit_eval(served, smollm_w4_dir, tmp_path, monkeypatch):
    docs = [p.strip() for p in load_text("eval").split("\n\n") if len(p.split()) >= 25][:PARAGRAPHS]
    monkeypatch.chdir(tmp_path)  # the task's data file is relative: lm-eval reads it from here
    (tmp_path / "pydoc_paragraphs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["lowbit_pydoc_rolling"], task_manager=TaskManager(include_path=str(TASKS)),
        model_args={"model": "smollm2-w4", "base_url": served + "/v1/completions", "tokenizer": str(smollm_w4_dir),
                    "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": CTX},
        log_samples=False)
    theirs = out["results"]["lowbit_pydoc_rolling"]
    assert out["n-samples"]["lowbit_pydoc_rolling"]["effective"] == PARAGRAPHS

    q = lowbit.load(smollm_w4_dir)
    tok = q.tokenizer
    nll = words = nbytes = 0
    for doc in docs:
        ids = tok(tok.bos_token + doc, add_special_tokens=False).input_ids
        assert ids == [tok.bos_token_id] + tok(doc, add_special_tokens=False).input_ids  # lm-eval's tokens
        assert len(ids) <= CTX - 1  # one window each side
        r = evaluate(q.model, tok, tok.bos_token + doc, ctx=CTX, progress=False)
        assert (r.windows, r.tokens) == (1, len(ids) - 1)
        nll += math.log(r.ppl) * r.tokens
        words += len(re.split(r"\s+", doc))
        nbytes += len(doc.encode())
    # float rounding: the server's log-probabilities are torch's float log-softmax (its sum over the
    # 49152-token vocabulary ~3e-6 low in log-loss), evaluate's are float64-close (tests/test_logit_scores.py)
    assert theirs["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=3e-5)
    assert theirs["bits_per_byte,none"] == pytest.approx(nll / nbytes / math.log(2), rel=3e-5)
    assert 1 < theirs["bits_per_byte,none"] < 2  # a real model on real English: ~1.2 bits per byte
