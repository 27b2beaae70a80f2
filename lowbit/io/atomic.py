"""Atomic writes: build the whole output (a directory, or one file) beside its destination, then rename
it into place.

A crash, a kill or a full disk therefore never leaves a partial output under the destination name: the
partial one is named `.NAME.partial-PID-*` and is removed on any error we see. One a killed process
left behind (kill -9, power loss) is removed by the next write of the same output: its name records the
pid of the process that made it, and one whose process is gone is nobody's. The write holds the
output's lock (lock.py) throughout.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..atomic_file import write_error as _write_error
from ..errors import LowbitError
from .lock import output_lock


def check_destination(out: Path, overwrite: bool) -> None:
    """Fail early (before any expensive work) if `out` cannot be written."""
    if out.exists() and not out.is_dir():
        raise LowbitError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LowbitError(f"output directory {out} is not empty (pass --overwrite to replace it)")


def _finish_tree(root: Path) -> None:
    """Flush every file to disk and give the tree ordinary permissions (mkdtemp makes it private)."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(out: Path) -> None:
    """Remove the temporary siblings of `out` (`.OUT.partial-PID-*`, `.OUT.old-PID-*`) whose process
    is dead."""
    for kind in ("partial", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _temporary(out: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a fresh temporary directory; on success it becomes `out` in one rename."""
    out = Path(out).absolute()
    with output_lock(out):
        check_destination(out, overwrite)
        remove_stale(out)
        try:
            tmp = _temporary(out, "partial")
        except OSError as e:
            raise _write_error(out, e) from None
        try:
            yield tmp
            _finish_tree(tmp)
            if out.exists():
                old = _temporary(out, "old")
                out.rename(old / "dir")
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error(out, e) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def atomic_file(out: str | Path, overwrite: bool = False):
    """Yield a temporary file path beside `out` (one file, e.g. a GGUF); on success it becomes `out`
    in one rename. An existing `out` is replaced only with `overwrite`."""
    out = Path(out).absolute()
    with output_lock(out):
        if out.is_dir() or (out.exists() and not overwrite):
            raise LowbitError(f"output {out} exists" + ("" if out.is_dir() else " (pass --overwrite to replace it)"))
        remove_stale(out)
        try:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent)
            os.close(fd)
        except OSError as e:
            raise _write_error(out, e) from None
        tmp = Path(name)
        try:
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o666 & ~umask)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _write_error(out, e) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def dir_size(path: str | Path) -> int:
    """Bytes of all files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
