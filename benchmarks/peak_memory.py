"""Peak memory of quantizing a large model: bounded by one decoder block, not by the model size.

Writes a random-initialised Llama with 7B widths (hidden 4096, intermediate 11008, 32 heads, vocab
32000; bf16 safetensors, one shard per block) with a few layer counts into a scratch directory, then
runs `lowbit quantize` on each in a child process and records the child's peak RSS (its VmHWM)
and wall time. A watchdog kills a child above --limit-gib. With --eager, the same RTN
run with the whole float model loaded first (the path every source took before lazy loading).

Usage: python benchmarks/peak_memory.py [--layers 4 8] [--methods gptq rtn] [--eager] [--scratch DIR]
GPTQ runs on 8 calibration samples (--calib-samples) of 256 tokens, 4-bit, group 128, no accuracy check (--no-check);
at 7B widths its column loop costs many minutes per block on 2 cores (over 45 minutes for one block's
attention linears while the machine was shared): use few layers. Peak RSS is reached within a block.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

WIDTHS = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
              vocab_size=32000)
GIB = 1024 ** 3


def block_tensors(i: int) -> dict[str, tuple[int, ...]]:
    h, f = WIDTHS["hidden_size"], WIDTHS["intermediate_size"]
    p = f"model.layers.{i}."
    shapes = {f"self_attn.{n}_proj.weight": (h, h) for n in "qkvo"}
    shapes.update({"mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
                   "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)})
    return {p + n: s for n, s in shapes.items()}


def _random(shape) -> torch.Tensor:
    return torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else \
        (torch.randn(shape) * 0.02).to(torch.bfloat16)


def make_model(path: Path, layers: int) -> None:
    """An HF Llama directory written one shard (one block) at a time: never more than a block in memory."""
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    torch.manual_seed(0)
    h, v = WIDTHS["hidden_size"], WIDTHS["vocab_size"]
    shards = [{"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}]
    shards += [block_tensors(i) for i in range(layers)]
    weight_map, total = {}, 0
    for k, shapes in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _random(s) for n, s in shapes.items()}
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * 2 for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config = LlamaConfig(**WIDTHS, num_hidden_layers=layers, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config.dtype = torch.bfloat16
    config.save_pretrained(path)
    tokenizer(v).save_pretrained(path)


def tokenizer(vocab: int):
    """A byte-level BPE trained on the built-in calibration text (ids stay below the model's vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.calib import builtin

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([builtin("calib")], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def measure(args: list[str], limit: int, log: Path) -> tuple[int, float]:
    """(peak RSS bytes, seconds) of a child running CHILD with `args`; killed above `limit` bytes.
    The child reports its own VmHWM as it exits: the parent's RSS would leak into wait4's ru_maxrss,
    which Linux carries across fork and exec."""
    t = time.perf_counter()
    with open(log, "wb") as f:
        child = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=f, stderr=subprocess.STDOUT)
    status, killed = Path(f"/proc/{child.pid}/status"), False
    while child.poll() is None:
        try:
            rss = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
                       if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            rss = 0
        if rss > limit and not killed:
            child.kill()
            killed = True
        time.sleep(0.1)
    seconds = time.perf_counter() - t
    out = log.read_text(errors="replace")
    if killed:
        raise SystemExit(f"killed above {limit / GIB:.1f} GiB: {' '.join(args)}")
    if child.returncode:
        raise SystemExit(f"failed ({child.returncode}): {' '.join(args)}\n{out[-2000:]}")
    return next(int(line.split()[1]) for line in out.splitlines() if line.startswith("PEAK_RSS_KB")) * 1024, seconds


# Runs `lowbit ARGS...`, or with --eager SRC OUT the path every source took before lazy loading
# (the whole float model loaded, then rounded and saved); prints its own peak RSS at exit.
CHILD = """
import atexit, sys
from pathlib import Path
atexit.register(lambda: print("PEAK_RSS_KB", next(line.split()[1] for line in
                Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")), flush=True))
args = sys.argv[1:]
if args[0] == "--eager":
    import lowbit
    from lowbit.models import load_source
    loaded = load_source(args[1])
    lowbit.quantize(loaded, lowbit.RTN(bits=4, group_size=128), progress=False).save(args[2], overwrite=True)
else:
    from lowbit.cli import main
    sys.exit(main(args))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--methods", nargs="*", default=["gptq", "rtn"])
    ap.add_argument("--eager", action="store_true", help="also RTN with the whole float model loaded")
    ap.add_argument("--scratch", default="/tmp/lowbit-peak-memory")
    ap.add_argument("--limit-gib", type=float, default=10.0)
    ap.add_argument("--calib-samples", type=int, default=8, help="calibrated methods: samples of 256 tokens")
    ap.add_argument("--keep", action="store_true", help="keep the scratch models")
    a = ap.parse_args()
    scratch = Path(a.scratch)
    free = shutil.disk_usage(scratch.parent).free
    need = sum(n * 405_000_000 + 530_000_000 for n in a.layers) * 1.3
    if free < need:
        raise SystemExit(f"need about {need / GIB:.0f} GiB free under {scratch.parent}, have {free / GIB:.0f}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {platform.machine()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, "
          f"commit {commit}; Llama 7B widths {WIDTHS}, bf16 shards, random weights")
    h, f = WIDTHS["hidden_size"], WIDTHS["intermediate_size"]
    block = 4 * h * h + 3 * h * f + 2 * h
    outside = 2 * WIDTHS["vocab_size"] * h + h
    print(f"one block: {block:,} weights = {2 * block / GIB:.2f} GiB bf16 on disk, {4 * block / GIB:.2f} GiB "
          f"fp32 in memory; embeddings + head: {4 * outside / GIB:.2f} GiB fp32")
    print("| layers | model on disk | method | path | peak RSS | wall s | output |")
    print("|---|---|---|---|---|---|---|")
    calib = ["--calib-samples", str(a.calib_samples), "--calib-seq-len", "256"]
    peaks: dict[tuple[str, str], dict[int, int]] = {}
    try:
        for n in a.layers:
            src, out = scratch / f"llama7b-{n}L", scratch / f"out-{n}L"
            if not src.exists():
                make_model(src, n)
            disk = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            runs = [(m, "lazy", ["quantize", str(src), "-o", str(out), "--method", m, "--bits", "4",
                                 "--group-size", "128", "--no-check", "--overwrite"] + (calib if m != "rtn" else []))
                    for m in a.methods]
            if a.eager:
                runs.append(("rtn", "eager", ["--eager", str(src), str(out)]))
            for method, path, args in runs:
                peak, seconds = measure(args, int(a.limit_gib * GIB),
                                        scratch / f"{n}L-{method}-{path}.log")
                size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
                print(f"| {n} | {disk / GIB:.2f} GiB | {method} W4-g128 | {path} | {peak / GIB:.2f} GiB | "
                      f"{seconds:.0f} | {size / GIB:.2f} GiB |", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                peaks.setdefault((method, path), {})[n] = peak
        for (method, path), by_layers in peaks.items():  # what one more decoder block costs
            (lo, p_lo), (hi, p_hi) = min(by_layers.items()), max(by_layers.items())
            if hi > lo:
                print(f"{method} {path}: {(p_hi - p_lo) / (hi - lo) / GIB:+.3f} GiB peak RSS per layer "
                      f"({lo} -> {hi} layers)")
    finally:
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
