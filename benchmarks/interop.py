"""Interop, proven by the peers (issue 19): llama.cpp runs our exported GGUFs with our perplexity, and
speed at 7B shapes on identical weights.

    python benchmarks/interop.py ppl   [--ctx 512] [--chunks N]      # SmolLM2: export, llama.cpp vs lowbit
    python benchmarks/interop.py kquant [--chunks N] [--windows N]   # SmolLM2 W2/W3/W4-asym: K-quant exports
    python benchmarks/interop.py speed [--layers 32] [--threads 1 2]  # 7B shapes, Q4_0 on both engines
    python benchmarks/interop.py kspeed [--shape 7b] [--layers 32] [--gguf F]  # llama.cpp's own Q4_K_M, imported

`ppl` quantizes the embedded SmolLM2 (RTN, head and embedding 8-bit g32 as the CLI does) to W4 g32 sym,
W8 g32 sym and W4 g32 asym, exports each with `lowbit export --to gguf` (Q4_0, Q8_0, Q4_1), and scores
the built-in held-out text as llama-perplexity does: disjoint chunks of ctx tokens, the second half of
each scored. llama.cpp (libllama through llama-cpp-python in the scratch virtualenv of
vs_llamacpp.py, never a lowbit dependency) scores the exported file; lowbit scores the model it
exported on the very same token chunks, on our kernels (fp32 activations, the exact path), so the
difference is the file and llama.cpp's int8 activations only; a control row scores the published Q4_1
file in llama.cpp against its dequantization in lowbit (identical weights: the activations' share).
The issue's bar: within 0.5%.

`kquant` quantizes the embedded SmolLM2 (RTN, head and embedding 8-bit g32) at W2 g64 sym, W3 g128 sym
and W4 g128 asym, which no 32-block type holds at their size: the export fits the layers whose rows are
whole 256-weight super-blocks (SmolLM2: down_proj, 1536 inputs) to Q2_K / Q3_K / Q4_K and writes the
others (576 inputs) in llama.cpp's fallback types (Q4_0 / Q5_0, exact for these grids). Per model: the
GGUF types with each one's largest conversion error (relative squared error against our weights), the
KL divergence of the exported file (loaded back through lowbit's GGUF loader, which dequantizes with
gguf's reference) from the lowbit model it came from (lowbit's eval), and the perplexity of the
exported file in llama-perplexity (llama.cpp's own tool, benchmarks/peers/build_llamacpp.sh) next to
lowbit's score of the lowbit model on the same chunks, with the published Q4_1 file as the control.

`speed` builds a Llama with 7B shapes (hidden 4096, intermediate 11008, 32 heads, vocab 32000; random
weights, quantized as they are made: never a float model in memory) at W4 g32 sym with an 8-bit
g32 head and embedding, exports it to GGUF (Q4_0 with Q8_0 head and embedding), then times lowbit's
engine (bench's protocol: the median of --runs) and llama.cpp's own llama-bench (its mean of --runs)
on those identical weights, 1 and 2 threads, one run, decode as % of the bandwidth roofline measured in the same run. Targets: decode
≥ 1.3× llama.cpp and ≥ 80% of the roofline; prefill ≥ 1.2×. Run it on a quiet machine.

`kspeed` is the other way: the same random Llama (7B or, `--shape 1b`, TinyLlama-1.1B shapes) with
every weight at 8-bit g32 (Q8_0, the closest to float llama-quantize accepts without a float model
in memory) made into llama.cpp's own Q4_K_M by llama-quantize (--allow-requantize; Q4_K with Q6_K for
the output head and half of attn_v/ffn_down), then imported by lowbit without dequantizing
(gguf_read.skeleton + import_gguf: KQuant layers holding the file's blocks, c/kquant.h) and timed
on lowbit's engine beside llama-bench on that very file, 1 and 2 threads. Target: decode ≥ 1.0×.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from vs_llamacpp import build, llama_bench, llama_perplexity, peer, tool  # noqa: E402  the scratch llama-cpp-python and llama.cpp's tools

import lowbit  # noqa: E402
from lowbit.calib import load as load_text  # noqa: E402
from lowbit.io import write_gguf  # noqa: E402
from lowbit.models import default_gguf  # noqa: E402
from lowbit.recipes import EDGE  # noqa: E402

# runs inside the scratch virtualenv: llama.cpp's logits for each chunk, scored like llama-perplexity
PPL_CODE = r'''
import json, sys
import numpy as np
import llama_cpp
job = json.loads(sys.stdin.read())
llm = llama_cpp.Llama(model_path=job["path"], n_ctx=job["ctx"], n_batch=job["ctx"], n_ubatch=job["ctx"],
                      n_threads=job["threads"], n_threads_batch=job["threads"], logits_all=True, verbose=False)
nll, count = 0.0, 0
for chunk in job["chunks"]:
    llm.reset()
    llm.eval(chunk)
    logits = np.asarray(llm.scores[:len(chunk)], dtype=np.float64)
    first = len(chunk) // 2
    for i in range(first, len(chunk) - 1):
        row = logits[i]
        m = row.max()
        nll += m + np.log(np.exp(row - m).sum()) - row[chunk[i + 1]]
        count += 1
print(json.dumps({"nll": nll, "count": count}))
'''


def peer_ppl(python: Path, path: Path, chunks: list[list[int]], ctx: int, threads: int) -> float:
    import subprocess

    r = subprocess.run([python, "-c", PPL_CODE], input=json.dumps({"path": str(path), "chunks": chunks, "ctx": ctx,
                                                                  "threads": threads}), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"llama.cpp failed on {path}: {r.stderr.strip()[-1500:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return math.exp(out["nll"] / out["count"])


def our_ppl(model, chunks: list[list[int]]) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for chunk in chunks:
            logits = model(torch.tensor([chunk])).logits[0].double()
            first = len(chunk) // 2
            logp = torch.log_softmax(logits[first:-1], dim=-1)
            nll -= logp.gather(1, torch.tensor(chunk[first + 1:])[:, None]).sum().item()
            count += len(chunk) - 1 - first
    return math.exp(nll / count)


def ppl(a) -> None:
    python = build()
    source = lowbit.load("default")
    _, chunks = eval_chunks(source.tokenizer, a.ctx, a.chunks)
    print(f"# SmolLM2-135M-Instruct, {len(chunks)} chunks of {a.ctx} tokens, second half scored "
          f"(llama-perplexity's scoring), {a.threads} threads")
    print("| lowbit format | GGUF type | lowbit ppl | llama.cpp ppl | llama.cpp / lowbit |")
    print("|---|---|---|---|---|")
    # the control: the published Q4_1 file itself in llama.cpp against its float dequantization in lowbit
    # (the same weights): what llama.cpp's int8 activations alone move
    theirs = peer_ppl(python, default_gguf(), chunks, a.ctx, a.threads)
    ours = our_ppl(source.model, chunks)
    print(f"| float (the source, dequantized) | Q4_1 (published) | {ours:.4f} | {theirs:.4f} | "
          f"{100 * (theirs / ours - 1):+.2f}% |", flush=True)
    del source
    with tempfile.TemporaryDirectory() as tmp:
        for bits, sym, name in ((4, True, "Q4_0"), (8, True, "Q8_0"), (4, False, "Q4_1")):
            model = lowbit.load("default")
            q = lowbit.quantize(model, lowbit.RTN(bits=bits, group_size=32, sym=sym), lm_head=EDGE, embeddings=EDGE,
                                progress=False)
            path = q.export(Path(tmp) / f"smollm2-{name}.gguf")
            ours, theirs = our_ppl(q.model, chunks), peer_ppl(python, path, chunks, a.ctx, a.threads)
            print(f"| W{bits}-g32-{'sym' if sym else 'asym'} | {name} | {ours:.4f} | {theirs:.4f} | "
                  f"{100 * (theirs / ours - 1):+.2f}% |", flush=True)
            del q, model


KQUANT = ((2, 64, True), (3, 128, True), (4, 128, False))


def eval_chunks(tokenizer, ctx: int, limit: int) -> tuple[str, list[list[int]]]:
    """The built-in held-out text and its first `limit` disjoint chunks of ctx tokens."""
    text = load_text("eval")
    ids = tokenizer(text).input_ids
    return text, [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)][:limit]


def kquant(a) -> None:
    source = lowbit.load("default")
    text, chunks = eval_chunks(source.tokenizer, a.ctx, a.chunks)
    print(f"# SmolLM2-135M-Instruct, RTN with 8-bit g32 head and embedding; KLD over {a.windows} windows of 512 "
          f"(lowbit eval); perplexity over {len(chunks)} chunks of {a.ctx} tokens, second half scored, "
          f"{a.threads} threads")
    print("| lowbit format | GGUF types (tensors, largest relative error) | KLD exported vs lowbit | lowbit ppl "
          "| llama-perplexity | llama.cpp / lowbit |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "eval.txt"
        corpus.write_text(text)
        ours, theirs = our_ppl(source.model, chunks), llama_perplexity(default_gguf(), corpus, a.ctx, len(chunks),
                                                                       a.threads)
        print(f"| float (the source, dequantized) | Q4_1 (published) | | {ours:.4f} | {theirs:.4f} | "
              f"{100 * (theirs / ours - 1):+.2f}% |", flush=True)
        del source
        for bits, group, sym in KQUANT:
            q = lowbit.quantize(lowbit.load("default"), lowbit.RTN(bits=bits, group_size=group, sym=sym),
                                lm_head=EDGE, embeddings=EDGE, progress=False)
            report = []
            path = write_gguf(q.model, Path(tmp) / f"w{bits}.gguf", q.tokenizer, default_gguf(), report=report)
            types = {}
            for r in report:
                n, worst = types.get(r.gguf_type, (0, 0.0))
                types[r.gguf_type] = (n + 1, max(worst, r.rel_err))
            kinds = ", ".join(f"{t} ({n}, {e:.1e})" for t, (n, e) in sorted(types.items()))
            kld = lowbit.load(str(path)).evaluate(kld=True, reference=q.model, max_windows=a.windows, progress=False,
                                                  exact=True).kld  # the conversion's error, not int8 rounding
            ours, theirs = our_ppl(q.model, chunks), llama_perplexity(path, corpus, a.ctx, len(chunks), a.threads)
            print(f"| W{bits}-g{group}-{'sym' if sym else 'asym'} | {kinds} | {kld:.5f} | {ours:.4f} | {theirs:.4f} | "
                  f"{100 * (theirs / ours - 1):+.2f}% |", flush=True)
            del q


SHAPES = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
              vocab_size=32000, max_position_embeddings=4096)


SHAPES_1B = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 vocab_size=32000, max_position_embeddings=2048)


def seven_b(layers: int, bits: int = 4, shapes: dict = SHAPES):
    """A Llama with 7B shapes (or `shapes`), each weight quantized as it is drawn (0.02·N(0, 1), the
    seed fixed): `bits` g32 sym, the head and embedding 8-bit."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lowbit.nn import QuantEmbedding, QuantLinear

    config = LlamaConfig(**shapes, num_hidden_layers=layers, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for name, m in list(model.named_modules()):
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            w = torch.randn(m.weight.shape, generator=gen) * 0.02
            head = name in ("lm_head", "model.embed_tokens")
            qt = lowbit.UniformQ.from_float(w, 8 if head else bits, 32, True)
            model.set_submodule(name, QuantEmbedding(qt) if isinstance(m, torch.nn.Embedding) else QuantLinear(qt))
    for name, p in list(model.named_parameters()):
        if p.is_meta:  # the norms
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, torch.nn.Parameter(torch.ones(p.shape), requires_grad=False))
    return model.eval()


def side_by_side(model, tok, path: Path, a) -> None:
    """`bench` of our engine beside llama-bench on the same file `path` (identical weights: the same
    bytes per token, so one roofline), a row each per thread count of `a.threads`."""
    from lowbit.eval.bench import bench
    print("| threads | engine | prefill tok/s | decode tok/s | decode % roofline | ratio prefill | ratio decode |")
    print("|---|---|---|---|---|---|---|")
    for t in a.threads:
        ours = bench(model, tok, threads=t, prompt_tokens=a.pp, gen_tokens=a.tg, runs=a.runs)
        theirs = llama_bench(path, t, [a.pp], a.tg, a.runs)
        pp, tg = theirs[f"pp{a.pp}"], theirs[f"tg{a.tg}"]
        limit = ours.bandwidth / ours.bytes_per_token
        print(f"| {t} | lowbit ({ours.decoder}) | {ours.prefill_tps:.1f} | {ours.decode_tps:.2f} | "
              f"{ours.roofline_pct:.0f}% | {ours.prefill_tps / pp:.2f}x | {ours.decode_tps / tg:.2f}x |")
        print(f"| {t} | llama.cpp | {pp:.1f} | {tg:.2f} | {100 * tg / limit:.0f}% | | |", flush=True)


def speed(a) -> None:
    from peak_memory import tokenizer

    tok = tokenizer(SHAPES["vocab_size"])
    model = seven_b(a.layers)
    with tempfile.TemporaryDirectory(dir=a.scratch) as tmp:
        path = write_gguf(model, Path(tmp) / "llama-7b-shapes.Q4_0.gguf", tok)
        print(f"# Llama 7B shapes, {a.layers} layers, random weights: W4 g32 sym, head and embedding 8-bit g32; "
              f"exported {path.stat().st_size / 2**30:.2f} GiB GGUF (Q4_0 + Q8_0); pp{a.pp}, tg{a.tg}, "
              f"median of {a.runs}")
        side_by_side(model, tok, path, a)


def kspeed(a) -> None:
    from peak_memory import tokenizer

    from lowbit.io.gguf_read import import_gguf, skeleton
    shapes = SHAPES if a.shape == "7b" else SHAPES_1B
    tok = tokenizer(shapes["vocab_size"])
    with tempfile.TemporaryDirectory(dir=a.scratch) as tmp:
        path = Path(a.gguf) if a.gguf else Path(tmp) / "llama.Q4_K_M.gguf"
        if not path.is_file():
            q4_k_m(a, shapes, tok, path)
        model = skeleton(path)
        import_gguf(path, model)
        kinds = {}
        for m in model.modules():
            if hasattr(m, "qtensor"):
                kinds[m.meta.get("type", m.meta["kind"])] = kinds.get(m.meta.get("type", m.meta["kind"]), 0) + 1
        print(f"# Llama {a.shape} shapes, {a.layers} layers, random weights: llama-quantize Q4_K_M "
              f"({path.stat().st_size / 2**30:.2f} GiB; imported layers: "
              f"{', '.join(f'{k} ×{n}' for k, n in sorted(kinds.items()))}); pp{a.pp}, tg{a.tg}, median of {a.runs}")
        side_by_side(model, tok, path, a)


def q4_k_m(a, shapes: dict, tok, path: Path) -> None:
    """llama-quantize's Q4_K_M of the random Llama, written at `path` (from an all-Q8_0 export beside it)."""
    import subprocess

    q8 = path.with_suffix(".Q8_0.tmp")
    write_gguf(seven_b(a.layers, 8, shapes), q8, tok)
    r = subprocess.run([tool("llama-quantize"), "--allow-requantize", q8, path, "Q4_K_M", "2"],
                       capture_output=True, text=True)
    q8.unlink()
    if r.returncode:
        path.unlink(missing_ok=True)
        raise SystemExit(f"llama-quantize failed: {r.stderr.strip()[-1500:]}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("ppl")
    s.add_argument("--ctx", type=int, default=512)
    s.add_argument("--chunks", type=int, default=1000, help="at most this many chunks (default: all)")
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(func=ppl)
    s = sub.add_parser("kquant")
    s.add_argument("--ctx", type=int, default=512)
    s.add_argument("--chunks", type=int, default=1000, help="at most this many perplexity chunks (default: all)")
    s.add_argument("--windows", type=int, default=None, help="at most this many KLD windows (default: all)")
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(func=kquant)
    timing = argparse.ArgumentParser(add_help=False)  # what speed and kspeed (side_by_side) both take
    timing.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    timing.add_argument("--pp", type=int, default=512)
    timing.add_argument("--tg", type=int, default=128)
    timing.add_argument("--runs", type=int, default=3)
    timing.add_argument("--scratch", default=None, help="where the GGUFs go (default: a temporary directory)")
    s = sub.add_parser("speed", parents=[timing])
    s.add_argument("--layers", type=int, default=32)
    s.set_defaults(func=speed)
    s = sub.add_parser("kspeed", parents=[timing])
    s.add_argument("--shape", choices=["7b", "1b"], default="7b")
    s.add_argument("--layers", type=int, default=None, help="default: 32 (7b), 22 (1b)")
    s.add_argument("--gguf", default=None, help="the Q4_K_M file: used if it exists (its shape and layers must be "
                   "--shape's and --layers'), else made there and kept (default: made in a temporary directory)")
    s.set_defaults(func=kspeed)
    a = p.parse_args(argv)
    if a.what == "kspeed" and a.layers is None:
        a.layers = 32 if a.shape == "7b" else 22
    a.func(a)


if __name__ == "__main__":
    main()
