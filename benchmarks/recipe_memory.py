"""Peak memory of the recipe search at 7B widths against GPTQ's (issue 18): within 10%.

The same random Llama at 7B widths as benchmarks/peak_memory.py (its make_model: hidden 4096,
intermediate 11008, 32 heads, vocab 32000, bf16 shards, one block per shard), then in child processes
(their own VmHWM, peak_memory.measure): `lowbit quantize --method gptq --bits 4 --group-size 128` and
`lowbit recipe --target-bpw T --candidates ...`, both on `--calib-samples` windows of 256 tokens. The
search reads one block at a time (as GPTQ's lazy run) and quantizes every candidate of a 7B layer
alone (sensitivity.STACK), so its peak does not grow with the number of candidates: one or two
candidates measure it (each GPTQ candidate costs a whole GPTQ pass of the layer: minutes at 7B widths).

Usage: python benchmarks/recipe_memory.py [--layers 1] [--candidates gptq:W4-g128-sym gptq:W3-g128-asym]
    [--target-bpw 4.2] [--calib-samples 4] [--scratch DIR] [--keep]
"""

import argparse
import shutil
import subprocess
from pathlib import Path

from peak_memory import GIB, make_model, measure


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--candidates", nargs="+", default=["gptq:W4-g128-sym"])
    ap.add_argument("--target-bpw", type=float, default=4.2)
    ap.add_argument("--calib-samples", type=int, default=4, help="windows of 256 tokens, both runs")
    ap.add_argument("--scratch", default="/tmp/lowbit-recipe-memory")
    ap.add_argument("--limit-gib", type=float, default=12.0)
    ap.add_argument("--keep", action="store_true", help="keep the scratch model")
    a = ap.parse_args()
    scratch = Path(a.scratch)
    src, out = scratch / f"llama7b-{a.layers}L", scratch / "out"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# commit {commit}; Llama 7B widths, {a.layers} layers, random bf16 weights; "
          f"{a.calib_samples} x 256 calibration tokens")
    if not src.exists():
        make_model(src, a.layers)
    calib = ["--calib-seq-len", "256"]
    runs = {"gptq W4-g128": ["quantize", str(src), "-o", str(out), "--method", "gptq", "--bits", "4", "--group-size",
                             "128", "--no-check", "--overwrite", "--calib-samples", str(a.calib_samples), *calib],
            f"recipe {' '.join(a.candidates)}": ["recipe", str(src), "-o", str(scratch / "recipe.yaml"), "--target-bpw",
                                                 str(a.target_bpw), "--candidates", *a.candidates,
                                                 "--sensitivity-samples", str(a.calib_samples), *calib]}
    peaks = {}
    print("| run | peak RSS | wall s |\n|---|---|---|")
    try:
        for name, args in runs.items():
            peaks[name], seconds = measure(args, int(a.limit_gib * GIB), scratch / f"{name.split()[0]}.log")
            print(f"| {name} | {peaks[name] / GIB:.2f} GiB | {seconds:.0f} |", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        gptq, recipe = peaks.values()
        print(f"recipe / gptq peak RSS: {recipe / gptq:.3f} (target <= 1.10)")
    finally:
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
