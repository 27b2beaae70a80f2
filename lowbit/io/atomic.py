"""Atomic writes: build the whole output (a directory, or one file) beside its destination, then rename
it into place.

A crash, a kill or a full disk therefore never leaves a partial output under the destination name: the
partial one is named `.NAME.partial-*` and is removed on any error we see.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..atomic_file import write_error as _write_error
from ..errors import LowbitError


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


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a fresh temporary directory; on success it becomes `out` in one rename."""
    out = Path(out).absolute()
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _finish_tree(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
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


def dir_size(path: str | Path) -> int:
    """Bytes of all files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
