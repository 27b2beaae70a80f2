"""Our GPTQ / AWQ / SignRound vs their reference implementations, same model, data, eval and settings.

Theirs: llm-compressor (GPTQ, AWQ) and auto-round (SignRound), each installed by this script into its own
scratch venv under ~/.cache/lowbit/peers (with the system torch, never a CUDA build; never a lowbit
dependency), run through benchmarks/peers/run_peer.py. Both sides get the same calibration windows of
the built-in calibration split, the same float SmolLM2-135M (embedded default), and are scored by
lowbit.eval on the same held-out text. Prints one table: scheme × method → ppl ours / theirs, time.
Groups of 64 by default: llm-compressor refuses a group that does not divide a layer (SmolLM2's 576
columns at g128), where lowbit uses a shorter last group.
Usage: python benchmarks/reference_methods.py [--schemes W4-g64 W3-g64 W2-g64] [--methods gptq awq signround]
       [--samples 32] [--seq-len 512] [--iters 200] [--max-windows N]
"""

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lowbit
from common import start
from lowbit.calib import load as load_text
from lowbit.calib.runner import calibration_batches
from lowbit.eval import evaluate

PEERS = Path.home() / ".cache" / "lowbit" / "peers"
IMPL = {"gptq": ("llmcompressor", "llmcompressor==0.14.0.1"), "awq": ("llmcompressor", "llmcompressor==0.14.0.1"),
        "signround": ("autoround", "auto-round==0.16.1"), "teq": ("inc", "neural-compressor==3.10")}
SYM = {"gptq": True, "awq": False, "signround": True, "teq": True}  # customary defaults, same on both sides
RUNNER = Path(__file__).parent / "peers" / "run_peer.py"


def peer_python(venv: str, requirement: str) -> Path:
    """The peer's interpreter, creating its venv (system torch visible, pinned) on first use."""
    py = PEERS / venv / "bin" / "python"
    if not py.exists():
        PEERS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(PEERS / venv)], check=True)
        pin = PEERS / "constraints.txt"
        pin.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(pin), requirement], check=True)
    return py


class PeerFailed(Exception):
    """The reference implementation refused or crashed: its row says why, the table goes on."""


def stage(src, samples: int, seq_len: int) -> Path:
    """A scratch directory holding the float model (`model/`, HF format) and `samples` x `seq_len`
    calibration windows of the built-in split (`calib.safetensors`): what both sides read."""
    work = Path(tempfile.mkdtemp(prefix="lowbit-peers-"))
    src.model.save_pretrained(work / "model")
    src.tokenizer.save_pretrained(work / "model")
    ids = torch.cat(calibration_batches(src.tokenizer, load_text("calib"), samples, seq_len))
    save_file({"input_ids": ids.contiguous()}, str(work / "calib.safetensors"))
    return work


def theirs(method, bits, group, a, model_dir, calib_file, work, sym: bool | None = None):
    """The peer's quantize-dequantized weights and its seconds; `sym` defaults to the method's custom (SYM)."""
    venv, requirement = IMPL[method]
    sym = SYM[method] if sym is None else sym
    out = work / f"{method}-{bits}-{group}-{'sym' if sym else 'asym'}.safetensors"
    cmd = [str(peer_python(venv, requirement)), str(RUNNER), venv, method, "--model", str(model_dir),
           "--calib", str(calib_file), "--out", str(out), "--bits", str(bits), "--group-size", str(group),
           "--iters", str(a.iters)] + (["--sym"] if sym else [])
    log = work / "peer.log"
    with open(log, "a") as err:
        if subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err).returncode != 0:
            lines = log.read_text().strip().splitlines()
            raise PeerFailed(lines[-1] if lines else "no output")
    with safe_open(str(out), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["seconds"])


def with_weights(model, weights: dict):
    """A copy of the float `model` holding the peer's tensors (it may not add any the model lacks)."""
    model = copy.deepcopy(model)
    unknown = set(weights) - set(model.state_dict())
    if unknown:
        raise SystemExit(f"peer returned unknown tensors: {sorted(unknown)[:3]}")
    model.load_state_dict(weights, strict=False)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", nargs="+", default=["W4-g64", "W3-g64", "W2-g64"])
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq", "signround"], choices=list(IMPL))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--iters", type=int, default=200, help="SignRound iterations (both sides)")
    ap.add_argument("--max-windows", type=int)
    a = ap.parse_args()
    src, text = start(f"calibration {a.samples} x {a.seq_len}; signround iters {a.iters}; "
                      f"peers: {', '.join(sorted({r for _, r in IMPL.values()}))}")
    work = stage(src, a.samples, a.seq_len)
    print("| scheme | method | ppl ours | ppl theirs | ours/theirs | time ours s | time theirs s |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for scheme in a.schemes:
        bits, group = int(scheme.split("-")[0][1:]), int(scheme.split("-")[1][1:])
        for method in a.methods:
            extra = {"iters": a.iters} if method == "signround" else {}
            cfg = lowbit.methods.config_for(method, bits=bits, group_size=group, sym=SYM[method], **extra)
            t = time.perf_counter()
            ours = lowbit.quantize(copy.deepcopy(src.model), cfg, tokenizer=src.tokenizer,
                                   calib_samples=a.samples, calib_seq_len=a.seq_len, progress=False)
            t_ours = time.perf_counter() - t
            r_ours = evaluate(ours.model, src.tokenizer, text, max_windows=a.max_windows, progress=False)
            del ours
            try:
                weights, t_theirs = theirs(method, bits, group, a, work / "model", work / "calib.safetensors", work)
            except PeerFailed as e:
                print(f"| {scheme} {'sym' if SYM[method] else 'asym'} | {method} | {r_ours.ppl:.3f} | failed: {e} "
                      f"| - | {t_ours:.0f} | - |", flush=True)
                continue
            model = with_weights(src.model, weights)
            r_theirs = evaluate(model, src.tokenizer, text, max_windows=a.max_windows, progress=False)
            del model
            print(f"| {scheme} {'sym' if SYM[method] else 'asym'} | {method} | {r_ours.ppl:.3f} | "
                  f"{r_theirs.ppl:.3f} | {r_ours.ppl / r_theirs.ppl:.3f} | {t_ours:.0f} | {t_theirs:.0f} |",
                  flush=True)
    print(f"float source ppl on the same windows: "
          f"{evaluate(src.model, src.tokenizer, text, max_windows=a.max_windows, progress=False).ppl:.3f}")


if __name__ == "__main__":
    main()
