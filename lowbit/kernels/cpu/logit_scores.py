"""Per-row scores of logits, what perplexity and KL divergence are made of (eval/metrics.py).

For rows of the model's logits zm [rows, vocab] (and the source's, zs) and each row's target token:
the model's log-loss −log softmax(zm)[t], the source's −log softmax(zs)[t], and KL(softmax(zs) ‖
softmax(zm)) = Σ_v p_v (log p_v − log q_v). `reference` is the plain torch computation (the oracle,
and what runs without a C compiler); `row_scores` the same in logit_scores.c, which reads each row
once and writes nothing of vocabulary size: at 511 × 49152 logits a window, torch's two log-softmaxes
and the KL are ~300 MB of fresh tensors (their page faults cost as much as their arithmetic), and
three times the work. Rows run on the kernels' pool.

`records` turns the source's logits into what a warm evaluation needs of them instead (what
eval/source_cache.py keeps on disk): per row uint16 codes of the log-probabilities over the 32 nats
below the row's maximum (llama-perplexity's --kl-divergence-base scheme, without its 16-nat cut) and
four exact doubles [lo, step, the target's log-loss, Σ p log p]; `row_scores(zm, None, target,
record)` scores against such a record: the source's log-loss and entropy exact, the KL's cross term
Σ p log q from the dequantized p renormalized (logit_scores.c bounds its error; ~1e-6 on a mean).
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


RANGE, TOP = 32.0, 65534  # as logit_scores.c: nats a record codes below a row's maximum; the top code − 1
Record = tuple[torch.Tensor, torch.Tensor]  # codes uint16 [rows, vocab], meta float64 [rows, 4]


def reference_records(zs: torch.Tensor, target: torch.Tensor) -> Record:
    """What lb_logprob_records computes, in torch (codes may differ by one where a logit falls on a
    rounding boundary; the scalars by float rounding)."""
    z = zs.float()
    top, low = z.max(1, keepdim=True).values, z.min(1, keepdim=True).values
    floor = torch.maximum(low, top - RANGE)
    step = (top - floor) / TOP
    k = torch.where(step > 0, (z - floor) / torch.where(step > 0, step, 1) + 1.5, torch.ones_like(z))
    codes = torch.where(z >= floor, k.clamp(max=TOP + 1).floor(), 0).to(torch.uint16)
    lp = F.log_softmax(z.double(), dim=-1)
    ls = torch.logsumexp(z.double() - top.double(), -1)
    meta = torch.stack([(floor - top)[:, 0].double() - ls, step[:, 0].double(), -lp.gather(1, target[:, None])[:, 0],
                        (lp.exp() * lp).sum(-1)], 1)
    return codes, meta


def _cross(lq: torch.Tensor, record: Record) -> torch.Tensor:
    """Σ p̃ log q over a record's dequantized, renormalized p̃ (float64 [rows])."""
    codes, meta = record
    k = codes.to(torch.float64)
    p = torch.where(k > 0, torch.exp(meta[:, :1] + (k - 1) * meta[:, 1:2]), 0)
    return (p * lq.double()).sum(-1) / p.sum(-1)


def reference(zm: torch.Tensor, zs: torch.Tensor | None, target: torch.Tensor,
              record: Record | None = None) -> torch.Tensor:
    """float64 [rows, 3]: model log-loss, source log-loss, KL(source ‖ model) (the last two 0 without zs
    or a record of the source)."""
    out = torch.zeros(len(target), 3, dtype=torch.float64)
    lq = F.log_softmax(zm.float(), dim=-1)
    out[:, 0] = -lq.gather(1, target[:, None])[:, 0].double()
    if record is not None:
        out[:, 1], out[:, 2] = record[1][:, 2], record[1][:, 3] - _cross(lq, record)
    elif zs is not None:
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
    lib.lb_logit_scores.argtypes, lib.lb_logit_scores.restype = [p, long, p, long, p, p, p, i, i, p, p, i], None
    lib.lb_logprob_records.argtypes, lib.lb_logprob_records.restype = [p, long, p, i, i, p, p, p, i], None
    threads.apply(klib)
    return lib, ctypes.cast(klib.lb_parallel, ctypes.c_void_p).value


def _rows(t: torch.Tensor | None, rows: int, vocab: int) -> torch.Tensor | None:
    """`t` as the C reads it: float32 [rows, vocab], unit stride along the vocabulary."""
    if t is None:
        return None
    if t.shape != (rows, vocab):
        raise ValueError(f"logits of shape {tuple(t.shape)}, expected {(rows, vocab)}")
    return t if t.dtype == torch.float32 and t.stride(-1) == 1 else t.float().contiguous()


def _targets(target: torch.Tensor, vocab: int) -> torch.Tensor:
    target = target.to(torch.int64).contiguous()
    if len(target) and not 0 <= int(target.min()) <= int(target.max()) < vocab:
        raise ValueError(f"target ids must lie in 0..{vocab - 1}")
    return target


def row_scores(zm: torch.Tensor, zs: torch.Tensor | None, target: torch.Tensor,
               record: Record | None = None) -> torch.Tensor:
    """What `reference` computes, natively where a kernel library builds (else `reference` itself)."""
    native = _library(isa_mod.selected())
    if native is None:
        return reference(zm, zs, target, record)
    lib, par = native
    rows, vocab = zm.shape
    zm, zs = _rows(zm, rows, vocab), _rows(zs, rows, vocab)
    target = _targets(target, vocab)
    codes, meta = record if record is not None else (None, None)
    if record is not None and (codes.shape != (rows, vocab) or meta.shape != (rows, 4) or codes.dtype != torch.uint16
                               or meta.dtype != torch.float64 or not codes.is_contiguous() or not meta.is_contiguous()):
        raise ValueError(f"a record must be uint16 codes {(rows, vocab)} and float64 meta {(rows, 4)}, contiguous")
    out = torch.empty(rows, 3, dtype=torch.float64)
    lib.lb_logit_scores(zm.data_ptr(), zm.stride(0), None if zs is None else zs.data_ptr(),
                        0 if zs is None else zs.stride(0), None if codes is None else codes.data_ptr(),
                        None if meta is None else meta.data_ptr(), target.data_ptr(), rows, vocab, out.data_ptr(),
                        par, threads.get())
    if zs is None and record is None:
        out[:, 1:] = 0
    return out


def records(zs: torch.Tensor, target: torch.Tensor, out: Record | None = None) -> Record:
    """The source's record of its logits zs [rows, vocab] (into `out`'s buffers when given: codes
    uint16 [rows, vocab] and meta float64 [rows, 4], contiguous), natively where a kernel library
    builds (else reference_records)."""
    rows, vocab = zs.shape
    native = _library(isa_mod.selected())
    if native is None:
        made = reference_records(zs, target)
        if out is not None:
            out[0].copy_(made[0]), out[1].copy_(made[1])
        return made if out is None else out
    lib, par = native
    zs, target = _rows(zs, rows, vocab), _targets(target, vocab)
    codes, meta = out if out is not None else (torch.empty(rows, vocab, dtype=torch.uint16),
                                               torch.empty(rows, 4, dtype=torch.float64))
    lib.lb_logprob_records(zs.data_ptr(), zs.stride(0), target.data_ptr(), rows, vocab, codes.data_ptr(),
                           meta.data_ptr(), par, threads.get())
    return codes, meta
