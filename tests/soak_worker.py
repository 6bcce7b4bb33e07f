"""Run in a subprocess by tests/test_soak.py: a long run of mixed generations and server
requests on one loaded model, measuring memory and latency.

Usage: ``python soak_worker.py BUNDLE [--requests N]``. Prints one JSON line: the RSS
(VmRSS, bytes) after every 100 requests, each request's latency and CPU time (seconds).

The requests cycle through ten kinds (model-level calls, streams closed early,
conversations, server requests streamed and not, a client that hangs up mid-stream),
all with fixed work, so any window of 100 requests holds the same mix.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import edge_slm
from edge_slm.server import RunningServer, ServerConfig

PROMPT = "The station kiosk answers questions about trains. Where is platform"
MESSAGES = [{"role": "user", "content": "Where are the toilets?"}]
TOKENS = 16


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def post(port: int, path: str, body: dict[str, Any]) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {payload[:200]!r}")
        return payload
    finally:
        conn.close()


def hang_up(port: int) -> None:
    """A streamed chat whose client reads the first bytes and closes the socket."""
    body = json.dumps(
        {"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": TOKENS, "temperature": 0}
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 200")


def kinds(model: Any, port: int) -> list[Callable[[int], object]]:
    greedy = {"max_new_tokens": TOKENS, "temperature": 0.0}

    def stream_early(i: int) -> None:
        chunks = model.stream(PROMPT, **greedy)
        for n, _ in enumerate(chunks):
            if n == 2:
                break
        chunks.close()

    def chat_early(i: int) -> None:
        chunks = model.stream_chat(MESSAGES, **greedy)
        next(iter(chunks))
        chunks.close()

    def conversation(i: int) -> None:
        with model.conversation() as chat:
            answer = chat.chat(MESSAGES, max_new_tokens=8, temperature=0.0)
            history = [*MESSAGES, {"role": "assistant", "content": answer.text}]
            chat.chat([*history, {"role": "user", "content": "And the taxis?"}], **greedy)

    return [
        lambda i: model.generate(PROMPT, **greedy),
        lambda i: "".join(c.text for c in model.stream(PROMPT, **greedy)),
        stream_early,
        lambda i: model.chat(MESSAGES, **greedy),
        chat_early,
        conversation,
        lambda i: post(
            port,
            "/v1/chat/completions",
            {"model": "m", "messages": MESSAGES, "max_tokens": TOKENS, "temperature": 0},
        ),
        lambda i: post(
            port,
            "/v1/completions",
            {
                "model": "m",
                "prompt": PROMPT,
                "max_tokens": TOKENS,
                "temperature": 0,
                "stream": True,
            },
        ),
        lambda i: hang_up(port),
        lambda i: model.generate(PROMPT, max_new_tokens=TOKENS, temperature=0.8, seed=i),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args(argv)

    model = edge_slm.load(args.bundle)
    server = RunningServer(ServerConfig(port=0, quiet=True), [("m", model)]).start()
    try:
        assert server.wait_ready(60), server.registry.error
        calls = kinds(model, server.port)
        latencies: list[float] = []
        cpu: list[float] = []
        rss: list[int] = [rss_bytes()]
        for i in range(args.requests):
            started, cpu_started = time.perf_counter(), time.process_time()
            calls[i % len(calls)](i)
            latencies.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)  # every thread, the server's too
            if (i + 1) % 100 == 0:
                rss.append(rss_bytes())
    finally:
        server.stop()
    print(json.dumps({"rss": rss, "latencies": latencies, "cpu": cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
