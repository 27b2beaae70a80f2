"""A model directory's tokenizer.json run by the `tokenizers` library alone, without transformers.

transformers' AutoTokenizer costs its import (~1 s: the tokenization modules, the hub client, jinja2)
to run, on a directory whose tokenizer_config.json names the generic backend ("TokenizersBackend"),
the very `tokenizers.Tokenizer` that tokenizer.json serializes (`Tokenizer.from_file`: ~0.1 s).
transformers changes that tokenizer only in these cases (tokenization_utils_tokenizers.py,
TokenizersBackend.__init__), so `read` returns None in each of them and the caller uses AutoTokenizer:

    a post-processor rebuilt from add_bos_token / add_eos_token, or for a file without one;
    special tokens named in the config but missing from the file's added tokens (it adds them);
    truncation or padding set (it resets them), a vocabulary over 100k (its Mistral regex patch);
    any tokenizer_config.json key outside the few known to change nothing about encoding.

What the evaluation asks of a tokenizer (eval/metrics.py) is then the same: `tok(text,
add_special_tokens=...)["input_ids"]` is transformers' `encode_batch([text])` ids, `bos_token_id`
the id of the config's bos_token.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
# tokenizer_config.json keys that leave transformers' tokenizer the file's (read-only flags and decoding)
HARMLESS = {"backend", "tokenizer_class", "is_local", "local_files_only", "model_max_length",
            "clean_up_tokenization_spaces", "chat_template", *SPECIAL}
MAX_VOCAB = 100_000  # above it transformers may patch a Mistral pre-tokenizer's regex


class FileTokenizer:
    """tokenizer.json's Tokenizer with the config's BOS id, called as transformers' tokenizers are."""

    def __init__(self, backend: Tokenizer, bos_token_id: int | None):
        self.backend, self.bos_token_id = backend, bos_token_id

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}


def read(path: Path) -> FileTokenizer | None:
    """The tokenizer of model directory `path` where transformers would run tokenizer.json unchanged
    (module docstring), else None; None too for missing or unreadable files (transformers then says why)."""
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
        backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception:  # missing, not JSON, not a tokenizer: transformers' loader reports it its own way
        return None
    if not isinstance(config, dict) or config.get("tokenizer_class") != "TokenizersBackend" \
            or not set(config) <= HARMLESS or backend.post_processor is None \
            or backend.truncation is not None or backend.padding is not None \
            or backend.get_vocab_size() > MAX_VOCAB:
        return None
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    named = [config.get(k) for k in SPECIAL if config.get(k) is not None]
    if not all(isinstance(t, str) and t in added for t in named):
        return None
    bos = config.get("bos_token")
    return FileTokenizer(backend, None if bos is None else backend.token_to_id(bos))
