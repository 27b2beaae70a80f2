"""One-shot text generation: a fresh Session over the model, streamed, with prefill/decode timing."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .sampling import SamplingParams
from .session import GenerationStats, Session

__all__ = ["GenerationStats", "generate"]


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int | None = None, on_text: Callable[[str], None] | None = None, *,
             sampling: SamplingParams | None = None, stop: Sequence[str] = (), threads: int | None = None,
             max_context: int | None = None, exact: bool = False, kv_cache: str = "fp16"):
    """(generated text, GenerationStats); `on_text` receives the text as it is produced. `sampling`
    (top-k, top-p, min-p, penalties) replaces `temperature` and `seed` when given; `exact`: see
    `decoder_for`; `kv_cache`: the engine's cache type (fp16, bf16, fp32, int8)."""
    session = Session.for_model(model, tokenizer, max_context, threads, exact=exact, kv_cache=kv_cache)
    params = sampling or SamplingParams(temperature=temperature, seed=seed)
    out = session.generate(session.encode(prompt), max_new_tokens, params, stop=stop, on_text=on_text)
    return out.text, out.stats
