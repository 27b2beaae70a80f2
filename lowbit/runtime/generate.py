"""Text generation with streaming and honest timing (prefill vs decode), on top of HF `generate`."""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import TextStreamer


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # until the first new token
    decode_s: float  # from the first new token to the last

    @property
    def decode_tps(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


class _TimedStreamer(TextStreamer):
    """Forwards decoded text to a callback and notes when each token arrived."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text, self.times = on_text, []

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self.times.append(time.perf_counter())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.on_text and text:
            self.on_text(text)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int | None = None, on_text: Callable[[str], None] | None = None):
    """(generated text, GenerationStats); `on_text` receives the text as it is produced."""
    if seed is not None:
        torch.manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    streamer = _TimedStreamer(tokenizer, on_text)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} \
        if temperature > 0 else {"do_sample": False}
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             streamer=streamer, pad_token_id=tokenizer.pad_token_id
                             if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                             **sampling)
    new = out[0, ids.shape[1]:]
    t = streamer.times or [start]
    stats = GenerationStats(ids.shape[1], len(new), t[0] - start, t[-1] - t[0])
    return tokenizer.decode(new, skip_special_tokens=True), stats
