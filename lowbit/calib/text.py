"""Calibration and evaluation text.

Built-in corpora, each split the same fixed way: its documents sorted by name, every fourth one
(index % 4 == 3) is evaluation text, the other three quarters calibration text, so no evaluation
passage is ever seen while calibrating.
  pydoc  the pydoc topics that ship with every CPython (`pydoc_data.topics`): real English prose
         about Python, written by its documenters, installed with the interpreter (465 KB).
  prose  Ambrose Bierce's *The Devil's Dictionary* (1881-1906; public domain), as Debian's
         `dict-devil` package ships it (`make setup` unpacks it into the cache, no root needed):
         satirical literary English with verse, nothing about programming (384 KB). One
         document per headword, read through the dictd index (headword, base64 offset, length).
  mixed  both parts, one after the other: windows spread evenly over it are ~55% pydoc, ~45% prose.
A model calibrated and judged on pydoc alone is judged in its own domain; `prose` is the
out-of-domain check (README, BENCHMARKS.md). Unnamed, calibration is `mixed` and evaluation `pydoc`
(`default_corpus`).

A user's own file: `.txt` (used whole) or `.jsonl` (one JSON object per line with a "text" field,
or a bare JSON string per line).
"""

import gzip
import json
import warnings
import zlib
from pathlib import Path

from pydoc_data.topics import topics

from ..errors import LowbitError
from ..settings import cache_root

EVAL_EVERY = 4
CORPORA = ("pydoc", "prose", "mixed")
PROSE_DIRS = ("/usr/share/dictd", "corpora/dict-devil/usr/share/dictd")  # the system's, else under the cache
PROSE_NAME = "devil"
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _split(docs: dict[str, str], part: str) -> str:
    """The 'calib' or 'eval' part of named documents (the fixed split of the module docstring)."""
    keep = (lambda i: i % EVAL_EVERY == EVAL_EVERY - 1) if part == "eval" else \
        (lambda i: i % EVAL_EVERY != EVAL_EVERY - 1)
    return "\n\n".join(docs[n].strip() for i, n in enumerate(sorted(docs)) if keep(i))


def _b64(word: str) -> int:
    """A dictd index number: base64 digits, most significant first."""
    value = 0
    for ch in word:
        digit = B64.find(ch)
        if digit < 0:
            raise ValueError(word)
        value = value * 64 + digit
    return value


def parse_dictd(index: str, data: bytes) -> dict[str, str]:
    """headword -> entry text of a dictd database (index lines 'word<TAB>offset<TAB>length'), its
    '00database*' header entries and repeated entries left out; a LowbitError for an index that does not fit the data."""
    docs, seen = {}, set()
    for n, line in enumerate(index.splitlines(), 1):
        fields = line.split("\t")
        try:
            word, start, length = fields[0], _b64(fields[1]), _b64(fields[2])
            if len(fields) != 3 or not fields[1] or not fields[2] or start + length > len(data):
                raise ValueError(line)
            entry = data[start:start + length].decode("utf-8")
        except (ValueError, IndexError):
            raise LowbitError(f"dictd index line {n} is not 'word, offset, length' within the data") from None
        if not word.startswith("00database") and entry not in seen:  # the source repeats one entry word
            seen.add(entry)  # for word (PRECEDENT): kept once, it cannot fall on both sides of the split
            docs[f"{word}\t{n:06d}"] = entry  # a headword may repeat: the line number keeps both, in order
    if not docs:
        raise LowbitError("dictd index has no entries")
    return docs


def prose_files() -> tuple[Path, Path]:
    """The Devil's Dictionary's index and data, installed by the system or unpacked by `make setup`."""
    for root in PROSE_DIRS:
        folder = Path(root) if root.startswith("/") else cache_root() / root
        if (folder / f"{PROSE_NAME}.index").is_file() and (folder / f"{PROSE_NAME}.dict.dz").is_file():
            return folder / f"{PROSE_NAME}.index", folder / f"{PROSE_NAME}.dict.dz"
    raise LowbitError("the prose corpus comes from Debian's dict-devil package: run `make setup` (it unpacks it "
                      f"into {cache_root() / PROSE_DIRS[1]}) or `apt-get install dict-devil`")


def prose() -> dict[str, str]:
    index, data = prose_files()
    try:
        return parse_dictd(index.read_text(encoding="utf-8"), gzip.decompress(data.read_bytes()))
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise LowbitError(f"cannot read the prose corpus {data}: {e}") from None


def builtin(part: str, corpus: str = "pydoc") -> str:
    """A built-in corpus' 'calib' or 'eval' part."""
    if corpus not in CORPORA:
        raise LowbitError(f"unknown built-in corpus '{corpus}' (choose one of {', '.join(CORPORA)})")
    if corpus == "mixed":
        return builtin(part, "pydoc") + "\n\n" + builtin(part, "prose")
    return _split(topics if corpus == "pydoc" else prose(), part)


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


def default_corpus(part: str) -> str:
    """The built-in corpus used when none is named: evaluation is judged on pydoc (every number in
    BENCHMARKS.md is); calibration covers both domains ('mixed') where the prose corpus is installed,
    so a calibrated method does not learn one domain only (issue 18: GPTQ calibrated on pydoc alone
    is worse than RTN out of domain), and pydoc alone, with a warning, where it is not (a pip-only
    install without `make setup`)."""
    if part != "calib":
        return "pydoc"
    try:
        prose_files()
    except LowbitError:
        warnings.warn("lowbit: calibrating on the pydoc corpus only (the prose corpus is not installed: "
                      "`make setup` or `apt-get install dict-devil` adds it, and calibration then mixes both)",
                      stacklevel=3)
        return "pydoc"
    return "mixed"


def load(part: str, path: str | Path | None = None) -> str:
    """Text for `part` ('calib' or 'eval'): a built-in corpus by name (default: `default_corpus`),
    else the user's file (a file named like a corpus is given as ./NAME)."""
    named = path is None or str(path) in CORPORA
    text = builtin(part, default_corpus(part) if path is None else str(path)) if named else read_file(path)
    if not text.strip():
        what = "calibration" if part == "calib" else "evaluation"
        raise LowbitError(f"{what} text is empty" + (f": {path}" if path else ""))
    return text
