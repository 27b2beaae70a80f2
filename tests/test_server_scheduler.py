"""The continuous-batching scheduler step by step (no HTTP): a long prompt joining while another sequence
decodes is prefilled in pieces beside its decode steps, a sequence leaves when done and frees its slot,
and every output equals Session.generate on the same prompt (tiny llama, fp32 activations)."""

import torch

import lowbit
from lowbit.runtime.batching import PREFILL_STEP, Request, Scheduler
from lowbit.runtime.sampling import SamplingParams


def _request(prompt, max_tokens, out):
    def on_event(i, kind, value):
        if kind == "done":
            out[i] = value
    return Request(prompt, max_tokens, SamplingParams(), on_event=on_event)


def test_long_prompt_prefilled_in_pieces_beside_decode_steps(tiny_quantized_dir):
    model = lowbit.load(tiny_quantized_dir)
    session = model.session(max_context=512, parallel=2, exact=True)
    sch = Scheduler(session, max_queue=4)
    g = torch.Generator().manual_seed(0)
    short, long = [5, 9, 17, 3], torch.randint(0, len(model.tokenizer), (2 * PREFILL_STEP + 44,), generator=g).tolist()
    a, b = {}, {}
    sch.submit(_request(short, 12, a))
    assert [len(seg.ids) for _, seg in sch.step_once()] == [4]  # a's prompt
    sch.submit(_request(long, 3, b))  # joins while a decodes
    sizes = [[len(seg.ids) for _, seg in sch.step_once()] for _ in range(4)]
    assert sizes == [[1, PREFILL_STEP], [1, PREFILL_STEP], [1, 44], [1, 1]]  # a keeps decoding meanwhile
    while sch.step_once():
        pass
    assert sch.busy == [None, None] and not sch.active and sch.counts["completed"] == 2
    for prompt, n, out in ((short, 12, a), (long, 3, b)):
        want = model.session(max_context=512, exact=True).generate(prompt, n)
        assert out[0].tokens == want.tokens and out[0].text == want.text and out[0].finish_reason == want.finish_reason
    assert sch.metrics()["generated_tokens"] == 15
