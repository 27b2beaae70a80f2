"""Speed: prefill and decode tokens/s through the Decoder protocol, and decode as % of the memory roofline.

One protocol for every engine (ours, llama.cpp in benchmarks/vs_llamacpp.py, HF transformers): an
empty cache, one prefill of `pp` tokens of real text; then from one cached token, `tg` single-token
steps. One warm-up run, then the median of `runs`. The roofline is bytes read per decoded token
(every weight once; the input embedding only a row unless it is tied to the output head) over this
run's measured DRAM read bandwidth.
"""

from __future__ import annotations

import copy
import ctypes
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..calib import load
from ..formats.activation import ActQ
from ..kernels.cpu import build, isa, threads as pool
from ..methods import MethodConfig
from ..models import load_any, load_source
from ..nn import ActQuantLinear
from ..runtime import HFDecoder, decoder_for, use_threads
from .size import model_size


@dataclass
class Speed:
    prefill_tps: float  # median, pp tokens
    decode_tps: float  # median, tg tokens
    prompt_tokens: int
    gen_tokens: int
    threads: int
    runs: int
    decoder: str  # which Decoder ran (engine or universal)
    bytes_per_token: int = 0
    bandwidth: float = 0.0  # bytes/s, this run
    peak_rss_mb: float = 0.0

    @property
    def roofline_pct(self) -> float:
        limit = self.bandwidth / self.bytes_per_token if self.bytes_per_token and self.bandwidth else 0.0
        return 100 * self.decode_tps / limit if limit else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "roofline_pct": self.roofline_pct}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_tokens(tokenizer, n: int) -> list[int]:
    """`n` token ids of the built-in evaluation text (repeated if it is short)."""
    ids = list(tokenizer(load("eval")).input_ids)
    return (ids * (n // len(ids) + 1))[:n]


def time_decoder(decoder, tokens: list[int], pp: list[int], tg: int, runs: int) -> dict[str, float]:
    """{'pp<n>': tokens/s, ..., 'tg<tg>': tokens/s}, medians over `runs` after one warm-up."""
    out = {}

    def median(fn) -> float:
        times = []
        for _ in range(runs + 1):
            decoder.truncate(0)
            times.append(fn())
        return statistics.median(times[1:])

    def prefill(n):
        t0 = time.perf_counter()
        decoder.forward(tokens[:n])
        return time.perf_counter() - t0

    def decode():
        decoder.forward(tokens[:1])
        t0 = time.perf_counter()
        for i in range(tg):
            decoder.forward(tokens[1 + i:2 + i])
        return time.perf_counter() - t0

    for n in pp:
        out[f"pp{n}"] = n / median(lambda: prefill(n))
    if tg:
        out[f"tg{tg}"] = tg / median(decode)
    decoder.truncate(0)
    return out


def bandwidth(threads: int, gib: float = 1.0) -> float:
    """DRAM read bytes/s: the best of several sequential reads of a buffer far larger than the caches,
    by the kernel library's own read loop (`lb_read`, on its thread pool) and by torch's sum; the
    faster of the two, so a kernel's "% of bandwidth" is never measured against a slow yardstick."""
    torch.set_num_threads(threads)
    buf = torch.ones(int(gib * 2**30) // 4)
    reads = [lambda: buf.sum()]
    lib = build.load(isa.selected())
    if lib is not None:
        pool.apply(lib)
        lib.lb_read.restype = ctypes.c_uint64
        reads.append(lambda: lib.lb_read(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(buf.nbytes), threads))
    best = float("inf")
    for read in reads:
        read()
        for _ in range(7):
            t0 = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


def bytes_per_token(model, decoder=None) -> int:
    """Bytes of weights a decode step reads: the decoder's own count when it keeps its own layout
    (a `bytes_per_token` attribute), else all the model's weights, the input embedding only if the
    output head reads it too (tied)."""
    if getattr(decoder, "bytes_per_token", None):
        return int(decoder.bytes_per_token)
    total = model_size(model).total_bytes
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0)
    return total if tied else total - sum(t.nbytes for t in embed.state_dict().values())


def bench(model, tokenizer, threads: int | None = None, prompt_tokens: int = 512, gen_tokens: int = 128,
          runs: int = 3, engine: bool = True, roofline: bool = True, exact: bool = False) -> Speed:
    """Prefill and decode speed of `model` through `decoder_for` (the engine where it applies)."""
    decoder = decoder_for(model, max_context=prompt_tokens + gen_tokens + 1, threads=threads, engine=engine,
                          exact=exact)
    threads = threads or torch.get_num_threads()
    r = time_decoder(decoder, bench_tokens(tokenizer, prompt_tokens + gen_tokens + 1), [prompt_tokens],
                     gen_tokens, runs)
    speed = Speed(r[f"pp{prompt_tokens}"], r.get(f"tg{gen_tokens}", 0.0), prompt_tokens, gen_tokens, threads,
                  runs, type(decoder).__name__, bytes_per_token(model, decoder))
    if roofline:
        speed.bandwidth = bandwidth(threads)
    speed.peak_rss_mb = peak_rss_mb()
    return speed


# ---- the side-by-side table (benchmarks/vs_llamacpp.py supplies llama.cpp) -------------------------
PEERS_BY_BITS = {4: ["Q4_0", "Q4_K_M", "Q4_1"], 8: ["Q8_0"]}


def side_by_side(models: list[str], ggufs: dict, peer, threads=(1, 2), pp=(128, 512), tg: int = 128,
                 runs: int = 3, hf: bool = True, print_fn=print) -> list[dict]:
    """Rows of tokens/s for lowbit `models`, llama.cpp (`peer(path, threads, tokens) -> dict`) at the same
    bits class, and transformers fp32/bf16 of the source; printed as a markdown table with ratios."""
    rows = []
    loaded = [(m, load_any(m).model) for m in models]
    source = load_source(None)
    tokens = bench_tokens(source.tokenizer, max(pp) + tg + 1)
    cols = [f"pp{n}" for n in pp] + [f"tg{tg}"]
    for t in threads:
        use_threads(t)
        bw = bandwidth(t)

        def add(engine, fmt, bits, r, nbytes):
            row = {"engine": engine, "format": fmt, "bits": bits, "threads": t, **r, "MB/token": nbytes / 1e6,
                   "roofline_pct": 100 * r[f"tg{tg}"] * nbytes / bw, "bandwidth_GBs": bw / 1e9}
            rows.append(row)
            print_fn(f"  measured {engine} {fmt} threads={t}: " + ", ".join(f"{c} {r[c]:.1f}" for c in cols),
                     flush=True)

        for name, model in loaded:
            d = decoder_for(model, max_context=max(pp) + tg + 2, threads=t)
            metas = [layer.meta for layer in model_size(model).layers]
            m = max(metas, key=metas.count)  # the body's format (most layers), not the 8-bit head or embedding
            bits = m["bits"]
            scheme = MethodConfig(m["bits"], m["group_size"], m.get("sym", True)).scheme
            acts = [ActQ.describe(layer.act_meta) for layer in model.modules() if isinstance(layer, ActQuantLinear)]
            scheme += f" {max(acts, key=acts.count)}" if acts else ""  # W·A·: the activations' spec too
            add(f"lowbit ({type(d).__name__})", scheme, bits, time_decoder(d, tokens, list(pp), tg, runs),
                bytes_per_token(model, d))
            for fmt in PEERS_BY_BITS.get(bits, []):
                if fmt in ggufs and not any(r["format"] == fmt and r["threads"] == t for r in rows):
                    add("llama.cpp", fmt, bits, peer(ggufs[fmt], t, tokens), ggufs[fmt].stat().st_size)
        if hf:
            for dtype in (torch.float32, torch.bfloat16):
                m = source.model if dtype == torch.float32 else copy.deepcopy(source.model).to(dtype)
                add("transformers", str(dtype).split(".")[-1], None,
                    time_decoder(HFDecoder(m, max(pp) + tg + 2), tokens, list(pp), tg, runs), bytes_per_token(m))
    print_fn(table(rows, cols, tg))
    print_fn(f"peak RSS of the lowbit process: {peak_rss_mb():.0f} MB")
    return rows


def table(rows: list[dict], cols: list[str], tg: int) -> str:
    head = ["engine", "format", "threads", *cols, "MB/token", f"tg{tg} % roofline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['format']} | {r['threads']} | "
                     + " | ".join(f"{r[c]:.1f}" for c in cols)
                     + f" | {r['MB/token']:.1f} | {r['roofline_pct']:.0f}% |")
    ours = [r for r in rows if r["engine"].startswith("lowbit")]
    if ours:
        lines += ["", "ratios ours / theirs (same threads; > 1 means lowbit is faster):", "",
                  "| lowbit | vs | threads | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
        for o in ours:
            for r in rows:
                if r["threads"] == o["threads"] and not r["engine"].startswith("lowbit") \
                        and r["bits"] in (None, o["bits"]):
                    lines.append(f"| {o['format']} | {r['engine']} {r['format']} | {r['threads']} | "
                                 + " | ".join(f"{o[c] / r[c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)
