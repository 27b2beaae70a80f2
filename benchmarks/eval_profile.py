"""Where `lowbit eval`'s seconds go: the command run in this process under cProfile, timed by the
process's CPU time (all threads), which a busy machine inflates far less than wall time, and summed
into phases. Run it with one thread (LOWBIT_THREADS=1 OMP_NUM_THREADS=1) for the work itself: a
spinning pool thread waiting for a core counts as CPU time too, and with several threads a warm
evaluation scores its windows on stream threads (eval/streams.py) that cProfile does not follow:
their work is then only in "windows", the phases inside it (states, heads, scores) stay empty.
`--wall` times the phases by the wall clock instead (on a quiet machine: the serial part's wall).

    LOWBIT_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/eval_profile.py /tmp/h1/w4 --ppl --kld
    python benchmarks/eval_profile.py /tmp/h1/w4 --kld --wall

Phases (cumulative CPU seconds of these functions; imports counted where they happen):
    import      lowbit.api and what it pulls in (torch, transformers)
    load        the quantized model (api.load) and the reference (SourceScores: reading its cache;
                loading the source, cold cache only)
    engine      building the native engines (load_decoder: repacking weights, the huge-page arena)
    states      the engines' prefill of every window: the model's, the source's (cold cache only)
    heads       the output heads (logits): the model's, the source's (cold cache only)
    records     the source's logits made into the cached records (kernels/cpu/logit_scores; cold only)
    scores      log-losses and the KL sum from the logits and records (kernels/cpu/logit_scores);
                "other": the rest (tokenizing, the progress bar)
    windows     every window, all streams (states, heads, records and scores are inside it; not
                added to the total)
"""

import cProfile
import pstats
import sys
import time

PHASES = [("import", "lowbit/cli.py", "_import_api"), ("load", "lowbit/api.py", "load"),
          ("load", "lowbit/eval/metrics.py", "__init__"), ("load", "lowbit/eval/metrics.py", "_load"),
          ("engine", "lowbit/runtime/engine.py", "load_decoder"), ("heads", "lowbit/eval/metrics.py", "logits"),
          ("states", "lowbit/runtime/engine.py", "states"), ("records", "lowbit/kernels/cpu/logit_scores.py", "records"),
          ("scores", "lowbit/kernels/cpu/logit_scores.py", "row_scores")]
SPLIT = {"states", "heads"}  # split by caller: the source's (SourceScores._logits) or the model's scorer


def phases(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative CPU seconds per phase (states and heads split by caller: the model's or the source's)."""
    out = dict.fromkeys(["import", "load", "engine", "states (model)", "states (source)", "heads (model)",
                         "heads (source)", "records", "scores"], 0.0)
    for (path, _, name), (_, _, _, cum, callers) in stats.stats.items():
        for phase, where, fn in PHASES:
            if path.endswith(where) and name == fn:
                if phase in SPLIT:
                    for (_, _, caller), (_, _, _, ccum) in callers.items():
                        out[f"{phase} (source)" if caller == "_logits" else f"{phase} (model)"] += ccum
                else:
                    out[phase] += cum
        if path.endswith("lowbit/eval/metrics.py") and name == "_decoder":  # the source's engine: not "load"
            out["load"] -= sum(c[3] for (_, _, caller), c in callers.items() if caller in ("__init__", "_load"))
    return out


def windows(stats: pstats.Stats) -> float:
    """Cumulative seconds of eval/streams.run: every window, on however many streams."""
    return sum(cum for (path, _, name), (_, _, _, cum, _) in stats.stats.items()
               if path.endswith("lowbit/eval/streams.py") and name == "run")


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--wall"]
    clock = time.perf_counter if "--wall" in sys.argv[1:] else time.process_time
    wall, cpu = time.perf_counter(), time.process_time()
    profile = cProfile.Profile(clock)
    profile.enable()
    from lowbit.cli import main as lowbit_main
    rc = lowbit_main(["eval", *args])
    profile.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stats = pstats.Stats(profile)
    split = phases(stats)
    split["other"] = (wall if clock is time.perf_counter else cpu) - sum(split.values())
    kind = "wall" if clock is time.perf_counter else "CPU"
    print(f"wall {wall:.1f} s, CPU {cpu:.1f} s (exit {rc}); {kind} seconds by phase:", file=sys.stderr)
    for phase, seconds in split.items():
        print(f"  {phase:<16} {seconds:7.1f}", file=sys.stderr)
    print(f"  {'windows':<16} {windows(stats):7.1f}  (all streams; states, heads, records, scores inside)",
          file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    main()
