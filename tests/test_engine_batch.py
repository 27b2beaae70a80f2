"""Batched steps of the native engine: B sequences advanced together (each at its own position, in its
own KV slot, the linears run once over all the step's tokens) give the logits each gives alone.

Tiny random models quantized in process (test_engine.py's), fp32 activations (`exact`: the
single-token GEMV and the many-token GEMM then differ only in rounding), several families so GQA,
sliding windows and soft-capping are covered.
"""

import pytest
import torch
from test_engine import assert_close, quantized

from lowbit.errors import LowbitError
from lowbit.runtime.engine import Segment, load_decoder

PROMPTS = [[5, 9, 17, 3, 44, 8, 120, 7, 66, 2, 31], [11, 12], [200, 4, 19, 77, 5, 6, 101], [3]]


def alone(model, ids: list[int], prompt: int, kv_dtype: str) -> list[torch.Tensor]:
    """Logits after the prompt, then after each further token, from a one-sequence engine."""
    eng = load_decoder(model, max_context=64, kv_dtype=kv_dtype)
    out = [eng.forward(ids[:prompt])]
    out += [eng.forward([t]) for t in ids[prompt:]]
    return out


@pytest.mark.parametrize("family,kv_dtype", [("llama", "fp32"), ("qwen2", "fp16"), ("gemma2", "bf16"), ("llama", "int8")])
def test_batched_steps_equal_each_sequence_alone(family, kv_dtype):
    """Four sequences of different prompt lengths: prefills beside decode steps, one joining after the
    others have decoded a while, one leaving early; every row against the same sequence run alone."""
    model = quantized(family)
    g = torch.Generator().manual_seed(1)
    tails = [torch.randint(0, 320, (6,), generator=g).tolist() for _ in PROMPTS]
    seqs = [p + t for p, t in zip(PROMPTS, tails)]
    want = [alone(model, s, len(p), kv_dtype) for s, p in zip(seqs, PROMPTS)]
    eng = load_decoder(model, max_context=64, kv_dtype=kv_dtype, slots=4)
    assert eng.slots == 4
    got = [[] for _ in seqs]
    pos = [0] * 4
    joins = {0: 0, 1: 0, 2: 0, 3: 3}  # sequence -> the step it joins at
    leaves = {1: 3}  # sequence 1 stops after 3 decoded tokens
    for step in range(12):
        segs, who = [], []
        for i, s in enumerate(seqs):
            if step < joins[i] or len(got[i]) > len(tails[i]) or len(got[i]) > leaves.get(i, 99):
                continue
            n = len(PROMPTS[i]) if pos[i] == 0 else 1
            segs.append(Segment(slot=(i + 2) % 4, pos0=pos[i], ids=s[pos[i]:pos[i] + n]))
            who.append(i)
        if not segs:
            break
        rows = eng.step(segs)
        for r, i in enumerate(who):
            got[i].append(rows[r])
            pos[i] += len(segs[r].ids)
    for i in range(4):
        n = leaves.get(i, len(tails[i])) + 1
        assert len(got[i]) == n
        for a, b in zip(got[i], want[i][:n]):
            assert_close(a, b, 2e-3 if kv_dtype == "fp32" else 1e-2)


@pytest.mark.parametrize("kv_dtype", ["fp32", "int8"])
def test_every_position_logits_and_copied_prefix(kv_dtype):
    """want=2 returns a row per token (what prompt log-probabilities need); a prefix copied to another
    slot (int8: its scales too) continues exactly as the original."""
    model = quantized("llama")
    ids = PROMPTS[0]
    eng = load_decoder(model, max_context=64, kv_dtype=kv_dtype, slots=3)
    rows = eng.step([Segment(0, 0, ids, want=2)])
    assert rows.shape == (len(ids), 320)
    ref = load_decoder(model, max_context=64, kv_dtype=kv_dtype)
    for t in range(len(ids)):
        assert_close(rows[t], ref.forward([ids[t]]))
    eng.copy(0, 2, len(ids))
    a, b = eng.step([Segment(0, len(ids), [9]), Segment(2, len(ids), [9])])
    assert torch.equal(a, b)


def test_step_refuses_what_it_cannot_run():
    eng = load_decoder(quantized("llama"), max_context=16, slots=2)
    for segs in ([Segment(2, 0, [1])], [Segment(0, 15, [1, 2])], [Segment(0, 0, [320])],
                 [Segment(0, 0, [1]), Segment(0, 1, [2])], []):
        with pytest.raises(LowbitError):
            eng.step(segs)
    with pytest.raises(LowbitError, match="at most"):
        eng.step([Segment(0, 0, [1] * (eng.max_step_tokens + 1))])
    with pytest.raises(LowbitError, match="slots"):
        load_decoder(quantized("llama"), slots=0)


def greedy_together(eng, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy continuations of all prompts decoded together, one batched step per token."""
    rows = eng.step([Segment(i, 0, p) for i, p in enumerate(prompts)])
    out = [[int(r.argmax())] for r in rows]
    for _ in range(steps - 1):
        rows = eng.step([Segment(i, len(p) + len(o) - 1, [o[-1]]) for i, (p, o) in enumerate(zip(prompts, out))])
        for o, r in zip(out, rows):
            o.append(int(r.argmax()))
    return out


@pytest.mark.slow
def test_smollm2_sequences_decoded_together_as_alone():
    """The real model (its fp16 linears as loaded: no quantization time) and four prompts of different
    lengths: the greedy tokens of a batched decode are those of each prompt decoded alone."""
    from lowbit.models import load_source

    loaded = load_source()
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
             "List three colours:"]
    prompts = [loaded.tokenizer(t).input_ids for t in texts]
    eng = load_decoder(loaded.model, max_context=64, slots=4)
    together = greedy_together(eng, prompts, 8)
    for p, t in zip(prompts, together):
        eng.truncate(0)  # slot 0 alone
        got = [int(eng.forward(p).argmax())]
        for _ in range(7):
            got.append(int(eng.forward([got[-1]]).argmax()))
        assert got == t


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


@pytest.mark.parametrize("kv_dtype", ["fp16", "int8"])
def test_kv_memory_follows_the_tokens_held(kv_dtype):
    """A token in each of 16 slots at a 16k context touches a few 4 KiB pages per (slot, layer, kv head),
    not the cache: in 2 MiB huge pages (the weights' mapping) each region's first token would fault in
    a whole page, ~48 MiB here, and a server's short requests would hold its whole KV cache."""
    model = quantized("llama")
    eng = load_decoder(model, max_context=16384, kv_dtype=kv_dtype, slots=16)
    c = model.config
    regions = 16 * c.num_hidden_layers * c.num_key_value_heads * 2
    before = _rss_kib()
    eng.step([Segment(slot=s, pos0=0, ids=[5 + s]) for s in range(16)])
    grown = _rss_kib() - before
    assert grown <= regions * 3 * 4 + 2048, f"{grown} KiB for 16 tokens in {regions} KV regions"
