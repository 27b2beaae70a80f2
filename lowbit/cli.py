"""The `lowbit` command: parses arguments, calls the package API, prints. No logic of its own."""

import argparse
import json
import sys

from . import api
from .errors import LowbitError
from .eval import model_size
from .methods import METHODS, config_for
from .models import load_any


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def cmd_quantize(a) -> None:
    extra = {k: v for k, v in (("mse_clip", a.mse_clip), ("act_order", a.act_order), ("damp", a.damp),
                               ("budget_minutes", a.budget_minutes)) if v is not None and v is not False}
    config = config_for(a.method, bits=a.bits, group_size=a.group_size, sym=a.sym, **extra)
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


def cmd_generate(a) -> None:
    model = api.load(a.model)

    def show(text):
        print(text, end="", flush=True)
    print(a.prompt, end="", flush=True)
    _, stats = api.generate(model, model.lowbit_tokenizer, a.prompt, a.max_new_tokens, a.temperature,
                            a.seed, on_text=show)
    print(f"\n[{stats.new_tokens} tokens; prefill {stats.prefill_tps:.1f} tok/s, "
          f"decode {stats.decode_tps:.1f} tok/s]", file=sys.stderr)


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
    q.add_argument("--group-size", type=int, default=128, help="32, 64, 128, or -1 for whole rows")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    q.add_argument("--mse-clip", action="store_true", help="rtn: search the clipping range per group")
    q.add_argument("--act-order", action="store_true", help="gptq: visit columns by decreasing activation")
    q.add_argument("--damp", type=float, help="gptq: Hessian dampening, fraction of mean diagonal (0.01)")
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
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int)
    g.set_defaults(func=cmd_generate)

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
