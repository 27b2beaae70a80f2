"""Compile a generated source once with the system C compiler, cache the .so, load it with ctypes.

The library's name is a hash of the source, the flags and the compiler's identity, so a new lowbit,
a new compiler or a different ISA builds a new file next to the old ones, and concurrent processes
race harmlessly (each writes a temporary file and renames it into place). The cache lives in
`cache_root() / "kernels"` ($LOWBIT_CACHE or the user's cache directory). Without a working compiler
we warn once and return None: the registry then keeps using the reference kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from ... import settings
from ...settings import cache_root
from . import codegen

BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden", "-std=gnu11", "-lm"]


class Args(ctypes.Structure):
    """Mirror of the C `lb_args` (codegen._DRIVER): one call's pointers, shapes and tiles."""
    _fields_ = [("qw", ctypes.c_void_p), ("sc", ctypes.c_void_p), ("zp", ctypes.c_void_p), ("zdef", ctypes.c_int),
                ("n", ctypes.c_int), ("nblocks", ctypes.c_int), ("groups", ctypes.c_int), ("bpg", ctypes.c_int),
                ("m", ctypes.c_int), ("x", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("y", ctypes.c_void_p),
                ("threads", ctypes.c_int), ("nb", ctypes.c_int), ("kc", ctypes.c_int), ("xsum", ctypes.c_void_p),
                ("xq", ctypes.c_void_p), ("xd", ctypes.c_void_p), ("xs", ctypes.c_void_p),
                # appended for CodebookQ (lb_linear_lut_b*): sparse outliers in CSR, NULL when none
                ("orp", ctypes.c_void_p), ("ocol", ctypes.c_void_p), ("oval", ctypes.c_void_p),
                ("xi", ctypes.c_void_p)]  # int8 GEMV: per-block sums of the s8 activations


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


def compile_source(source: str, flags: list[str], name: str) -> Path:
    """Path of the shared library built from `source` (compiled now unless cached). Raises on failure."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc/clang)")
    flags = BASE_FLAGS + flags
    key = hashlib.sha256("\0".join([source, *flags, *cc]).encode()).hexdigest()[:16]
    out_dir = cache_root() / "kernels"
    path = out_dir / f"{name}-{key}.so"
    if path.is_file():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src, lib = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        done = subprocess.run([cc[0], *flags, "-o", str(lib), str(src)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc[0]} failed on {name}:\n{done.stderr[-2000:]}")
        os.replace(lib, path)
    return path


def compile_isa(isa: str) -> Path:
    return compile_source(codegen.generate(isa), codegen.FLAGS[isa], f"lowbit-{isa}")


@functools.lru_cache(maxsize=None)
def load(isa: str) -> ctypes.CDLL | None:
    """The loaded kernel library for `isa`, or None (after one warning) when it cannot be built."""
    try:
        return open_library(compile_isa(isa))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"lowbit: generated CPU kernels unavailable ({e}); using the reference kernel",
                      RuntimeWarning, stacklevel=2)
        return None


def open_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name in ([f"lb_linear_b{b}" for b in codegen.BITS] + [f"lb_linear_q_b{b}" for b in codegen.INT8_BITS]
                 + [f"lb_linear_lut_b{b}" for b in codegen.CODEBOOK_BITS]):
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.POINTER(Args)], None
    lib.lb_set_threads.argtypes, lib.lb_set_threads.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return lib
