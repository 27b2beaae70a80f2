"""Calibration and evaluation text.

Built in: the pydoc topics that ship with every CPython (`pydoc_data.topics`): real English prose
about Python, written by its documenters, installed with the interpreter. Fixed split: the topics
sorted by name; every fourth one (index % 4 == 3) is evaluation text, the other three quarters are
calibration text, so no evaluation passage is ever seen while calibrating.

A user's own file: `.txt` (used whole) or `.jsonl` (one JSON object per line with a "text" field,
or a bare JSON string per line).
"""

import json
from pathlib import Path

from ..errors import LowbitError

EVAL_EVERY = 4


def builtin(part: str) -> str:
    """The built-in corpus' 'calib' or 'eval' part."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    keep = (lambda i: i % EVAL_EVERY == EVAL_EVERY - 1) if part == "eval" else \
        (lambda i: i % EVAL_EVERY != EVAL_EVERY - 1)
    return "\n\n".join(topics[n].strip() for i, n in enumerate(names) if keep(i))


def read_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"text file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LowbitError(f"{path} is not UTF-8 text") from None
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise LowbitError(f"{path}:{n} is not valid JSON") from None
            text = obj.get("text") if isinstance(obj, dict) else obj
            if not isinstance(text, str):
                raise LowbitError(f'{path}:{n} has no "text" string')
            docs.append(text)
        raw = "\n\n".join(docs)
    return raw


def load(part: str, path: str | Path | None = None) -> str:
    """Text for `part` ('calib' or 'eval'): the user's file if given, else the built-in split."""
    text = builtin(part) if path is None else read_file(path)
    if not text.strip():
        what = "calibration" if part == "calib" else "evaluation"
        raise LowbitError(f"{what} text is empty" + (f": {path}" if path else ""))
    return text
