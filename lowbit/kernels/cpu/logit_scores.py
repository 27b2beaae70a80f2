"""Per-row scores of logits, what perplexity and KL divergence are made of (eval/metrics.py).

For rows of the model's logits zm [rows, vocab] (and the source's, zs) and each row's target token:
the model's log-loss −log softmax(zm)[t], the source's −log softmax(zs)[t], and KL(softmax(zs) ‖
softmax(zm)) = Σ_v p_v (log p_v − log q_v). `reference` is the plain torch computation (the oracle,
and what runs without a C compiler); `row_scores` the same in logit_scores.c, which reads each row
once and writes nothing of vocabulary size: at 511 × 49152 logits a window, torch's two log-softmaxes
and the KL are ~300 MB of fresh tensors (their page faults cost as much as their arithmetic), and
three times the work. Rows run on the kernels' pool.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import build, codegen, isa as isa_mod, threads

SOURCE = Path(__file__).with_name("logit_scores.c")


def reference(zm: torch.Tensor, zs: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    """float64 [rows, 3]: model log-loss, source log-loss, KL(source ‖ model) (the last two 0 without zs)."""
    out = torch.zeros(len(target), 3, dtype=torch.float64)
    lq = F.log_softmax(zm.float(), dim=-1)
    out[:, 0] = -lq.gather(1, target[:, None])[:, 0].double()
    if zs is not None:
        lp = F.log_softmax(zs.float(), dim=-1)
        out[:, 1] = -lp.gather(1, target[:, None])[:, 0].double()
        out[:, 2] = (lp.exp() * (lp - lq)).sum(-1).double()
    return out


@functools.lru_cache(maxsize=None)
def _library(isa: str) -> tuple[ctypes.CDLL, int] | None:
    """(the compiled logit_scores.c, the kernel library's lb_parallel), or None (after one warning)."""
    klib = build.load(isa)
    if klib is None:
        return None
    try:
        lib = ctypes.CDLL(str(build.compile_source(SOURCE, codegen.FLAGS[isa], f"lowbit-scores-{isa}")))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"lowbit: the native logit scores are unavailable ({e}); scoring in torch",
                      RuntimeWarning, stacklevel=2)
        return None
    p, i, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.lb_logit_scores.argtypes, lib.lb_logit_scores.restype = [p, long, p, long, p, i, i, p, p, i], None
    threads.apply(klib)
    return lib, ctypes.cast(klib.lb_parallel, ctypes.c_void_p).value


def _rows(t: torch.Tensor | None, rows: int, vocab: int) -> torch.Tensor | None:
    """`t` as the C reads it: float32 [rows, vocab], unit stride along the vocabulary."""
    if t is None:
        return None
    if t.shape != (rows, vocab):
        raise ValueError(f"logits of shape {tuple(t.shape)}, expected {(rows, vocab)}")
    return t if t.dtype == torch.float32 and t.stride(-1) == 1 else t.float().contiguous()


def row_scores(zm: torch.Tensor, zs: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    """What `reference` computes, natively where a kernel library builds (else `reference` itself)."""
    native = _library(isa_mod.selected())
    if native is None:
        return reference(zm, zs, target)
    lib, par = native
    rows, vocab = zm.shape
    zm, zs = _rows(zm, rows, vocab), _rows(zs, rows, vocab)
    target = target.to(torch.int64).contiguous()
    if rows and not 0 <= int(target.min()) <= int(target.max()) < vocab:
        raise ValueError(f"target ids must lie in 0..{vocab - 1}")
    out = torch.empty(rows, 3, dtype=torch.float64)
    lib.lb_logit_scores(zm.data_ptr(), zm.stride(0), None if zs is None else zs.data_ptr(),
                        0 if zs is None else zs.stride(0), target.data_ptr(), rows, vocab, out.data_ptr(),
                        par, threads.get())
    if zs is None:
        out[:, 1:] = 0
    return out
