"""Independent jobs on several streams: threads that each own their state (a native engine, its
buffers) and run on one core of the kernels, none waiting for another.

Why: an evaluation's windows are independent, and on one engine with a pool of T threads each of
the ~15 ops × layers of a window's prefill, the head's chunks and the scores splits its rows over
the T threads and waits for the slowest at its end, while the Python between them (slicing, copies,
mapping the cached records) runs on one core with the others idle. On the 2-core development VM a
warm SmolLM2 evaluation used ~31 CPU-s for the ~24 CPU-s of its one-thread work (quiet machine,
BENCHMARKS.md, issue 16 item 7). T streams, each a whole engine on one thread, run that one-thread
work side by side: no barrier between them, and each one's serial Python overlaps the others' C
(ctypes and torch release the GIL). The price is a copy of the engine per stream (its packed
weights, KV cache and logits buffer) and its build time, which overlaps the first stream's windows.

Which job a stream takes next is shared (the next one not taken); each result goes to its job's
place, so the caller sums them in job order and gets the numbers a single stream would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

State, Result = TypeVar("State"), TypeVar("Result")


def run(jobs: int, first: State, make: Callable[[], State], work: Callable[[State, int], Result],
        streams: int, done: Callable[[], None] = lambda: None) -> list[Result]:
    """work(state, j) for j in 0 .. jobs − 1 on `streams` threads: the first uses `first`, each other
    builds its own state with `make()` first; `done()` after each job. Results in job order. One
    stream runs in the calling thread; with several, an exception in any (or an interrupt of the
    caller) stops the others at their next job and is raised here."""
    results: list = [None] * jobs
    if streams <= 1:
        for j in range(jobs):
            results[j] = work(first, j)
            done()
        return results
    taken, lock, failed = iter(range(jobs)), threading.Lock(), threading.Event()

    def stream(state) -> None:
        try:
            state = make() if state is None else state
            while not failed.is_set():
                with lock:
                    j = next(taken, None)
                if j is None:
                    return
                results[j] = work(state, j)
                done()
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(streams) as pool:
        futures = [pool.submit(stream, first if i == 0 else None) for i in range(streams)]
        try:
            for f in futures:
                f.result()
        except BaseException:
            failed.set()
            raise
    return results
