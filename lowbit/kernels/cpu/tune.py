"""`lowbit tune`: time the performance model's guesses on this machine and cache the winners.

perf_model.plan turns three constants (perf_model.Constants: the weight bytes that pay for waking a
GEMV thread, the shares of L1 and L2 a GEMM tile may fill) into thread counts and tiles. Here each is
tried at a few multiples of its default on layers shaped like SmolLM2-135M's (576 wide) and a 7B's
(4096 wide), 4-bit g32 codes, one token for the GEMV (on int8 activations, the decode engine's default,
and on fp32 ones, the universal path's: one winner has to serve both) and 32 or 128 for the GEMM, each
call going straight to the generated kernel with prefilled Args (as the decode engine calls it). Candidates
that give the same plan on a shape share one measurement, and the measurements take turns (ROUNDS
batches each, the fastest counts) so the machine's other load falls on all alike; one thread is
timed by its own CPU time (see _clock). A candidate's score is the geometric mean over the shapes
of its time over the best time on that shape; the defaults stay unless a candidate scores MARGIN
better, so timing noise alone does not move the plan. The winners go to perf_model.tune_path (per
ISA, cache sizes and threads), where `plan` finds them. Under a minute of measuring on 2 cores.
"""

from __future__ import annotations

import ctypes
import json
import math
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...errors import LowbitError
from ...formats import UniformQ
from ...formats.packing import BLOCK, packed_words
from ...atomic_file import atomic_write_text
from . import isa as isa_mod
from . import perf_model
from . import threads as threads_mod
from .uniform import PackedUniform, prepare

BITS, GROUP = 4, 32
# (N, K): SmolLM2-135M's k/v, q/o, gate/up and down projections, and a 7B's attention projection
GEMV_SHAPES = ((192, 576), (576, 576), (1536, 576), (576, 1536), (4096, 4096))
GEMM_SHAPES = ((576, 576, 32), (1536, 576, 128), (576, 1536, 128), (4096, 4096, 32), (4096, 4096, 128))
QUICK_GEMV, QUICK_GEMM = ((192, 576), (576, 576)), ((96, 1024, 8),)
GEMV_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # candidates: these multiples of each default
GEMM_FACTORS = (0.25, 0.5, 1.0, 2.0)  # of the L1 and the L2 share (L2: up to all of it)
SECONDS, QUICK_SECONDS = 0.25, 0.002  # time spent measuring one plan on one shape
ROUNDS = 5  # batches per plan, taken in turns; the fastest counts
MARGIN = 0.03


def _clock(threads: int):
    """With one thread, the calling thread's CPU time: what other processes on the core take is not
    counted (on a loaded 2-core VM wall time read up to 3x slow, differently from run to run). With
    more, wall time: waking threads is worth it only if the answer comes sooner, and the workers'
    time is not on the caller's clock."""
    return time.thread_time if threads == 1 else time.perf_counter


def _timer(call, budget: float, clock):
    """A function timing one batch of `call`s (~budget / ROUNDS seconds), returning seconds per call."""
    t = clock()
    call()  # warms up (pages touched, pool awake) and sizes the batch
    reps = max(1, int(budget / ROUNDS / max(clock() - t, 1e-7)))

    def batch() -> float:
        t = clock()
        for _ in range(reps):
            call()
        return (clock() - t) / reps
    return batch


def _layer(n: int, k: int, isa: str) -> PackedUniform:
    """A packed 4-bit g32 layer of random codes (the kernels' speed does not depend on the values)."""
    g = torch.Generator().manual_seed(n * k)
    qweight = torch.randint(-2**31, 2**31, (n, packed_words(k, BITS)), dtype=torch.int32, generator=g)
    scales = (torch.rand(n, -(-k // GROUP), generator=g) * 0.01).half()
    packed = prepare(UniformQ(qweight, scales, None, BITS, GROUP, (n, k)), isa)
    if packed is None:
        raise LowbitError("the generated CPU kernels cannot be built here (no C compiler?): nothing to tune")
    return packed


def _plan_timer(packed: PackedUniform, m: int, int8: bool, p: perf_model.Plan, budget: float, clock):
    """A batch timer (see _timer) of the kernel for m tokens (a GEMV on int8 or fp32 activations)
    under plan `p`, its Args prefilled."""
    fn, args = packed._call(m, None, int8)
    x, y = torch.randn(m, packed.nblocks * BLOCK), torch.empty(m, packed.n)
    args.x, args.y, args.threads, args.nb, args.kc = x.data_ptr(), y.data_ptr(), p.threads, p.nb, p.kc
    ref = ctypes.byref(args)
    return _timer(lambda: (x, y, fn(ref)), budget, clock)  # x, y live as long as the timer


def _candidates() -> tuple[list[tuple[str, perf_model.Constants]], list[tuple[str, perf_model.Constants]]]:
    """(GEMV, GEMM) candidates as (label, constants)."""
    d = perf_model.Constants()
    gemv = [replace(d, min_bytes_per_thread=int(d.min_bytes_per_thread * f)) for f in GEMV_FACTORS]
    gemm = [replace(d, l1_share=d.l1_share * f1, l2_share=d.l2_share * f2)
            for f1 in GEMM_FACTORS for f2 in GEMM_FACTORS]
    return ([(f"{c.min_bytes_per_thread // 1024} KiB", c) for c in gemv],
            [(f"L1 {c.l1_share:g} L2 {c.l2_share:g}", c) for c in gemm])


def _table(title: str, cands, shapes, plans: dict, seconds: dict) -> dict:
    """One table of results: per candidate its plans, times and score; the winner (see MARGIN)."""
    rows = []
    for label, c in cands:
        ps = [plans[s, label] for s, *_ in shapes]
        rows.append({"candidate": label, "constants": asdict(c),
                     "seconds": [seconds[s, p] for (s, *_), p in zip(shapes, ps)],
                     "plans": [f"{p.threads}t" if m == 1 else f"{p.nb}x{p.kc}" for (_, _, m, *_), p in zip(shapes, ps)]})
    best = [min(r["seconds"][j] for r in rows) for j in range(len(shapes))]
    for r in rows:
        r["score"] = math.exp(sum(math.log(sec / b) for sec, b in zip(r["seconds"], best)) / len(shapes))
    default = next(r for r in rows if r["constants"] == asdict(perf_model.Constants()))
    win = min(rows, key=lambda r: r["score"])
    if win["score"] > default["score"] * (1 - MARGIN):
        win = default
    return {"title": title, "shapes": [s for s, *_ in shapes], "rows": rows, "winner": win["candidate"],
            "constants": win["constants"]}


def run(threads: int | None = None, quick: bool = False, progress: bool = True) -> tuple[dict, Path]:
    """Measure the candidates for `threads` (default: the kernels' thread count), cache the winners;
    returns (what was cached, where)."""
    cpu, isa = isa_mod.detect(), isa_mod.selected()
    before = threads_mod.get()
    t = before if threads is None else threads
    if t < 1:
        raise LowbitError(f"--threads {t}: give 1 or more")
    gemv_shapes, gemm_shapes = (QUICK_GEMV, QUICK_GEMM) if quick else (GEMV_SHAPES, GEMM_SHAPES)
    threads_mod.set_threads(t)
    try:
        layers = {nk: _layer(*nk, isa) for nk in {*gemv_shapes, *(nkm[:2] for nkm in gemm_shapes)}}
        gemv, gemm = _candidates()
        specs = [("GEMV, 1 token: weight bytes per woken thread -> threads", gemv,
                  [(f"{n}x{k} {'int8' if int8 else 'fp32'}", layers[n, k], 1, int8) for n, k in gemv_shapes
                   for int8 in (True, False)],
                  ("min_bytes_per_thread",)),
                 ("GEMM: shares of L1 / L2 -> tile NB x KC", gemm,
                  [(f"{n}x{k} m{m}", layers[n, k], m, False) for n, k, m in gemm_shapes], ("l1_share", "l2_share"))]
        plans, todo = {}, {}  # (shape, candidate) -> plan; (shape, plan) -> what to measure it on
        for _, cands, shapes, _ in specs:
            for s, packed, m, int8 in shapes:
                for label, c in cands:
                    plans[s, label] = p = perf_model.plan(cpu, isa, packed.n, packed.nblocks * BLOCK, packed.bytes,
                                                          m, t, c)
                    todo[s, p] = packed, m, int8
        budget = QUICK_SECONDS if quick else SECONDS
        with tqdm(total=len(todo) * (ROUNDS + 1), desc="lowbit tune", unit="batch", disable=not progress) as bar:
            timers = {}
            for key, (packed, m, int8) in todo.items():
                timers[key] = _plan_timer(packed, m, int8, key[1], budget, _clock(t))
                bar.update()
            seconds = dict.fromkeys(todo, math.inf)
            for _ in range(ROUNDS):  # round-robin: the machine's other load falls on every plan alike
                for key, batch in timers.items():
                    seconds[key] = min(seconds[key], batch())
                    bar.update()
    finally:
        threads_mod.set_threads(before)
    tables = [_table(title, cands, shapes, plans, seconds) for title, cands, shapes, _ in specs]
    data = {"version": perf_model.TUNE_VERSION, "key": perf_model.tune_key(cpu, isa, t), "isa": isa,
            "l1d": cpu.l1d, "l2": cpu.l2, "threads": t, "quick": quick,
            "clock": "thread CPU time" if t == 1 else "wall time",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "winners": {f: table["constants"][f] for table, (*_, fields) in zip(tables, specs) for f in fields},
            "tables": tables}
    path = perf_model.tune_path(cpu, isa, t)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return data, path


def _path(threads: int | None) -> Path:
    return perf_model.tune_path(isa_mod.detect(), isa_mod.selected(), threads_mod.get() if threads is None else threads)


def show(threads: int | None = None) -> str:
    """What `lowbit tune` cached for this machine and thread count, as `render` prints it."""
    path = _path(threads)
    if not path.is_file():
        return f"nothing cached at {path} (run `lowbit tune`)"
    try:
        data = json.loads(path.read_text())
        perf_model.parse_tuned(data, path.stem)
        return render(data, path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LowbitError(f"cannot use {path} ({e}); `lowbit tune` rewrites it, `--reset` removes it") from None


def reset(threads: int | None = None) -> tuple[bool, Path]:
    """Forget this machine's winners for `threads`: (whether a file was removed, its path)."""
    path = _path(threads)
    try:
        path.unlink()
        return True, path
    except FileNotFoundError:
        return False, path


def _time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def render(data: dict, path: Path) -> str:
    """The cached data as text: per table, each candidate's plan and time per shape, its score, the winner."""
    out = [(f"lowbit tune: {data['isa']}, L1d {data['l1d'] // 1024} KiB, L2 {data['l2'] // 1024} KiB, "
            f"{data['threads']} threads, "
            f"{BITS}-bit g{GROUP}{' (quick)' if data['quick'] else ''}, {data['clock']}, {data['created']}")]
    for table in data["tables"]:
        head = ["candidate", *table["shapes"], "score"]
        default = asdict(perf_model.Constants())
        body = [[r["candidate"] + (" (default)" if r["constants"] == default else ""),
                 *(f"{p} {_time(s)}" for p, s in zip(r["plans"], r["seconds"])), f"{r['score']:.3f}"]
                for r in table["rows"]]
        widths = [max(len(row[j]) for row in [head, *body]) for j in range(len(head))]
        out += ["", table["title"], *("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in
                                                enumerate(zip(row, widths))) for row in [head, *body]),
                f"winner: {table['winner']}"]
    out += ["", (f"cached in {path}: perf_model.plan uses {data['winners']} from the next load "
                 "(`lowbit tune --reset` forgets them)")]
    return "\n".join(out)
