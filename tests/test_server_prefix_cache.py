"""The prefix cache: finished prompts' KV parked in spare engine slots by token-prefix hash, LRU, bounded;
a later prompt with the same start continues from the parked prefix with the logits of computing it."""

import openai
import pytest
import torch
from test_engine import assert_close, quantized
from test_server_batching import NAME, _metrics, _serial

import lowbit
from lowbit.runtime.engine import Segment, load_decoder
from lowbit.runtime.prefix_cache import BLOCK, PrefixCache, block_hashes
from lowbit.runtime.server import Running, create_app
from lowbit.runtime.session import Session


def test_hashes_are_per_whole_block_and_chained():
    a = list(range(100))
    assert len(block_hashes(a)) == 100 // BLOCK and block_hashes(a[:BLOCK]) == block_hashes(a)[:1]
    b = [7] + a[1:]  # a different first block changes every later hash
    assert all(x != y for x, y in zip(block_hashes(a), block_hashes(b)))


def test_park_lookup_and_least_recently_used_eviction():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, 320, (2 * BLOCK + 5,), generator=g).tolist() for _ in range(3))
    eng = load_decoder(quantized("llama"), max_context=128, kv_dtype="fp32", slots=3)
    cache = PrefixCache(eng, [1, 2])
    want = eng.step([Segment(0, 0, a)])[0]
    cache.park(0, a)
    cache.park(0, a)  # already held: no second spare
    assert cache.parked == 1 and cache.lookup(a + [1, 2]) == (1, 2 * BLOCK)
    assert cache.lookup(c) == (-1, 0)
    eng.step([Segment(0, 0, [9] * 5)])  # slot 0 now holds something else
    eng.copy(1, 0, 2 * BLOCK)
    assert_close(eng.step([Segment(0, 2 * BLOCK, a[2 * BLOCK:])])[0], want)  # continues as computed whole
    eng.step([Segment(0, 0, b)])
    cache.park(0, b)
    cache.lookup(a)  # a is now the most recently used
    eng.step([Segment(0, 0, c)])
    cache.park(0, c)  # evicts b, the least recently used; two spares at most
    assert cache.lookup(b) == (-1, 0) and cache.lookup(a)[1] == cache.lookup(c)[1] == 2 * BLOCK
    assert len(cache.lru) == 2


def test_server_reuses_a_parked_system_prompt(tiny_quantized_dir):
    """One serving slot: a different request in between overwrites it, the parked prefix still serves."""
    model = lowbit.load(tiny_quantized_dir)
    session = model.session(max_context=256, parallel=1, prefix_cache=2, exact=True)
    assert session.decoder.slots == 3 and session.prefix_slots == 2
    server = Running(create_app(session, NAME))
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        system = "You are a careful assistant. Answer every question in one short sentence, please. " * 2
        assert len(model.tokenizer(system).input_ids) > BLOCK
        for prompt in (system + "Q: sky?", "Something else entirely.", system + "Q: sea?"):
            r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0)
            assert r.choices[0].text == _serial(model, prompt, 6).text
        m = _metrics(server)
        assert m["lowbit_prefix_cache_hits_total"] == 1 and m["lowbit_prefix_cache_slots"] == 2
        assert m["lowbit_prompt_tokens_cached_total"] >= BLOCK
    finally:
        server.stop()


def test_prefix_cache_sizes(tiny_tokenizer):
    """Spare slots: as many as `parallel` by default, or as asked; half of the memory's when parallel is too."""
    model = quantized("llama")
    for parallel, cache, total, spare in ((2, None, 4, 2), (3, 0, 3, 0), (1, 2, 3, 2)):
        s = Session.for_model(model, tiny_tokenizer, max_context=16, parallel=parallel, prefix_cache=cache)
        assert (s.decoder.slots, s.prefix_slots) == (total, spare)
    s = Session.for_model(model, tiny_tokenizer, max_context=16, parallel=None, prefix_cache=None)
    assert s.prefix_slots == s.decoder.slots // 2
    with pytest.raises(lowbit.LowbitError):
        Session.for_model(model, tiny_tokenizer, max_context=16, prefix_cache=-1)
