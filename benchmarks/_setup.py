"""What the accuracy benchmarks share after `common.start`: the calibration and evaluation options, and
one row's work (quantize a copy of the source by a config, score it on the held-out text).

Every row quantizes a fresh copy of the float source with the same calibration text (`--samples`
windows of `--seq-len` tokens of the `--calib` corpus's calibration split) and scores it with the eval API's
defaults (ctx 512, disjoint windows, all of them unless `--max-windows`), with KL divergence against
the source unless `--no-kld` (the source's states cached by its fingerprint: computed by the first row only).
"""

import copy
import time

import lowbit
from lowbit.eval import evaluate
from lowbit.models import fingerprint


def add_options(ap) -> None:
    """The options every row of an accuracy table uses."""
    ap.add_argument("--calib", help="calibration text: pydoc, prose, mixed or a file (default: lowbit's, mixed where prose is installed)")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--max-windows", type=int, help="evaluation windows (default: all)")
    ap.add_argument("--no-kld", action="store_true", help="perplexity only (halves the evaluation time)")


def quantize_and_score(src, text: str, cfg, a):
    """(quantized model, its EvalResult, seconds the quantization took) for config `cfg` and options `a`."""
    t = time.perf_counter()
    q = lowbit.quantize(copy.deepcopy(src.model), cfg, a.calib, tokenizer=src.tokenizer, calib_samples=a.samples,
                        calib_seq_len=a.seq_len, progress=False)
    took = time.perf_counter() - t
    r = evaluate(q.model, src.tokenizer, text, max_windows=a.max_windows, source=None if a.no_kld else src.model,
                 progress=False, source_key=fingerprint(src.source))
    return q, r, took
