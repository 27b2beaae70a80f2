"""Load test of `lowbit serve` with the `openai` client: N concurrent streaming chat clients on loopback.

Starts the server as its own process (so the clients do not share its interpreter), waits for it,
runs the clients, and prints one JSON line: requests completed / failed, throughput (requests/s and
generated tokens/s over the wall time), latency p50/p99 (request start to last token) and time to
first token p50/p99.

    python benchmarks/serve_load.py MODEL [--clients 32] [--max-tokens 32] [--threads 2]
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
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def run_load(base_url: str, model: str, clients: int = 32, max_tokens: int = 32, timeout: float = 600) -> dict:
    """`clients` concurrent streaming chat requests; every one must complete or fail cleanly."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout)

    def one(i: int) -> dict:
        start, first, text, usage, finish = time.perf_counter(), None, "", None, None
        try:
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Tell me fact number {i} about the sea."}],
                max_tokens=max_tokens, temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.usage:
                    usage = chunk.usage
                for c in chunk.choices:
                    if c.delta.content:
                        first = first or time.perf_counter()
                        text += c.delta.content
                    finish = c.finish_reason or finish
        except openai.APIError as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        end = time.perf_counter()
        return {"ok": finish in ("stop", "length") and usage is not None, "latency": end - start,
                "ttft": (first or end) - start, "tokens": usage.completion_tokens if usage else 0,
                "finish": finish, "text": text}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    return {"clients": clients, "max_tokens": max_tokens, "completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3], "wall_s": wall,
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_p50_s": _percentile(lat, 0.5), "latency_p99_s": _percentile(lat, 0.99),
            "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p99_s": _percentile(ttft, 0.99),
            "mean_latency_s": statistics.fmean(lat) if lat else float("nan")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int)
    a = p.parse_args(argv)
    with running_server(a.model, "m", a.threads) as (server, port):
        result = run_load(f"http://127.0.0.1:{port}/v1", "m", a.clients, a.max_tokens)
        result["server_peak_rss_mb"] = _rss_mb(server.pid)
        print(json.dumps(result))


@contextmanager
def running_server(model: str, name: str, threads: int | None):
    """`lowbit serve MODEL` in a subprocess on a free loopback port, once it accepts connections:
    yields (process, port); terminated on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lowbit", "serve", model, "--port", str(port), "--name", name] \
        + (["--threads", str(threads)] if threads else [])
    log = tempfile.TemporaryFile("w+")  # the server's log, read back only if it dies
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise SystemExit(f"the server exited: {log.read()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
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
