"""Load test of `lowbit serve` (and of llama.cpp's `llama-server` on the same load) with the `openai` client.

For each client count (default 1, 4, 8, 16, 32) it runs that many concurrent streaming chat clients on
loopback, each with its own ~128-token prompt (a distinct slice of Python's pydoc topics, so no two
share a prefix) and 64 new tokens, and prints one JSON line per count: requests completed / failed,
aggregate generated tokens/s over the wall time, time to first token p50/p99, inter-token latency
p50/p99 (gaps between streamed chunks), request latency p50/p99, the mean prompt tokens the server
counted, and the server's peak RSS. The server runs as its own process (so the clients do not share
its interpreter), started once for all counts.

    python benchmarks/serve_load.py MODEL [--clients 1,4,8,16,32] [--max-tokens 64] [--threads 2]
                                          [--parallel 8] [--kv-cache int8] [--llama-server BIN --gguf FILE]

With --llama-server, the same load then runs against `BIN -m FILE -np PARALLEL -cb -t THREADS`
(continuous batching, PARALLEL slots of the same context each). Targets (issue 20): at 8 clients
aggregate tok/s >= 4x one client's and >= 1.3x llama-server's, p99 TTFT <= llama-server's, nothing lost.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

PROMPT_WORDS = 75  # ~128 prompt tokens with SmolLM2 once its chat template (~30 tokens) wraps them; the server counts them


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def prompts(count: int, words: int = PROMPT_WORDS) -> list[str]:
    """`count` distinct prompts of `words` words each, consecutive slices of the built-in eval text."""
    from lowbit.calib import builtin

    text = builtin("eval").split()
    return [" ".join(text[i * words:(i + 1) * words]) + "\nSummarize the text above." for i in range(count)]


def run_load(base_url: str, model: str, clients: int = 32, max_tokens: int = 64, timeout: float = 600,
             prompt_words: int = PROMPT_WORDS) -> dict:
    """`clients` concurrent streaming chat requests; every one must complete or fail cleanly."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout)
    texts = prompts(clients, prompt_words)

    def one(i: int) -> dict:
        start, stamps, text, usage, finish = time.perf_counter(), [], "", None, None
        try:
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": texts[i]}], max_tokens=max_tokens,
                temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.usage:
                    usage = chunk.usage
                for c in chunk.choices:
                    if c.delta.content:
                        stamps.append(time.perf_counter())
                        text += c.delta.content
                    finish = c.finish_reason or finish
        except openai.APIError as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        end = time.perf_counter()
        return {"ok": finish in ("stop", "length") and usage is not None, "latency": end - start,
                "ttft": (stamps[0] if stamps else end) - start, "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
                "tokens": usage.completion_tokens if usage else 0, "prompt_tokens": usage.prompt_tokens if usage else 0,
                "finish": finish, "text": text}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    lat, ttft, gaps = [r["latency"] for r in ok], [r["ttft"] for r in ok], [g for r in ok for g in r["gaps"]]
    return {"clients": clients, "max_tokens": max_tokens, "completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3], "wall_s": wall,
            "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] for r in ok) if ok else float("nan"),
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p99_s": _percentile(ttft, 0.99),
            "itl_p50_s": _percentile(gaps, 0.5), "itl_p99_s": _percentile(gaps, 0.99),
            "latency_p50_s": _percentile(lat, 0.5), "latency_p99_s": _percentile(lat, 0.99),
            "mean_latency_s": statistics.fmean(lat) if lat else float("nan")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--clients", default="1,4,8,16,32", help="comma-separated client counts, one run each")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=PROMPT_WORDS)
    p.add_argument("--threads", type=int)
    p.add_argument("--parallel", type=int, default=8, help="the server's slots (both servers)")
    p.add_argument("--max-context", type=int, default=1024, help="tokens per slot (both servers)")
    p.add_argument("--kv-cache", help="lowbit serve's --kv-cache (default: the server's own)")
    p.add_argument("--llama-server", help="llama.cpp's llama-server binary: run the same load against it")
    p.add_argument("--gguf", help="the model file llama-server loads (e.g. SmolLM2's Q4_0)")
    a = p.parse_args(argv)
    counts = [int(c) for c in a.clients.split(",")]
    extra = ["--parallel", str(a.parallel), "--max-context", str(a.max_context)] + (["--kv-cache", a.kv_cache] if a.kv_cache else [])
    with running_server(a.model, "m", a.threads, extra) as (server, port):
        for n in counts:
            result = run_load(f"http://127.0.0.1:{port}/v1", "m", n, a.max_tokens, prompt_words=a.prompt_words)
            print(json.dumps({"server": "lowbit", **result, "server_peak_rss_mb": _rss_mb(server.pid)}), flush=True)
    if a.llama_server:
        if not a.gguf:
            raise SystemExit("--llama-server needs --gguf (the model file it serves)")
        cmd = [a.llama_server, "-m", a.gguf, "-np", str(a.parallel), "-cb", "-c", str(a.parallel * a.max_context),
               "--alias", "m"] + (["-t", str(a.threads)] if a.threads else [])
        with running_server(None, "m", None, cmd=cmd) as (server, port):
            for n in counts:
                result = run_load(f"http://127.0.0.1:{port}/v1", "m", n, a.max_tokens, prompt_words=a.prompt_words)
                print(json.dumps({"server": "llama-server", **result, "server_peak_rss_mb": _rss_mb(server.pid)}),
                      flush=True)


@contextmanager
def running_server(model: str | None, name: str, threads: int | None, extra: list[str] = (),
                   cmd: list[str] | None = None):
    """`lowbit serve MODEL` (or `cmd`, given --host/--port here) in a subprocess on a free loopback port,
    once its /health answers 200 (llama-server answers 503 while it loads): yields (process, port);
    terminated on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if cmd is None:
        cmd = [sys.executable, "-m", "lowbit", "serve", model, "--name", name, *extra] \
            + (["--threads", str(threads)] if threads else [])
    cmd = [*cmd, "--host", "127.0.0.1", "--port", str(port)]
    log = tempfile.TemporaryFile("w+")  # the server's log, read back only if it dies
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise SystemExit(f"the server exited: {log.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:  # refused, or an HTTPError (503) while loading
                if time.time() > deadline:
                    raise SystemExit("the server did not start in 300 s")
                time.sleep(0.5)
        yield server, port
    finally:
        server.terminate()
        server.wait(30)


def _rss_mb(pid: int) -> float:
    """The server's peak resident memory (VmHWM), Linux."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
