"""The source's scores of an evaluation's windows on disk, so that a second evaluation against the same
source and text never runs the source (neither its decoder nor its output head).

One file per (source, text, windows) key in `cache_root()/eval`, named by the key's hash, holding per
scored position what KL divergence and the source's perplexity need (kernels/cpu/logit_scores: a
record): the source's log-probabilities as uint16 codes, `vocab` of them, and four exact doubles (lo,
step, the target's log-loss, Σ p log p). Layout: a 128-byte header (MAGIC, the key's full hash, rows,
vocab, the code range; space-padded, ending in a newline), the codes [rows, vocab] uint16, zeros to a
multiple of 64 bytes, the meta [rows, 4] float64 (little-endian). SmolLM2's 33 windows: 16,830 rows ×
49,152 codes = 1.65 GB (llama-perplexity's --kl-divergence-base file for the same text is as large).

Written while the evaluation runs, window by window, to a temporary file beside it renamed into place at
the end (a reader sees a whole file or none; a failed write costs only the cache: one warning). Read by
memory-mapping one window's codes at a time (so the mapping never holds more than one window in
memory) after checking the header byte for byte, the size to the byte and every meta value: a missing,
foreign, truncated or damaged file is computed again, never an error (a bit flipped inside the codes
goes unnoticed, as a flipped float did in the states this cache replaces: hashing 1.65 GB per read would
cost more than the source's head it saves).

Size cap: before a new file is written, the least recently used ones (reads touch a file's time) are
removed until the cache holds at most LOWBIT_EVAL_CACHE_MB (default 4096: two SmolLM2-sized files)
with the new one; a file larger than the cap alone is not kept. The caches of version 1 (the source's
fp32 states, `*.safetensors`: no longer read) and temporary files of processes that died are removed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import warnings
from pathlib import Path

import torch

from ..kernels.cpu.logit_scores import RANGE, Record
from ..settings import cache_root, eval_cache_mb

MAGIC = b"LOWBIT-SOURCE-SCORES-2"
HEADER = 128
SUFFIX = ".scores"
_PARTIAL = re.compile(r"^\..*\.partial-(\d+)$")


def directory() -> Path:
    return cache_root() / "eval"


def _header(digest: str, rows: int, vocab: int) -> bytes:
    text = MAGIC + f" {digest} {rows} {vocab} {RANGE}".encode()
    return text.ljust(HEADER - 1) + b"\n"


def _meta_offset(rows: int, vocab: int) -> int:
    return HEADER + -(-rows * vocab * 2 // 64) * 64


def file_size(rows: int, vocab: int) -> int:
    return _meta_offset(rows, vocab) + rows * 4 * 8


class Cached:
    """A valid cache file: its meta in memory, its codes mapped a window at a time."""

    def __init__(self, path: Path, rows: int, vocab: int, meta: torch.Tensor):
        self.path, self.rows, self.vocab, self.meta = path, rows, vocab, meta

    def record(self, row: int, n: int) -> Record:
        """Rows row .. row + n − 1 (a copy-on-write mapping of the file: nothing is read until used)."""
        begin = HEADER + row * self.vocab * 2
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), begin - start + n * self.vocab * 2, access=mmap.ACCESS_COPY, offset=start)
        codes = torch.frombuffer(mapped, dtype=torch.uint16, count=n * self.vocab, offset=begin - start)
        return codes.view(n, self.vocab), self.meta[row:row + n]


def read(path: Path, digest: str, rows: int) -> Cached | None:
    """The cache file at `path` for key `digest` and `rows` scored positions, or None if it is missing,
    foreign or damaged (never an exception)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
            fields = head[len(MAGIC):].split()
            vocab = int(fields[2]) if head.startswith(MAGIC) and len(fields) == 4 and fields[2].isdigit() else 0
            if not 0 < vocab < 1 << 24 or head != _header(digest, rows, vocab):
                return None
            if os.fstat(f.fileno()).st_size != file_size(rows, vocab):
                return None
            f.seek(_meta_offset(rows, vocab))
            meta = torch.frombuffer(bytearray(f.read(rows * 32)), dtype=torch.float64).view(rows, 4)
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):  # recently used (a cache one may not write is still read)
        os.utime(path)
    lo, step, nll, neg_entropy = meta.unbind(1)
    ok = meta.isfinite().all() and (lo <= 0).all() and (step >= 0).all() and (step <= RANGE).all() and \
        (nll >= -1e-3).all() and (neg_entropy <= 1e-3).all()
    return Cached(path, rows, vocab, meta) if ok else None


class Writer:
    """Writes one cache file window by window; `commit` renames it into place once every row is in.
    An OSError (disk full, no permission) turns it off with one warning: the evaluation goes on."""

    def __init__(self, path: Path, digest: str, rows: int):
        self.path, self.digest, self.rows = path, digest, rows
        self.tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        self.file, self.vocab, self.done, self.meta, self.off = None, 0, 0, [], False

    def write(self, record: Record) -> None:
        if self.off:
            return
        codes, meta = record
        try:
            if self.file is None:
                self.vocab = codes.shape[1]
                if not self._room(file_size(self.rows, self.vocab)):
                    return
                self.file = open(self.tmp, "wb")
                self.file.write(_header(self.digest, self.rows, self.vocab))
            self.file.write(codes.contiguous().numpy())
        except OSError as e:
            self._fail(e)
            return
        self.meta.append(meta.clone())
        self.done += len(meta)

    def _room(self, size: int) -> bool:
        """Make room for `size` bytes under the cap (evict); False (and the writer off) if it cannot fit."""
        cap = int(eval_cache_mb() * 2**20)
        if size > cap:
            self.off = True
            warnings.warn(f"lowbit: the source's scores ({size / 2**20:.0f} MiB) are larger than "
                          f"LOWBIT_EVAL_CACHE_MB={eval_cache_mb():g}: not cached", stacklevel=3)
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        evict(self.path.parent, cap - size)
        return True

    def commit(self) -> None:
        if self.file is None or self.off:
            return
        try:
            if self.done != self.rows:
                raise OSError(f"{self.done} of {self.rows} rows written")
            meta = torch.cat(self.meta)
            if not meta.isfinite().all():  # a source giving NaN: refused by evaluate, never cached
                raise OSError("non-finite scores")
            self.file.seek(_meta_offset(self.rows, self.vocab))  # the padding before it: zeros
            self.file.write(meta.numpy().tobytes())
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._fail(e)

    def _fail(self, e: OSError) -> None:
        if self.file is not None:
            self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()
        self.off = True
        warnings.warn(f"lowbit: could not cache the source's scores in {self.path.parent}: {e}", stacklevel=3)


def evict(folder: Path, budget: int) -> None:
    """Remove the least recently used cache files of `folder` until the rest take at most `budget`
    bytes, the temporary files of processes that are gone, and version 1's files."""
    files = []
    for f in folder.iterdir():
        m = _PARTIAL.match(f.name)
        if (m and not _alive(int(m[1]))) or f.suffix == ".safetensors":  # a dead writer's; version 1's states
            f.unlink(missing_ok=True)
        elif not m and f.suffix == SUFFIX and f.is_file():
            files.append((f.stat().st_mtime_ns, f.stat().st_size, f))
    total = sum(size for _, size, _ in files)
    for _, size, f in sorted(files):
        if total <= budget:
            break
        f.unlink(missing_ok=True)
        total -= size


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
