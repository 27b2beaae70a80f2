"""Soak of `lowbit serve`: mixed good, bad and disconnecting clients on loopback for `--seconds`
(default 600), then the server's memory before and after and whether it still answers.

Why: a server that handles each bad request well once can still leak or stall over thousands of them.
Each client loops until the deadline, drawing (seeded) one of:
  good      a streaming chat or a plain completion of a few tokens: must finish (200, [DONE]);
  bad       malformed JSON, an unknown model, seed 2^64, a prompt past the context, a body past the
            size limit (3 MB), unsupported options: must get a 4xx with OpenAI's error JSON;
  drop      a streaming request whose client hangs up after the first chunk.
`/v1/models` is timed throughout: it must keep answering while the others run. Prints one JSON line:
counts per kind, unexpected answers (5xx, wrong status, lost connections), the slowest /v1/models,
the server's RSS after warm-up and at the end, and its peak (VmHWM).

    python benchmarks/serve_soak.py MODEL [--seconds 600] [--clients 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import threading
import time

from serve_load import _rss_mb, running_server

NAME = "m"


def _rss_now_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _request(port: int, method: str, path: str, body: bytes | None, drop: bool = False) -> tuple[int, bytes]:
    """(status, body); `drop`: hang up after the first chunk of the answer (status, b"")."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if drop:
            r.read1(64) if hasattr(r, "read1") else r.read(64)
            conn.sock.shutdown(socket.SHUT_RDWR)
            return r.status, b""
        return r.status, r.read()
    finally:
        conn.close()


def _good(rng: random.Random) -> tuple[str, dict]:
    n = rng.randrange(1000)
    if rng.random() < 0.5:
        return "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": f"Fact {n} about the sea?"}],
                                        "max_tokens": rng.randint(1, 16), "stream": True, "temperature": 0.7, "seed": n}
    return "/v1/completions", {"model": NAME, "prompt": f"Story {n}: once upon a time", "max_tokens": rng.randint(1, 16)}


BAD = [
    lambda rng: b'{"model": "m", "messages": [',
    lambda rng: json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(),
    lambda rng: json.dumps({"model": NAME, "prompt": "hi", "seed": 2**64}).encode(),
    lambda rng: json.dumps({"model": NAME, "prompt": "word " * 200_000}).encode(),  # past the context, under 2 MB
    lambda rng: json.dumps({"model": NAME, "prompt": "x" * (3 << 20)}).encode(),  # past the body limit
    lambda rng: json.dumps({"model": NAME, "prompt": "hi", "n": 100, "logprobs": 2}).encode(),  # n past the slots
    lambda rng: json.dumps({"model": NAME, "messages": [{"role": "robot", "content": 5}]}).encode(),
    lambda rng: json.dumps({"model": NAME, "prompt": [10**9]}).encode(),
    lambda rng: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
]


def client(port: int, seed: int, deadline: float, tally: dict, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    while time.time() < deadline:
        kind = rng.choices(["good", "bad", "drop"], [5, 4, 1])[0]
        try:
            if kind == "bad":
                path = rng.choice(["/v1/completions", "/v1/chat/completions"])
                status, body = _request(port, "POST", path, rng.choice(BAD)(rng))
                ok = 400 <= status < 500 and "message" in json.loads(body)["error"]
            else:
                path, body = _good(rng)
                status, answer = _request(port, "POST", path, json.dumps(body).encode(), drop=kind == "drop")
                ok = status == 200 and (kind == "drop" or not body.get("stream") or b"[DONE]" in answer)
            problem = None if ok else f"{kind} {path}: {status} {str(body)[:120] if kind == 'bad' else ''}"
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            ok, problem = False, f"{kind}: {type(e).__name__}: {e}"
        with lock:
            tally[kind] += 1
            if not ok:
                tally["unexpected"].append(problem)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--threads", type=int)
    a = p.parse_args(argv)
    with running_server(a.model, NAME, a.threads) as (server, port):
        _request(port, "POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "warm", "max_tokens": 4}).encode())
        rss_before = _rss_now_mb(server.pid)
        tally, lock = {"good": 0, "bad": 0, "drop": 0, "unexpected": []}, threading.Lock()
        end = time.time() + a.seconds
        clients = [threading.Thread(target=client, args=(port, i, end, tally, lock), daemon=True)
                   for i in range(a.clients)]
        for c in clients:
            c.start()
        slowest = 0.0
        while time.time() < end:
            t = time.perf_counter()
            status, _ = _request(port, "GET", "/v1/models", None)
            slowest = max(slowest, time.perf_counter() - t)
            if status != 200:
                tally["unexpected"].append(f"/v1/models: {status}")
            time.sleep(1)
        for c in clients:
            c.join(180)
        time.sleep(2)  # let the last cancelled jobs leave the worker
        status, _ = _request(port, "POST", "/v1/completions",
                             json.dumps({"model": NAME, "prompt": "still there?", "max_tokens": 4}).encode())
        print(json.dumps({"seconds": a.seconds, "clients": a.clients, "good": tally["good"], "bad": tally["bad"],
                          "dropped": tally["drop"], "unexpected": len(tally["unexpected"]),
                          "unexpected_first": tally["unexpected"][:5], "models_slowest_s": round(slowest, 3),
                          "answers_after": status == 200, "rss_before_mb": round(rss_before, 1),
                          "rss_after_mb": round(_rss_now_mb(server.pid), 1),
                          "rss_peak_mb": round(_rss_mb(server.pid), 1)}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
