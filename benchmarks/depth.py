"""Decode speed as the context grows (issue 20): one stream's tokens/s at a depth of d cached tokens,
lowbit's engine (fp16 and int8 KV cache) beside llama.cpp's `llama-bench -d` (f16 and q8_0 KV, the
latter with flash attention, which llama.cpp needs for a quantized V cache) on the same model.

Ours: the prompt (the built-in evaluation text, repeated) is prefilled once to the deepest depth in
the engine's own chunks; each run, deepest first, truncates the cache back to d and times `--tg` single-token steps
(median of `--runs`). llama-bench: `-p 0 -n TG -d D,...` (its own tokens; its mean). SmolLM2-135M
holds 8,192 positions, so the issue's 16k is not a depth this model has: the default depths stop at 8k.
`--rope-factor F` runs ours on the same weights with linear RoPE scaling by F (a copy of the model's
config with F times the positions; the text's continuation is not what is measured, the cost of
attending to d cached tokens is), and llama-bench on its file past the trained context (it warns and
runs): `--rope-factor 2 --depths 512 4096 16320` gives the issue's 16k.

    python benchmarks/depth.py MODEL [--gguf FILE] [--depths 512 4096 8192] [--tg 32] [--threads 2] [--runs 3]
                               [--rope-factor F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from vs_llamacpp import ggufs, tool

import lowbit
from lowbit.eval.bench import bench_tokens
from lowbit.runtime import decoder_for


def ours(model, tokens: list[int], depths: list[int], tg: int, threads: int, kv: str, runs: int) -> dict[int, float]:
    d = decoder_for(model.model, max_context=max(depths) + tg + 2, threads=threads, kv_cache=kv)
    d.truncate(0)
    d.forward(tokens[:max(depths)])
    out = {}
    for depth in sorted(depths, reverse=True):  # the cache only truncates back
        times = []
        for _ in range(runs + 1):  # the first run warms up
            d.truncate(depth)
            t0 = time.perf_counter()
            for i in range(tg):
                d.forward(tokens[depth + i:depth + i + 1])
            times.append(time.perf_counter() - t0)
        out[depth] = tg / statistics.median(times[1:])
    return out


def rope_scaled(model_dir: str, factor: float, into: Path) -> Path:
    """`model_dir` with linear RoPE scaling by `factor` and `factor` times the positions: links to its
    files and an edited config.json in `into`."""
    for f in Path(model_dir).iterdir():
        if f.name != "config.json":
            (into / f.name).symlink_to(f.resolve())
    config = json.loads((Path(model_dir) / "config.json").read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    config["rope_parameters"] = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    config["max_position_embeddings"] = int(config["max_position_embeddings"] * factor)
    (into / "config.json").write_text(json.dumps(config))
    return into


def theirs(gguf, depths: list[int], tg: int, threads: int, kv: str, runs: int) -> dict[int, float]:
    import subprocess

    binary = tool("llama-bench")
    if binary is None:
        raise SystemExit("llama-bench is not built: run benchmarks/peers/build_llamacpp.sh")
    extra = ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "1"] if kv == "int8" else []
    r = subprocess.run([binary, "-m", gguf, "-p", "0", "-n", str(tg), "-d", ",".join(map(str, depths)),
                        "-t", str(threads), "-r", str(runs), "-o", "json", *extra], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"llama-bench failed: {(r.stdout + r.stderr)[-1500:]}")
    return {int(t["n_depth"]): float(t["avg_ts"]) for t in json.loads(r.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a lowbit model directory")
    ap.add_argument("--gguf", help="llama.cpp's file (default: the shipped model requantized to Q4_0)")
    ap.add_argument("--depths", type=int, nargs="+", default=[512, 4096, 8192 - 64])
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kv", nargs="+", default=["fp16", "int8"])
    ap.add_argument("--rope-factor", type=float, help="run ours with linear RoPE scaling by this factor (16k on SmolLM2: 2)")
    a = ap.parse_args()
    scratch = tempfile.TemporaryDirectory()
    model = lowbit.load(rope_scaled(a.model, a.rope_factor, Path(scratch.name)) if a.rope_factor else a.model)
    tokens = bench_tokens(model._tokenizer(), max(a.depths) + a.tg + 1)
    gguf = a.gguf or ggufs(None)["Q4_0"]
    scaled = f" (RoPE scaled x{a.rope_factor:g})" if a.rope_factor else ""
    print(f"model {a.model}{scaled} vs llama.cpp {gguf}; {a.threads} threads; tg{a.tg} at each depth\n")
    print("| KV cache | depth | lowbit tok/s | llama.cpp tok/s | ours / theirs |")
    print("|---|---|---|---|---|")
    for kv in a.kv:
        mine, peer = ours(model, tokens, a.depths, a.tg, a.threads, kv, a.runs), theirs(gguf, a.depths, a.tg, a.threads, kv, a.runs)
        for depth in a.depths:
            print(f"| {kv} (llama.cpp {'q8_0' if kv == 'int8' else 'f16'}) | {depth} | {mine[depth]:.1f} | "
                  f"{peer.get(depth, float('nan')):.1f} | {mine[depth] / peer.get(depth, float('nan')):.2f} |", flush=True)


if __name__ == "__main__":
    main()
