"""Bounded concurrent load on the server: 16 client threads, a fixed number of mixed
requests (chat and completions, streamed and not, greedy) against small limits.

Every answer is either the one the same request got alone, or a clear overload error
(429 or 503 with ``Retry-After``); none is lost, none is a 500, and the in-flight gauge
returns to 0.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from edge_slm.server import RunningServer, ServerConfig

THREADS = 16
PER_THREAD = 8
PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4", "Once upon a time"]


@pytest.fixture(scope="module")
def server(generators: dict[str, Any]) -> Iterator[RunningServer]:
    config = ServerConfig(
        port=0, quiet=True, max_live=2, max_queue=4, request_timeout_s=30, max_connections=64
    )
    running = RunningServer(config, [("tiny", generators["llama"])]).start()
    try:
        assert running.wait_ready(60), running.registry.error
        yield running
    finally:
        running.stop()


def request_for(kind: int) -> tuple[str, dict[str, Any]]:
    prompt = PROMPTS[kind % len(PROMPTS)]
    chat = kind // len(PROMPTS) % 2 == 0
    stream = kind // (2 * len(PROMPTS)) % 2 == 1
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 6 + kind % 5, "temperature": 0}
    if stream:
        body["stream"] = True
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def ask(server: RunningServer, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    """(status, headers, answer text or error JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        payload = response.read()
    finally:
        conn.close()
    if response.status != 200:
        return response.status, headers, json.loads(payload)
    chat = path.endswith("chat/completions")
    if not body.get("stream"):
        choice = json.loads(payload)["choices"][0]
        return 200, headers, choice["message"]["content"] if chat else choice["text"]
    text = payload.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    pieces = []
    for event in text[:-2].split("\n\n")[:-1]:
        data = json.loads(event[len("data: ") :])
        assert "error" not in data, data
        for choice in data["choices"]:
            pieces.append(
                (choice.get("delta") or {}).get("content") or "" if chat else choice["text"]
            )
    return 200, headers, "".join(pieces)


def in_flight(server: RunningServer) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found = re.search(r"^edge_slm_requests_in_flight (\S+)$", text, re.MULTILINE)
    assert found, text
    return float(found.group(1))


def test_concurrent_load_is_correct_or_refused(server: RunningServer) -> None:
    kinds = 4 * len(PROMPTS)
    expected = {}
    for kind in range(kinds):  # each request alone first
        path, body = request_for(kind)
        status, _, text = ask(server, path, body)
        assert status == 200, text
        expected[kind] = text

    results: list[tuple[int, int, dict[str, str], Any]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(thread: int) -> None:
        try:
            for i in range(PER_THREAD):
                kind = (thread * PER_THREAD + i) % kinds
                status, headers, answer = ask(server, *request_for(kind))
                with lock:
                    results.append((kind, status, headers, answer))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors
    assert len(results) == THREADS * PER_THREAD  # none lost

    statuses = Counter(status for _, status, _, _ in results)
    for kind, status, headers, answer in results:
        if status == 200:
            assert answer == expected[kind], (kind, answer, expected[kind])
        else:
            assert status in (429, 503), (status, answer)
            assert headers.get("retry-after"), headers
            assert answer["error"]["code"] in ("queue_full", "queue_timeout", "server_busy")
    assert statuses[200] >= THREADS, statuses  # the limits refuse some, not all
    print(f"load: {len(results)} requests from {THREADS} threads: {dict(statuses)}")

    end = time.monotonic() + 10
    while in_flight(server) != 0 and time.monotonic() < end:
        time.sleep(0.05)
    assert in_flight(server) == 0
