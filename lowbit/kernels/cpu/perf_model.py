"""The performance model: tile sizes and thread count from cache sizes, vector width and threads.

Like QIGen's mem_model, it is a few explicit inequalities, not a search:

GEMV (one token) streams every weight once, so it is bandwidth-bound: each thread takes a contiguous
band of output rows (its bytes are one sequential stream). UniformQ walks it one tile of L rows (the
vector's lanes, layout.interleave) at a time, so each activation loaded from L1 feeds L rows; the
codebook GEMV walks `GEMV_ROWS` rows at a time for the same reason. Threads are only woken for
matrices big enough to pay for the wake-up (`min_bytes_per_thread` bytes of weights each).

GEMM (many tokens) is compute-bound: a tile of NB rows × KC columns of W is dequantized to fp32 once
and reused by every token. With an MR × NR register-blocked micro-kernel (MR tokens, NR rows, MR·NR
vector accumulators, which the ISA's register file fixes):
  - the micro-kernel's activation panel MR × KC stays in L1:      MR·KC·4 ≤ L1 · l1_share
  - the dequantized W tile NB × KC stays in L2 across all tokens:  NB·KC·4 ≤ L2 · l2_share
  - KC is a multiple of 32 (a packing block), NB of NR, and NB is shrunk so every thread has work.

Measured instead of guessed (`lowbit tune`, see tune.py): the three constants (`Constants`: the
bytes that pay for a GEMV thread, the shares of L1 and L2) are where the model guesses. `lowbit tune`
times a few values of each around the defaults on this machine and caches the winners in
cache_root()/tune/<ISA>-l1d<KiB>k-l2<KiB>k-t<threads>.json; `plan` takes them from there when that
file exists (a corrupt or foreign one is ignored with a warning), else the defaults below. The
inequalities and the clamps to the shape are the same either way, so a tuned plan is always a valid
one. Layers already prepared keep their plans: a new tuning applies from the next load.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from ...settings import cache_root
from .isa import CPU

VECTOR_LANES = {"avx512vnni": 16, "avx512": 16, "avx2": 8, "scalar": 8}
MICRO_TILE = {"avx512vnni": (4, 4), "avx512": (4, 4), "avx2": (4, 3), "scalar": (2, 2)}  # (MR, NR)
# The int8 GEMM (codegen._gemmq_task): MR tokens × NR tiles of L rows, int32 and fp32 accumulators for
# each pair (2·MR·NR of the 32 (16) vector registers); chunks of at most GEMMQ_KBLOCKS 32-blocks of NR
# tiles unpacked to u8 (NR·L·32 bytes a block: 32 KiB at AVX-512, L1's size) serve every token.
GEMMQ_TILE = {"avx512vnni": (4, 2), "avx512": (4, 2), "avx2": (2, 2)}
GEMMQ_KBLOCKS = 32
# The int8 tile kernels (codegen._tileq), up to TILE_TOKENS tokens a call (the GEMM above): one tile's
# block of codes unpacked in registers (8 vectors) meets TOKEN_TILE tokens at a time, each with its
# int32 and fp32 accumulators: what the register file holds (32 zmm: 8 tokens; 16 ymm: 2).
TILE_TOKENS = 32
TOKEN_TILE = {"avx512vnni": 8, "avx512": 4, "avx2": 2}
GEMV_ROWS = 4
TUNE_VERSION = 2  # 2: the GEMV winner is timed on int8 and fp32 activations


@dataclass(frozen=True)
class Constants:
    """What `plan` needs besides the shape and the CPU: the model's defaults or a machine's winners."""
    min_bytes_per_thread: int = 64 * 1024  # GEMV: weight bytes each woken thread must have
    l1_share: float = 0.5  # GEMM: share of L1 the activation panel may fill
    l2_share: float = 0.5  # GEMM: share of L2 the dequantized W tile may fill


@dataclass(frozen=True)
class Plan:
    threads: int
    nb: int  # GEMM: rows of W dequantized per tile
    kc: int  # GEMM: columns per tile (multiple of 32)


def plan(cpu: CPU, isa: str, n: int, k_padded: int, weight_bytes: int, m: int, threads: int,
         constants: Constants | None = None) -> Plan:
    """The plan for one matmul; `constants` default to this machine's tuned ones (or the model's)."""
    c = constants or tuned(cpu, isa, threads)
    mr, nr = MICRO_TILE[isa]
    if m == 1:
        return Plan(max(1, min(threads, weight_bytes // c.min_bytes_per_thread)), GEMV_ROWS, k_padded)
    kc = max(32, min(k_padded, int(cpu.l1d * c.l1_share) // (4 * mr) // 32 * 32))
    nb = max(nr, int(cpu.l2 * c.l2_share) // (4 * kc) // nr * nr)
    per_thread = -(-n // threads)
    nb = min(nb, -(-per_thread // nr) * nr)
    return Plan(threads, nb, kc)


def tune_key(cpu: CPU, isa: str, threads: int) -> str:
    return f"{isa}-l1d{cpu.l1d // 1024}k-l2{cpu.l2 // 1024}k-t{threads}"


def tune_path(cpu: CPU, isa: str, threads: int) -> Path:
    return cache_root() / "tune" / f"{tune_key(cpu, isa, threads)}.json"


def tuned(cpu: CPU, isa: str, threads: int) -> Constants:
    """This machine's cached winners from `lowbit tune`, else the model's defaults."""
    path = tune_path(cpu, isa, threads)
    try:
        st = path.stat()
    except OSError:
        return Constants()
    return _read_tuned(path, (st.st_mtime_ns, st.st_size, st.st_ino), tune_key(cpu, isa, threads))


@functools.lru_cache(maxsize=None)
def _read_tuned(path: Path, version: tuple[int, int, int], key: str) -> Constants:
    """Read once per version (mtime, size, inode) of the file: a rewritten file is read again, a bad
    one warns once."""
    try:
        return parse_tuned(json.loads(path.read_text()), key)
    except (OSError, ValueError) as e:
        warnings.warn(f"lowbit: ignoring the tuning cache {path} ({e}); using the performance model's "
                      "defaults (`lowbit tune` rewrites it, `lowbit tune --reset` removes it)",
                      RuntimeWarning, stacklevel=4)
        return Constants()


def parse_tuned(data, key: str) -> Constants:
    """The winners in a tuning cache file's JSON; ValueError unless `lowbit tune` wrote it for `key`."""
    if not isinstance(data, dict) or data.get("version") != TUNE_VERSION or data.get("key") != key:
        found = (data.get("key"), data.get("version")) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"found {found}, not ({key!r}, {TUNE_VERSION})")
    try:
        w = data["winners"]
        c = Constants(int(w["min_bytes_per_thread"]), float(w["l1_share"]), float(w["l2_share"]))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"bad winners: {e!r}") from None
    if not (c.min_bytes_per_thread >= 1 and 0 < c.l1_share <= 64 and 0 < c.l2_share <= 64):
        raise ValueError(f"winners out of range: {w}")
    return c
