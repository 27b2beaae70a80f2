"""One writer per output: an exclusive lock on `.OUT.lock` beside OUT, held while a run writes OUT or
its progress (`.OUT.progress`).

Without it two runs into one OUT share the progress directory and each other's block files, and the
later one silently saves a model made of both. The lock is `flock` on an open file, so the kernel
releases it when its process dies (kill -9 included): a stale lock file never blocks anyone. The file
records its holder's pid for the message of the run that is refused, and is removed by its holder; a
run that locked a file another removed meanwhile (the file at the path is no longer the one it
opened) locks afresh.

Within one process the lock is re-entrant (quantize_to holds it and its save takes it again).
"""

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from ..atomic_file import write_error
from ..errors import LowbitError

_held: set[Path] = set()  # outputs this process holds


def lock_path(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.lock"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def _acquire(out: Path, path: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LowbitError(f"{out} is being written by another lowbit run ({_holder(path)}): wait for it to "
                              f"finish or choose another output") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # its holder removed it as we opened it: lock the new one


@contextmanager
def output_lock(out: str | Path):
    """Hold the exclusive lock of `out` (a LowbitError naming the holder if another run has it)."""
    out = Path(out).absolute()
    if out in _held:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(out)
    fd = _acquire(out, path)
    _held.add(out)
    try:
        yield
    finally:
        _held.discard(out)
        path.unlink(missing_ok=True)  # while still locked: a waiter that opened it locks afresh
        os.close(fd)


def is_held(out: str | Path) -> bool:
    return Path(out).absolute() in _held
