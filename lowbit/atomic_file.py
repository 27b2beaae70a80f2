"""One small file written atomically: a temporary file beside it, flushed, then one rename.

The bottom of the layer table, so the kernels' own caches (compiled libraries, tuned constants) can use
it without reaching up into io/, which alone writes model files (see io/atomic.py for whole directories).
"""

import errno
import os
import tempfile
from pathlib import Path

from .errors import LowbitError


def write_error(out: Path, e: OSError, kept: str = "nothing was written") -> LowbitError:
    """A failed write as one line; `kept` says what is left of the work (a partial output never is).
    EFBIG (a file-size limit, RLIMIT_FSIZE or the filesystem's) is a full disk to the user as well."""
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return LowbitError(f"disk full while writing {out}; {kept}")
    return LowbitError(f"could not write {out}: {e.strerror or e}; {kept}")


def atomic_write_text(out: str | Path, text: str) -> None:
    """Write one small file the same way: a temporary file beside it, flushed, then one rename, so
    readers (another process) see the old file or the new one, never half of one."""
    out = Path(out).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    except OSError as e:
        raise write_error(out, e) from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(out, e) from None
