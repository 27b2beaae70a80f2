"""The `lowbit` command: parses arguments, calls the package API, prints. No logic of its own."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from . import api
from .errors import LowbitError
from .eval import model_size
from .methods import METHODS
from .models import load_any
from .eval.bench import bench
from .kernels.cpu import tune
from .runtime import Chat, SamplingParams, Session


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def cmd_quantize(a) -> None:
    extra = {k: v for k, v in (("mse_clip", a.mse_clip), ("act_order", a.act_order), ("damp", a.damp),
                               ("budget_minutes", a.budget_minutes), ("group_size", a.group_size),
                               ("iters", a.iters), ("outlier_ratio", a.outlier_ratio))
             if v is not None and v is not False}
    config = api.config_for(a.method, bits=a.bits, sym=a.sym, **extra)
    r = api.quantize_to(a.source, a.output, config, a.calib, lm_head=a.lm_head, embeddings=a.embeddings,
                        calib_samples=a.calib_samples, calib_seq_len=a.calib_seq_len, overwrite=a.overwrite,
                        check_windows=0 if a.no_check else (a.check_windows or None))
    print(f"saved {r.out}  ({r.method} {config.scheme}, {len(r.size.layers)} layers quantized)")
    if r.auto_report:
        print(r.auto_report)
    print(f"size: {r.disk_bytes:,} bytes on disk ({_human(r.disk_bytes)}); "
          f"{r.size.quantized_bpw:.3f} bits/weight in quantized layers, "
          f"{r.size.model_bpw:.3f} over the whole model")
    if r.check:
        c = r.check
        print(f"perplexity (ctx {c.ctx}, {c.tokens:,} tokens of held-out text): "
              f"source {c.source_ppl:.3f} -> quantized {c.ppl:.3f} ({100 * (c.ppl / c.source_ppl - 1):+.2f}%)")
        print(f"KL divergence vs source: {c.kld:.5f} nats/token")
        g = r.generation
        print(f"speed (reloaded model): prefill {g.prefill_tps:.1f} tok/s, decode {g.decode_tps:.1f} tok/s")
        print(f"sample: {api.SAMPLE_PROMPT}{r.sample}")


def _show(text: str) -> None:
    print(text, end="", flush=True)


def _stats(stats) -> str:
    cached = f", {stats.cached_tokens} prompt tokens from cache" if stats.cached_tokens else ""
    return (f"[{stats.new_tokens} tokens; prefill {stats.prefill_tps:.1f} tok/s, "
            f"decode {stats.decode_tps:.1f} tok/s{cached}]")


def _sampling(a) -> SamplingParams:
    return SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                          repetition_penalty=a.repetition_penalty, seed=a.seed)


def cmd_generate(a) -> None:
    model = api.load(a.model)
    print(a.prompt, end="", flush=True)
    _, stats = api.generate(model, model.lowbit_tokenizer, a.prompt, a.max_tokens, on_text=_show,
                            sampling=_sampling(a), stop=a.stop or (), threads=a.threads, max_context=a.max_context,
                            exact=a.exact)
    print("\n" + _stats(stats), file=sys.stderr)


def cmd_chat(a) -> None:
    model = api.load(a.model)
    chat = Chat(Session.for_model(model, model.lowbit_tokenizer, a.max_context, a.threads, exact=a.exact), a.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("one message per line; /reset starts over; Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            line = ""
        if not line:
            break
        if line.strip() == "/reset":
            chat.reset()
        elif line.strip():
            reply = chat.send(line.strip(), a.max_tokens, sampling=_sampling(a), stop=a.stop or (), on_text=_show)
            print(flush=True)
            print(_stats(reply.stats), file=sys.stderr, flush=True)


def cmd_serve(a) -> None:
    from .runtime.server import serve

    model = api.load(a.model)
    session = Session.for_model(model, model.lowbit_tokenizer, a.max_context, a.threads, exact=a.exact)
    defaults = {k: getattr(a, k) for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")}
    serve(session, a.name or Path(a.model).name, a.host, a.port, defaults, a.max_queue)


def cmd_bench(a) -> None:
    if a.vs:
        script = Path(__file__).resolve().parent.parent / "benchmarks" / "vs_llamacpp.py"
        if not script.is_file():
            raise LowbitError("--vs llama.cpp runs benchmarks/vs_llamacpp.py from a lowbit source checkout")
        cmd = [sys.executable, str(script), *a.models, "--threads", *map(str, a.threads or [1, 2]),
               "--pp", *map(str, sorted({128, a.prompt_tokens})), "--tg", str(a.gen_tokens), "--runs", str(a.runs)]
        sys.exit(subprocess.run(cmd).returncode)
    for spec in a.models:
        model = api.load(spec)
        s = bench(model, model.lowbit_tokenizer, a.threads[0] if a.threads else None, a.prompt_tokens,
                  a.gen_tokens, a.runs, exact=a.exact)
        if a.json:
            print(json.dumps({"model": spec, **s.to_dict()}))
            continue
        print(f"{spec}: {s.decoder}, {s.threads} threads, median of {s.runs} runs\n"
              f"  prefill (pp{s.prompt_tokens}): {s.prefill_tps:.1f} tok/s\n"
              f"  decode  (tg{s.gen_tokens}): {s.decode_tps:.1f} tok/s = {s.roofline_pct:.0f}% of the roofline "
              f"({s.bytes_per_token / 1e6:.1f} MB/token at {s.bandwidth / 1e9:.1f} GB/s measured)\n"
              f"  peak RSS: {s.peak_rss_mb:.0f} MB")


def cmd_eval(a) -> None:
    r = api.evaluate_model(a.model, kld=a.kld, text=a.text, ctx=a.ctx, stride=a.stride,
                           max_windows=a.max_windows, progress=not a.json)
    if a.json:
        print(json.dumps(r.to_dict()))
        return
    print(f"{'model':<40} {'ppl':>10} {'tokens':>8} {'windows':>8}" + (f" {'kld':>10}" if a.kld else ""))
    if a.kld:
        print(f"{'source':<40} {r.source_ppl:>10.4f} {r.tokens:>8} {r.windows:>8}")
    print(f"{a.model or 'default':<40} {r.ppl:>10.4f} {r.tokens:>8} {r.windows:>8}"
          + (f" {r.kld:>10.5f}" if a.kld else ""))


def cmd_inspect(a) -> None:
    size = model_size(load_any(a.model).model)
    print(f"{'module':<44} {'format':<24} {'shape':>12} {'bytes':>11} {'bpw':>7}")
    for s in size.layers:
        m = s.meta
        fmt = f"{m['kind']} {m['bits']}b " + ("row" if m["group_size"] == -1 else f"g{m['group_size']}") \
            + (" sym" if m.get("sym") else " asym") if m["kind"] == "uniform" else m["kind"]
        print(f"{s.name:<44} {fmt:<24} {'x'.join(map(str, m['shape'])):>12} {s.nbytes:>11,} {s.bpw:>7.3f}")
    print(f"{len(size.layers)} quantized layers, {size.quantized_bpw:.3f} bits/weight; whole model "
          f"{size.total_bytes:,} bytes, {size.model_bpw:.3f} bits/weight")


def cmd_tune(a) -> None:
    if a.reset:
        removed, path = tune.reset(a.threads)
        print(f"removed {path}" if removed else f"nothing cached at {path}")
        return
    print(tune.show(a.threads) if a.show else tune.render(*tune.run(a.threads, quick=a.quick)))


def _sampling_options(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    """Generation options; for `serve` (max_tokens None) they are defaults for requests that omit them."""
    serve = max_tokens is None
    if not serve:
        p.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=max_tokens,
                       help="most new tokens per reply")
        p.add_argument("--stop", action="append", help="stop string (repeat for several)")
    p.add_argument("--temperature", type=float, default=None if serve else 0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None if serve else 0, help="0 = off")
    p.add_argument("--top-p", type=float, default=None if serve else 1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=None if serve else 0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=None if serve else 1.0, help="1 = off")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--max-context", type=int, help="tokens the cache holds (default: the model's)")
    _exact_option(p)


def _exact_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exact", action="store_true", help="native engine on fp32 activations and the output "
                   "head as stored (default: int8 activations and an 8-bit head, as llama.cpp)")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p = argparse.ArgumentParser(prog="lowbit", description=__doc__, parents=[common])
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", parents=[common], help="quantize a model and save it")
    q.add_argument("source", nargs="?", default=None,
                   help="HF model directory, .gguf file, or omitted/'default' for SmolLM2-135M-Instruct")
    q.add_argument("-o", "--output", required=True, help="output directory")
    q.add_argument("--method", default="rtn", choices=sorted(METHODS) + ["auto"],
                   help="auto: try the methods that fit --budget-minutes and keep the best")
    q.add_argument("--budget-minutes", type=float, help="auto: time budget (default 30)")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int,
                   help="32, 64, 128, or -1 for whole rows (default: 128; ganq: -1, one codebook per row)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    q.add_argument("--mse-clip", action="store_true", help="rtn: search the clipping range per group")
    q.add_argument("--act-order", action="store_true", help="gptq: visit columns by decreasing activation")
    q.add_argument("--damp", type=float, help="gptq, ganq: Hessian dampening, fraction of mean diagonal (0.01)")
    q.add_argument("--iters", type=int, help="signround, ganq: optimisation iterations (200, 10)")
    q.add_argument("--outlier-ratio", type=float,
                   help="ganq: fraction of weights kept exactly as sparse outliers (0; the paper's GANQ★: 0.005)")
    q.add_argument("--calib", help="calibration text (.txt or .jsonl); default: built-in corpus")
    q.add_argument("--calib-samples", type=int, default=128, help="calibration windows (calibrated methods)")
    q.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window")
    q.add_argument("--lm-head", action="store_true", help="also quantize the output head")
    q.add_argument("--embeddings", action="store_true", help="also quantize the input embedding")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    q.add_argument("--no-check", action="store_true", help="skip the accuracy check after saving")
    q.add_argument("--check-windows", type=int, default=0,
                   help="512-token windows for the accuracy check (default: all held-out text)")
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", parents=[common], help="generate text (streams)")
    g.add_argument("model", help="quantized directory, source, or 'default'")
    g.add_argument("prompt")
    _sampling_options(g, max_tokens=64)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", parents=[common], help="interactive multi-turn chat (reads turns from stdin)")
    c.add_argument("model", help="quantized directory, source, or 'default'")
    c.add_argument("--system", help="system prompt")
    _sampling_options(c, max_tokens=256)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP server")
    s.add_argument("model", help="quantized directory, source, or 'default'")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", help="model id clients use (default: the directory's name)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get HTTP 503")
    _sampling_options(s, max_tokens=None)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", parents=[common], help="prefill/decode tokens/s, roofline, peak memory")
    b.add_argument("models", nargs="+", metavar="MODEL", help="quantized directory, source, or 'default'")
    b.add_argument("--threads", type=int, nargs="+", help="thread counts (default: all cores; --vs: 1 2)")
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--gen-tokens", type=int, default=128)
    b.add_argument("--runs", type=int, default=3, help="timed runs (the median is reported)")
    b.add_argument("--json", action="store_true", help="one JSON object per model")
    b.add_argument("--vs", choices=["llama.cpp"], help="side-by-side table with llama.cpp and transformers")
    _exact_option(b)
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", parents=[common], help="perplexity and KL divergence")
    e.add_argument("model", help="quantized directory, source, or 'default'")
    e.add_argument("--ppl", action="store_true", help="perplexity (always reported)")
    e.add_argument("--kld", action="store_true", help="KL divergence against the recorded source")
    e.add_argument("--ctx", type=int, default=512)
    e.add_argument("--stride", type=int, help="window stride (default: ctx)")
    e.add_argument("--text", help="evaluation text (.txt or .jsonl); default: built-in held-out split")
    e.add_argument("--max-windows", type=int, help="evaluate at most this many windows")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", parents=[common], help="per-layer formats, sizes and bits per weight")
    i.add_argument("model")
    i.set_defaults(func=cmd_inspect)

    t = sub.add_parser("tune", parents=[common],
                       help="time the CPU kernels' tile and thread choices on this machine, cache the best")
    t.add_argument("--threads", type=int, help="tune for this many threads (default: all cores)")
    t.add_argument("--quick", action="store_true", help="tiny shapes, ~1 s: checks the mechanism, not the machine")
    t.add_argument("--show", action="store_true", help="print what is cached, measure nothing")
    t.add_argument("--reset", action="store_true", help="forget the cached choices (back to the model's)")
    t.set_defaults(func=cmd_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.debug = getattr(args, "debug", False)
    try:
        args.func(args)
    except LowbitError as e:
        if args.debug:
            raise
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unexpected: one line unless --debug
        if args.debug:
            raise
        print(f"lowbit: internal error: {type(e).__name__}: {e} (rerun with --debug for details)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
