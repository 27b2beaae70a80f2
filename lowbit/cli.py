"""The `lowbit` command: parses arguments, calls the package API, prints. No logic of its own.

The package API (torch, transformers) takes seconds to import, so the parser is built without it
and `api` is imported after parsing: `lowbit --help` answers at once, and arguments that cannot work
(`--max-tokens 0`, a negative temperature, an empty prompt, a port in use) are refused before a model
loads. Only `quantize` needs `api` to build its parser (its options are the config classes' fields).
"""

import argparse
import dataclasses
import json
import math
import os
import socket
import sys
import typing
from pathlib import Path

from .errors import LowbitError

api = None  # the package API, imported by main() once the arguments are parsed


def _import_api() -> None:
    global api
    from . import api as imported
    api = imported


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def _given_options(a, configs: dict | None = None) -> dict:
    return {name: tuple(v) if isinstance(v, list) else v for name in _config_fields(configs)
            if (v := getattr(a, name)) is not None}


def cmd_quantize(a) -> None:
    options = _given_options(a)
    if a.recipe:
        if a.method or a.scheme or options:
            raise LowbitError("--recipe gives every layer its spec: drop --method, --scheme and the method options")
        how = api.read_recipe(a.recipe)
    else:
        budget = any(k.startswith("target_") for k in options)
        how = api.config_for(a.method or ("quantx" if budget else "rtn"), scheme=a.scheme, **options)
    edge = False if a.float_embeddings else api.EDGE  # the head and embedding unless --lm-head/--embeddings
    r = api.quantize_to(a.source, a.output, how, a.calib, lm_head=a.lm_head or edge,
                        embeddings=a.embeddings or edge,
                        calib_samples=a.calib_samples, calib_seq_len=a.calib_seq_len, overwrite=a.overwrite,
                        check_windows=0 if a.no_check else (a.check_windows or None))
    print(f"saved {r.out}  ({r.plan}, {len(r.size.layers)} layers quantized)")
    if r.auto_report:
        print(r.auto_report)
    if r.recipe_report:
        print(f"per-layer report (choice, predicted and measured loss, bpw, tok/s): {r.recipe_report}")
    print(f"size: {r.disk_bytes:,} bytes on disk ({_human(r.disk_bytes)}); "
          f"{r.size.quantized_bpw:.3f} bits/weight in quantized layers, "
          f"{r.size.model_bpw:.3f} over the whole model")
    if r.source_note:
        print(f"note: {r.source_note}")
    if r.check:
        c = r.check
        print(f"perplexity (ctx {c.ctx}, {c.tokens:,} tokens of held-out text): "
              f"source {c.source_ppl:.3f} -> quantized {c.ppl:.3f} ({100 * (c.ppl / c.source_ppl - 1):+.2f}%)")
        print(f"KL divergence vs source: {c.kld:.5f} nats/token")
        g = r.speed
        print(f"speed (reloaded model, {g.decoder}, {g.threads} threads): prefill {g.prefill_tps:.0f} tok/s "
              f"(pp{g.prompt_tokens}), decode {g.decode_tps:.0f} tok/s (tg{g.gen_tokens}); `lowbit bench` for more")
        print(f"sample: {api.SAMPLE_PROMPT}{r.sample}")


def cmd_recipe(a) -> None:
    qx = api.config_for(api.QuantX.name, **_given_options(a, {api.QuantX.name: api.QuantX}))
    edge = False if a.float_embeddings else api.EDGE
    r = api.recipe(a.source, qx, a.output, a.calib, lm_head=edge, embeddings=edge, calib_seq_len=a.calib_seq_len)
    p = r.summary["predicted"]
    counts = {}
    for row in r.rows:
        counts[row["choice"]] = counts.get(row["choice"], 0) + 1
    print(f"wrote {a.output}  ({len(r.rows)} layers: " + ", ".join(f"{c} ×{n}" for c, n in counts.items()) + ")")
    print(f"predicted: {p['bpw']:.3f} bits/weight in the decoder blocks, {p['bytes']:,} bytes "
          f"({_human(p['bytes'])}) in all, loss {p['loss']:.4g}"
          + (f", {p['tokens_per_s']:.0f} tokens/s decode" if "tokens_per_s" in p else ""))
    print(f"apply it: lowbit quantize {a.source or ''} --recipe {a.output} -o OUT".replace("  ", " "))


def _show(text: str) -> None:
    print(text, end="", flush=True)


def _stats(stats) -> str:
    cached = f", {stats.cached_tokens} prompt tokens from cache" if stats.cached_tokens else ""
    return (f"[{stats.new_tokens} tokens; prefill {stats.prefill_tps:.1f} tok/s, "
            f"decode {stats.decode_tps:.1f} tok/s{cached}]")


def _sampling(a):
    return api.SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                              repetition_penalty=a.repetition_penalty, seed=a.seed)


def _check_generation(a) -> None:
    """Refuse generation arguments that cannot work, before the model loads."""
    if getattr(a, "max_tokens", 1) < 1:
        raise LowbitError(f"--max-tokens must be at least 1, got {a.max_tokens}")
    if getattr(a, "prompt", "x") == "":
        raise LowbitError("the prompt is empty: give the text to continue")
    for name in ("threads", "max_context", "parallel"):
        if getattr(a, name, None) is not None and getattr(a, name) < 1:
            raise LowbitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    api.SamplingParams(**{k: v for k in _SERVE_DEFAULTS if (v := getattr(a, k)) is not None}).check()


def _check_port(host: str, port: int) -> None:
    """The server's address must be free: found out now, not after the model has loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.bind(infos[0][4])
    except OSError as e:
        raise LowbitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _session(a) -> dict:
    return {"max_context": a.max_context, "threads": a.threads, "exact": a.exact, "kv_cache": a.kv_cache}


def cmd_generate(a) -> None:
    _check_generation(a)
    q = api.load(a.model)
    print(a.prompt, end="", flush=True)
    _, stats = q.generate(a.prompt, a.max_tokens, on_text=_show, sampling=_sampling(a), stop=a.stop or (),
                          **_session(a))
    print("\n" + _stats(stats), file=sys.stderr)


def cmd_chat(a) -> None:
    _check_generation(a)
    chat = api.load(a.model).chat(a.system, **_session(a))
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


_SERVE_DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def cmd_serve(a) -> None:
    _check_generation(a)
    if a.max_body_mb < 1:
        raise LowbitError(f"--max-body-mb must be at least 1, got {a.max_body_mb}")
    _check_port(a.host, a.port)
    defaults = {k: getattr(a, k) for k in _SERVE_DEFAULTS}
    api.load(a.model).serve(a.name or Path(a.model).name, a.host, a.port, defaults, a.max_queue,
                            max_body_bytes=a.max_body_mb << 20, parallel=a.parallel, prefix_cache=a.prefix_cache,
                            **_session(a))


def cmd_bench(a) -> None:
    for spec in a.models:
        s = api.load(spec).bench(a.threads, a.prompt_tokens, a.gen_tokens, a.runs, exact=a.exact)
        if a.json:
            print(json.dumps({"model": spec, **s.to_dict()}))
            continue
        print(f"{spec}: {s.decoder}, {s.threads} threads, median of {s.runs} runs\n"
              f"  prefill (pp{s.prompt_tokens}): {s.prefill_tps:.1f} tok/s\n"
              f"  decode  (tg{s.gen_tokens}): {s.decode_tps:.1f} tok/s = {s.roofline_pct:.0f}% of the roofline "
              f"({s.bytes_per_token / 1e6:.1f} MB/token at {s.bandwidth / 1e9:.1f} GB/s measured)\n"
              f"  peak RSS: {s.peak_rss_mb:.0f} MB")


def cmd_eval(a) -> None:
    r = api.load(a.model, shell=True).evaluate(a.text, kld=a.kld, ctx=a.ctx, stride=a.stride,
                                               max_windows=a.max_windows, progress=not a.json, exact=a.exact,
                                               scoring=a.scoring)
    if a.json:
        print(json.dumps(r.to_dict()))
        return
    print(f"{'model':<40} {'ppl':>10} {'tokens':>8} {'windows':>8}" + (f" {'kld':>10}" if a.kld else ""))
    if a.kld:
        print(f"{'source':<40} {r.source_ppl:>10.4f} {r.tokens:>8} {r.windows:>8}")
    print(f"{a.model or 'default':<40} {r.ppl:>10.4f} {r.tokens:>8} {r.windows:>8}"
          + (f" {r.kld:>10.5f}" if a.kld else ""))
    print(f"({r.scoring} scoring; the model on {'fp32' if r.exact else 'int8'} activations"
          + (", the source on fp32)" if a.kld else ")"))


def cmd_inspect(a) -> None:
    if a.kernels:
        rows = api.kernel_table()
        print(f"{'kind':<9} {'bits':>4} {'isa':<11} {'activations':<12} {'symbol':<22} {'device':<6} here")
        for r in rows:
            print(f"{r['kind']:<9} {r['bits']:>4} {r['isa']:<11} {r['activations']:<12} {r['symbol']:<22} "
                  f"{r['device']:<6} {'yes' if r['available'] else 'no'}")
        if a.model is None:
            return
    if a.model is None:
        raise LowbitError("inspect needs a MODEL (or --kernels for the kernel table)")
    size = api.load(a.model).size()
    print(f"{'module':<44} {'format':<24} {'shape':>12} {'bytes':>11} {'bpw':>7}  kernel")
    for s in size.layers:  # a layer that shares its twin's tensors (a tied head) costs no bytes of its own
        cost = f"{s.nbytes:>11,} {s.bpw:>7.3f}" if s.shares is None else f"{'(' + s.shares.split('.')[-1] + ')':>11} {'-':>7}"
        print(f"{s.name:<44} {s.format:<24} {'x'.join(map(str, s.meta['shape'])):>12} {cost}  {s.kernel}")
    for f in size.floats:
        print(f"{f.name:<44} {f.dtype:<24} {'x'.join(map(str, f.shape)):>12} {f.nbytes:>11,} "
              f"{8 * f.nbytes / max(1, math.prod(f.shape)):>7.3f}  float")
    print(f"{len(size.layers)} quantized layers, {size.quantized_bpw:.3f} bits/weight; {len(size.floats)} float "
          f"tensors, {sum(f.nbytes for f in size.floats):,} bytes; whole model "
          f"{size.total_bytes:,} bytes, {size.model_bpw:.3f} bits/weight")


def cmd_export(a) -> None:
    out = api.export(a.model, a.output, to=a.to, overwrite=a.overwrite, report=a.report)
    if a.report:
        print(api.gguf_report_path(out).read_text(), end="")
    print(f"exported {out} ({a.to})" + (f", report {api.gguf_report_path(out)}" if a.report else ""))


def cmd_tune(a) -> None:
    print(api.tune(a.threads, quick=a.quick, show=a.show, reset=a.reset))


def _config_fields(configs: dict | None = None) -> dict[str, dict]:
    """Every field of the method and recipe configs (api.CONFIGS, or `configs`): name -> its type,
    metadata, the default of each config that has it, and each one's help."""
    out = {}
    for method, cls in (configs or api.CONFIGS).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            entry = out.setdefault(f.name, {"type": hints[f.name], "metadata": f.metadata, "defaults": {}, "helps": {}})
            entry["defaults"][method] = f.default
            entry["helps"][method] = f.metadata.get("help", "")
    return out


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _config_options(p: argparse.ArgumentParser, configs: dict | None = None) -> None:
    """One option per config field, typed and described by the field; an option left out (None) keeps
    the chosen method's default."""
    configs = configs or api.CONFIGS
    for name, f in _config_fields(configs).items():
        flag, kind, defaults = "--" + name.replace("_", "-"), f["type"], f["defaults"]
        usual = max(defaults.values(), key=list(defaults.values()).count)
        default = ", ".join([_shown(usual)] + [f"{m}: {_shown(d)}" for m, d in defaults.items() if d != usual])
        owners = "" if len(defaults) == len(configs) else ", ".join(defaults) + ": "
        helps = f["helps"]
        help = f"{owners}{f['metadata'].get('help', '')}" if len(set(helps.values())) == 1 else \
            "; ".join(f"{m}: {h}" for m, h in helps.items())
        if kind is bool:
            off = "--" + f["metadata"].get("off", "no-" + name.replace("_", "-"))
            flags = p.add_mutually_exclusive_group()
            flags.add_argument(flag, dest=name, action="store_const", const=True,
                               help=f"{help} (default: on; {off} turns it off)" if usual else f"{help} (default: off)")
            flags.add_argument(off, dest=name, action="store_const", const=False, help=argparse.SUPPRESS)
        elif typing.get_origin(kind) is tuple:
            p.add_argument(flag, dest=name, nargs="+", type=typing.get_args(kind)[0], help=f"{help} (default: {default})")
        else:
            types = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
            p.add_argument(flag, dest=name, type=types[0], help=f"{help} (default: {default})")


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
    p.add_argument("--kv-cache", default="fp16", choices=["fp16", "bf16", "fp32", "int8"],
                   help="the native engine's KV cache (int8: a scale per token and head, half of fp16's memory)")
    _exact_option(p)


def _exact_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exact", action="store_true", help="native engine on fp32 activations and the output "
                   "head as stored (default: int8 activations and an 8-bit head, as llama.cpp)")


DESCRIPTION = """Quantize Hugging Face causal language models to 2-8 bits, run them on this machine's CPU
(generate, chat, an OpenAI-compatible server), and measure them (eval, bench, inspect).
Start with `lowbit quantize -o OUT` (the embedded SmolLM2-135M-Instruct), then `lowbit generate OUT "..."`."""


def _parser() -> argparse.ArgumentParser:
    """The whole parser; `quantize`'s method options only once `api` is imported (main does that for
    `lowbit quantize ...`), so every other command parses without importing torch."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p = argparse.ArgumentParser(prog="lowbit", description=DESCRIPTION, parents=[common])
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", parents=[common], help="quantize a model and save it")
    q.add_argument("source", nargs="?", default=None,
                   help="HF model directory, .gguf file, or omitted/'default' for SmolLM2-135M-Instruct")
    q.add_argument("-o", "--output", required=True, help="output directory")
    if api is not None:
        q.add_argument("--method", choices=sorted(api.CONFIGS),
                       help="default: rtn, or quantx when a --target-* budget is given; auto: try the methods "
                       "that fit --budget-minutes and keep the best; quantx: a per-layer recipe under a budget")
        _config_options(q)
    q.add_argument("--scheme", help="format as a scheme string: W4A16-g128, W3A16-g64-asym, W2-row "
                   "(instead of --bits, --group-size, --sym/--asym)")
    q.add_argument("--calib", help="calibration text: a built-in corpus (pydoc; prose; mixed: the default where "
                   "prose is installed) or a .txt/.jsonl file")
    q.add_argument("--calib-samples", type=int, default=128, help="calibration windows (calibrated methods)")
    q.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window")
    q.add_argument("--lm-head", action="store_true", help="quantize the output head in the layers' format "
                   "(default: 8-bit RTN, group 32, as llama.cpp's Q8_0)")
    q.add_argument("--embeddings", action="store_true", help="quantize the input embedding in the layers' "
                   "format (default: 8-bit RTN, group 32)")
    q.add_argument("--float-embeddings", action="store_true",
                   help="keep the output head and the input embedding in float (larger file)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    q.add_argument("--no-check", action="store_true", help="skip the accuracy check after saving")
    q.add_argument("--check-windows", type=int, default=0,
                   help="512-token windows for the accuracy check (default: all held-out text)")
    q.add_argument("--recipe", help="a recipe file (YAML, from `lowbit recipe`): every layer's spec")
    q.set_defaults(func=cmd_quantize)

    r = sub.add_parser("recipe", parents=[common], help="per-layer formats under a budget (QuantX), as an "
                       "editable YAML recipe for `lowbit quantize --recipe`")
    r.add_argument("source", nargs="?", default=None,
                   help="HF model directory, .gguf file, or omitted/'default' for SmolLM2-135M-Instruct")
    r.add_argument("-o", "--output", required=True, help="the recipe file to write (YAML)")
    if api is not None:
        _config_options(r, {api.QuantX.name: api.QuantX})
    r.add_argument("--calib", help="calibration text for the sensitivity pass: a built-in corpus (pydoc; prose; "
                   "mixed: the default where prose is installed) or a .txt/.jsonl file")
    r.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window")
    r.add_argument("--float-embeddings", action="store_true",
                   help="keep the output head and the input embedding in float (default: 8-bit RTN g32)")
    r.set_defaults(func=cmd_recipe)

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
    s.add_argument("--max-body-mb", type=int, default=2, help="request bodies past this many MiB get HTTP 413")
    s.add_argument("--parallel", type=int, help="sequences decoded together, each in its own KV slot "
                   "(default: what memory allows for the context, at most 16; printed at start)")
    s.add_argument("--prefix-cache", type=int, help="further KV slots parking finished prompts' prefixes "
                   "for reuse (default: as many as --parallel; 0: off)")
    _sampling_options(s, max_tokens=None)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", parents=[common], help="prefill/decode tokens/s, roofline, peak memory")
    b.add_argument("models", nargs="+", metavar="MODEL", help="quantized directory, source, or 'default'")
    b.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--gen-tokens", type=int, default=128)
    b.add_argument("--runs", type=int, default=3, help="timed runs (the median is reported)")
    b.add_argument("--json", action="store_true", help="one JSON object per model")
    _exact_option(b)
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", parents=[common], help="perplexity and KL divergence")
    e.add_argument("model", help="quantized directory, source, or 'default'")
    e.add_argument("--ppl", action="store_true", help="perplexity (always reported)")
    e.add_argument("--kld", action="store_true", help="KL divergence against the recorded source")
    e.add_argument("--ctx", type=int, default=512)
    e.add_argument("--stride", type=int, help="window stride (default: ctx)")
    e.add_argument("--text", help="evaluation text: a built-in corpus' held-out split (pydoc: the default, "
                   "Python's documentation; prose: The Devil's Dictionary; mixed: both) or a .txt/.jsonl file")
    e.add_argument("--max-windows", type=int, help="evaluate at most this many windows")
    e.add_argument("--exact", action="store_true", help="score the model on fp32 activations (default: int8 "
                   "activations, as generate/serve/bench run it; the source is always exact)")
    e.add_argument("--scoring", default="lowbit", help="lowbit (default: every token scored once) or llama.cpp "
                   "(llama-perplexity's: disjoint windows, each one's second half scored, BOS first)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", parents=[common], help="per-layer formats, sizes, bits per weight and kernels")
    i.add_argument("model", nargs="?", help="quantized directory or source")
    i.add_argument("--kernels", action="store_true", help="print the kernel table: what runs natively here")
    i.set_defaults(func=cmd_inspect)

    x = sub.add_parser("export", parents=[common], help="write a quantized model in another tool's format")
    x.add_argument("model", help="quantized directory")
    x.add_argument("--to", default="gguf", choices=["gguf", "compressed-tensors", "gptq"], help="gguf: one file "
                   "llama.cpp runs (4-bit g32 sym -> Q4_0, 8-bit g32 sym -> Q8_0, 4-bit g32 asym -> Q4_1); "
                   "compressed-tensors: a pack-quantized directory (vLLM, transformers); gptq: a GPTQ "
                   "checkpoint (one bits/group over the layers)")
    x.add_argument("-o", "--output", required=True, help="output file (gguf) or directory")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    x.add_argument("--report", action="store_true", help="gguf: print each quantized layer's GGUF type and "
                   "conversion error (exact, or the refit's relative squared error), also written to OUTPUT.report.md")
    x.set_defaults(func=cmd_export)

    t = sub.add_parser("tune", parents=[common],
                       help="time the CPU kernels' tile and thread choices on this machine, cache the best")
    t.add_argument("--threads", type=int, help="tune for this many threads (default: all cores)")
    t.add_argument("--quick", action="store_true", help="tiny shapes, ~1 s: checks the mechanism, not the machine")
    t.add_argument("--show", action="store_true", help="print what is cached, measure nothing")
    t.add_argument("--reset", action="store_true", help="forget the cached choices (back to the model's)")
    t.set_defaults(func=cmd_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if next((w for w in argv if not w.startswith("-")), None) in ("quantize", "recipe"):
        _import_api()  # their options come from the config classes
    args = _parser().parse_args(argv)
    args.debug = getattr(args, "debug", False)
    try:
        _import_api()
        args.func(args)
    except LowbitError as e:
        if args.debug:
            raise
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`lowbit inspect MODEL | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush stays quiet
        return 0
    except Exception as e:  # anything unexpected: one line unless --debug
        if args.debug:
            raise
        print(f"lowbit: internal error: {type(e).__name__}: {e} (rerun with --debug for details)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
