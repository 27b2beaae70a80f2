"""lowbit vs llama.cpp vs HF transformers on this machine, one run, same model and threads (issue #5).

llama.cpp is measured by its own `llama-bench` (default: the tools benchmarks/peers/build_llamacpp.sh
builds, `--peer llama-bench`: its pp and tg tests, the numbers the llama.cpp community quotes) or
through llama-cpp-python (`--peer python`), built from source into a scratch virtualenv under
~/.cache/lowbit/peers/llamacpp (isolated: no system site-packages; never installed into the python
that runs lowbit, and not a lowbit dependency) and timed with lowbit's protocol (lowbit/eval/bench.py:
a fresh cache, one prefill of pp tokens, then tg single-token steps, median of the runs). Both are
the same llama.cpp release. Its GGUFs come from the default model's shipped Q4_1 file, requantized
with llama.cpp's own quantizer to Q4_0, Q4_K_M and Q8_0. Ratios are ours / theirs.

    python benchmarks/vs_llamacpp.py MODEL [MODEL ...] [--threads 1 2] [--runs 3] [--peer llama-bench|python]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

PEERS = Path(os.environ.get("LOWBIT_PEERS") or Path.home() / ".cache" / "lowbit" / "peers")
VENV = PEERS / "llamacpp"
PACKAGE = "llama-cpp-python==0.3.36"
FTYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}  # llama.h's LLAMA_FTYPE_MOSTLY_*


def tool(name: str) -> Path | None:
    """llama.cpp's command-line tool `name` (llama-perplexity, llama-bench, llama-server, llama-quantize,
    llama-cli, llama-completion) as benchmarks/peers/build_llamacpp.sh installs it beside the venv's
    python, or None when it is not built."""
    path = VENV / "bin" / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def llama_perplexity(model: Path, text: Path, ctx: int, chunks: int, threads: int) -> float:
    """llama-perplexity's final estimate on the file `text`: its first `chunks` chunks of `ctx` tokens,
    the second half of each scored."""
    binary = tool("llama-perplexity")
    if binary is None:
        raise SystemExit("llama-perplexity is not built: run benchmarks/peers/build_llamacpp.sh")
    r = subprocess.run([binary, "-m", model, "-f", text, "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks),
                        "-t", str(threads)], capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    if r.returncode or found is None:
        raise SystemExit(f"llama-perplexity failed on {model}: {(r.stdout + r.stderr).strip()[-1500:]}")
    return float(found.group(1))


def build() -> Path:
    """The scratch virtualenv's python with llama-cpp-python compiled for this CPU (~5 min once)."""
    python = VENV / "bin" / "python"
    if python.is_file() and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)  # no --clear: bin/ holds llama.cpp's tools
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
           "-DLLAMA_BUILD_SERVER=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    print(f"building {PACKAGE} in {VENV} (several minutes) ...", file=sys.stderr, flush=True)
    log = PEERS / "llamacpp-build.log"
    with open(log, "w") as f:
        r = subprocess.run([python, "-m", "pip", "install", "--no-binary", "llama-cpp-python", PACKAGE],
                           env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"building {PACKAGE} failed: see {log}")
    return python


# ---- what runs inside the scratch virtualenv (llama_cpp importable, lowbit not) -------------------
PEER_CODE = r'''
import ctypes, json, statistics, sys, time
import llama_cpp

def quantize(src, dst, ftype):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.allow_requantize, p.nthread = ftype, True, 2
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)) != 0:
        raise SystemExit(f"llama_model_quantize {ftype} failed")

def bench(path, threads, pp, tg, runs, tokens):
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(pp) + tg + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=max(pp), n_ubatch=max(pp), verbose=False)
    out = {}
    for n in pp:
        ts = []
        for _ in range(runs + 1):  # the first run warms up
            llm.reset()
            t0 = time.perf_counter(); llm.eval(tokens[:n]); ts.append(time.perf_counter() - t0)
        out[f"pp{n}"] = n / statistics.median(ts[1:])
    ts = []
    for _ in range(runs + 1):
        llm.reset(); llm.eval(tokens[:1])
        t0 = time.perf_counter()
        for i in range(tg):
            llm.eval([tokens[1 + i]])
        ts.append(time.perf_counter() - t0)
    out[f"tg{tg}"] = tg / statistics.median(ts[1:])
    return out

job = json.loads(sys.stdin.read())
if job["op"] == "quantize":
    quantize(job["src"], job["dst"], job["ftype"])
    print("{}")
else:
    print(json.dumps(bench(job["path"], job["threads"], job["pp"], job["tg"], job["runs"], job["tokens"])))
'''


def peer(python: Path, job: dict) -> dict:
    r = subprocess.run([python, "-c", PEER_CODE], input=json.dumps(job), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"llama-cpp-python failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _tool(name: str) -> Path:
    binary = tool(name)
    if binary is None:
        raise SystemExit(f"{name} is not built: run benchmarks/peers/build_llamacpp.sh")
    return binary


def ggufs(python: Path | None) -> dict[str, Path]:
    """The shipped Q4_1 and its requantized Q4_0 / Q4_K_M / Q8_0 (made once, kept beside the venv), by
    llama-cpp-python's llama_model_quantize or (python None) the llama-quantize tool."""
    from lowbit.models import default_gguf

    src = default_gguf()
    out = {"Q4_1": src}
    for name, ftype in FTYPES.items():
        dst = PEERS / f"SmolLM2-135M-Instruct.{name}.gguf"
        if not dst.is_file():
            if python is None:
                r = subprocess.run([_tool("llama-quantize"), "--allow-requantize", src, dst, name, "2"],
                                   capture_output=True, text=True)
                if r.returncode:
                    raise SystemExit(f"llama-quantize {name} failed: {(r.stdout + r.stderr)[-1500:]}")
            else:
                peer(python, {"op": "quantize", "src": str(src), "dst": str(dst), "ftype": ftype})
        out[name] = dst
    return out


def llama_bench(path: Path, threads: int, pp: list[int], tg: int, runs: int) -> dict:
    """llama-bench's mean tokens/s for pp{n} (each n) and tg{tg}, `runs` repetitions, `threads` threads."""
    r = subprocess.run([_tool("llama-bench"), "-m", path, "-t", str(threads), "-p", ",".join(map(str, pp)),
                        "-n", str(tg), "-r", str(runs), "-o", "json"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"llama-bench failed on {path}: {(r.stdout + r.stderr).strip()[-1500:]}")
    out = {}
    for test in json.loads(r.stdout):
        key = f"tg{test['n_gen']}" if test["n_gen"] else f"pp{test['n_prompt']}"
        out[key] = float(test["avg_ts"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="lowbit model directories (their bits class picks the peers)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pp", type=int, nargs="+", default=[128, 512])
    p.add_argument("--tg", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip transformers fp32/bf16")
    p.add_argument("--peer", choices=["llama-bench", "python"], default="llama-bench",
                   help="llama.cpp's own llama-bench, or llama-cpp-python timed with lowbit's protocol")
    p.add_argument("--build-only", action="store_true")
    a = p.parse_args(argv)
    python = build() if a.peer == "python" else None
    files = ggufs(python)
    if a.build_only:
        print(json.dumps({k: str(v) for k, v in files.items()}))
        return
    from lowbit.eval import bench

    if python is None:
        def measure(path, t, tokens):
            return llama_bench(path, t, a.pp, a.tg, a.runs)
    else:
        def measure(path, t, tokens):
            return peer(python, {"op": "bench", "path": str(path), "threads": t, "pp": a.pp, "tg": a.tg,
                                 "runs": a.runs, "tokens": tokens})
    bench.side_by_side(a.models, files, measure, threads=a.threads, pp=a.pp, tg=a.tg, runs=a.runs, hf=not a.no_hf)


if __name__ == "__main__":
    main()
