"""Compile a generated source once with the system C compiler, cache the .so, load it with ctypes.

The library's name is a hash of the source, the flags and the compiler's identity, so a new lowbit,
a new compiler or a different ISA builds a new file next to the old ones, and concurrent processes
race harmlessly (each writes a temporary file and renames it into place). The cache lives in
`cache_root() / "kernels"` ($LOWBIT_CACHE or the user's cache directory). Without a working compiler
we warn once and return None: the registry then keeps using the reference kernel.

C comes in two kinds: real files (the engine's engine.c, the fixed C of the kernels in C_DIR), compiled
where they lie, and generated sources, written next to their library in the cache (`name-hash.c`) and
kept there, so a compiler error names a file and line one can open. Included files come from the
`include` directories (-I), and their contents are part of the hash: editing driver.h rebuilds.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from ... import settings
from ...atomic_file import atomic_write_text
from ...errors import LowbitError
from ...settings import cache_root
from . import codegen

BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden", "-std=gnu11", "-lm"]


_CTYPES = {"int": ctypes.c_int, "float": ctypes.c_float}


def _fields(header: Path) -> list[tuple[str, type]]:
    """The fields of the C struct in `header` as ctypes: one `type name;` a line (pointers: c_void_p)."""
    fields = []
    for line in re.sub(r"/\*.*?\*/", "", header.read_text(), flags=re.S).splitlines():
        m = re.fullmatch(r"\s*(?:const\s+)?(\w+)\s*(\*?)\s*(\w+);\s*", line)
        if m:
            fields.append((m[3], ctypes.c_void_p if m[2] else _CTYPES[m[1]]))
        elif ";" in line and "}" not in line:
            raise ValueError(f"{header}: one `type name;` a line, not {line.strip()!r}")
    return fields


class Args(ctypes.Structure):
    """The C `lb_args` (c/args.h, its one source): one call's pointers, shapes and tiles."""
    _fields_ = _fields(codegen.C_DIR / "args.h")


class TenderArgs(ctypes.Structure):
    """The C `lb_tender_args` (c/tender_args.h): a Tender layer and one call of it."""
    _fields_ = _fields(codegen.C_DIR / "tender_args.h")


@functools.lru_cache(maxsize=None)
def compiler() -> tuple[str, str] | None:
    """(path, version line) of the C compiler: $CC, else cc, gcc or clang on PATH."""
    for name in filter(None, [settings.c_compiler(), "cc", "gcc", "clang"]):
        path = shutil.which(name)
        if path:
            try:
                out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.SubprocessError):
                continue
            if out.returncode == 0:
                return path, out.stdout.splitlines()[0] if out.stdout else name
    return None


def compile_source(source: str | Path, flags: list[str], name: str, include: tuple[Path, ...] = ()) -> Path:
    """Path of the shared library built from `source` (C text, or a .c file compiled where it lies),
    with `include` directories on the search path (compiled now unless cached). Raises on failure."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc/clang)")
    flags = BASE_FLAGS + flags + [f"-I{d}" for d in include]
    text = source.read_text() if isinstance(source, Path) else source
    headers = [f.read_text() for d in include for f in sorted(d.glob("*.h"))]
    key = hashlib.sha256("\0".join([text, *headers, *flags, *cc]).encode()).hexdigest()[:16]
    out_dir = cache_root() / "kernels"
    path = out_dir / f"{name}-{key}.so"
    if path.is_file():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    src = source
    if not isinstance(source, Path):
        src = out_dir / f"{name}-{key}.c"
        atomic_write_text(src, source)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        lib = Path(tmp) / f"{name}.so"
        done = subprocess.run([cc[0], *flags, "-o", str(lib), str(src)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc[0]} failed on {src}:\n{done.stderr[-2000:]}")
        os.replace(lib, path)
    return path


def compile_isa(isa: str) -> Path:
    return compile_source(codegen.generate(isa), codegen.FLAGS[isa], f"lowbit-{isa}", (codegen.C_DIR,))


@functools.lru_cache(maxsize=None)
def load(isa: str) -> ctypes.CDLL | None:
    """The loaded kernel library for `isa`, or None (after one warning) when it cannot be built."""
    try:
        return open_library(compile_isa(isa))
    except (RuntimeError, OSError, LowbitError) as e:
        warnings.warn(f"lowbit: generated CPU kernels unavailable ({e}); using the reference kernel",
                      RuntimeWarning, stacklevel=2)
        return None


def open_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for entry in {e for isa in codegen.FLAGS for e in codegen.entries(isa)}:
        fn = getattr(lib, entry.symbol, None)
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.POINTER(TenderArgs if entry.symbol == codegen.TENDER_SYMBOL else Args)], None
    lib.lb_set_threads.argtypes, lib.lb_set_threads.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return lib
