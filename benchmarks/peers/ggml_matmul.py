"""llama.cpp's CPU matmul (ggml_mul_mat on Q4_0 / Q4_K / Q8_0 weights) as a peer for benchmarks/kernel_speed.py.

Compiles ggml_matmul.c (beside this file) against the ggml that llama-cpp-python built into the scratch
venv of benchmarks/vs_llamacpp.py (`python benchmarks/vs_llamacpp.py --build-only` makes it); the
binary is kept in that peers folder, never in lowbit. Each `measure` runs it once for one weight.

    python benchmarks/peers/ggml_matmul.py N K TYPE [--threads 1] [--cold BYTES] [--m 1 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PEERS = Path(os.environ.get("LOWBIT_PEERS") or Path.home() / ".cache" / "lowbit" / "peers")
SOURCE = Path(__file__).with_suffix(".c")
BINARY = PEERS / "ggml_matmul"
TYPES = ("q4_0", "q4_K", "q8_0")


def site() -> Path | None:
    """The venv's site-packages holding ggml's headers (include/) and libraries (lib/), whatever its python."""
    found = sorted((PEERS / "llamacpp" / "lib").glob("python3*/site-packages/include/ggml.h"))
    return found[-1].parent.parent if found else None


def build() -> Path | None:
    """The compiled harness (rebuilt when the source is newer), or None when ggml or a compiler is missing."""
    sp = site()
    if sp is None:
        return None
    if BINARY.is_file() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    lib = sp / "lib"
    cmd = [os.environ.get("CC", "cc"), "-O2", "-o", str(BINARY), str(SOURCE), f"-I{sp / 'include'}", f"-L{lib}",
           "-lggml", "-lggml-cpu", "-lggml-base", f"-Wl,-rpath,{lib}", "-lm"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError:
        return None
    if r.returncode:
        print(f"building {BINARY} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return BINARY


def measure(n: int, k: int, qtype: str, threads: int, ms: list[int], cold_bytes: int = 0) -> dict | None:
    """{m: {"hot_ms", "cold_ms" (m == 1 and cold_bytes > 0)}} plus the run's details under "info"
    (buffer type, bytes, copies, huge pages, rel_err of y against the fp32 product); {"error": why}
    when ggml refuses the shape; None when the harness cannot be built."""
    binary = build()
    if binary is None:
        return None
    r = subprocess.run([str(binary), str(n), str(k), qtype, str(threads), str(cold_bytes), *map(str, ms)],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{binary.name} {n} {k} {qtype} failed: {r.stderr.strip()[-1000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if "error" in out:
        return out
    if not out["rel_err"] < 0.2:  # 4-bit rounding gives ~0.06: more means the harness computes garbage
        raise RuntimeError(f"{binary.name} {n} {k} {qtype}: y is off the fp32 product by {out['rel_err']}")
    return {"info": {key: v for key, v in out.items() if key != "runs"}, **{run.pop("m"): run for run in out["runs"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("k", type=int)
    ap.add_argument("type", choices=TYPES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cold", type=int, default=0, help="rotate through copies of W totalling more than this many bytes")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 128])
    a = ap.parse_args()
    out = measure(a.n, a.k, a.type, a.threads, a.m, a.cold)
    if out is None:
        raise SystemExit(f"no ggml under {PEERS / 'llamacpp'}: run python benchmarks/vs_llamacpp.py --build-only")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
