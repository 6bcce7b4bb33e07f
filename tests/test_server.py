"""`edge-slm serve`: the OpenAI-compatible server, driven by the official `openai` client
and by raw HTTP for what the client hides (SSE framing, status codes, disconnects).

Servers run in-process on a free port (``port=0``) over the session's tiny random
bundles; one test starts the real ``edge-slm serve`` command and stops it with SIGTERM.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from edge_slm.server import RunningServer, ServerConfig
from edge_slm.server.errors import ApiError
from edge_slm.server.limits import Admission

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
FAMILY = "llama"


# ---------------------------------------------------------------------- helpers
class SlowGenerator:
    """A generator that waits ``delay`` seconds before each chunk (disconnect and queue
    tests need a generation that lasts); everything else is the wrapped model's."""

    def __init__(self, model: Any, delay: float) -> None:
        self._model = model
        self.delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def _slow(self, inner: Iterator[Any]) -> Iterator[Any]:
        try:
            for chunk in inner:
                time.sleep(self.delay)
                yield chunk
        finally:
            inner.close()  # type: ignore[attr-defined]

    def stream(self, prompt: str, **options: Any) -> Iterator[Any]:
        return self._slow(self._model.stream(prompt, **options))

    def stream_chat(self, messages: Any, **options: Any) -> Iterator[Any]:
        return self._slow(self._model.stream_chat(messages, **options))


@contextlib.contextmanager
def running(sources: list[tuple[str, Any]], **settings: Any) -> Iterator[RunningServer]:
    config = ServerConfig(port=0, quiet=True, **settings)
    server = RunningServer(config, sources).start()
    try:
        assert server.wait_ready(60), server.registry.error
        yield server
    finally:
        server.stop()


def client_for(server: RunningServer, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def raw(
    server: RunningServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def post(server: RunningServer, path: str, payload: Any, **kw: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=payload, timeout=60, **kw)


def sse_events(text: str) -> list[str]:
    """The data of each event; asserts the framing (``data: ...`` + blank line)."""
    assert text.endswith("\n\n"), text[-50:]
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: ") :] for e in events]


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name + ("{" + wanted + "}" if labels else "")) + r" (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"{name} {labels} not in /metrics"
    return float(found.group(1))


def eos_ban(model: Any) -> dict[str, float]:
    return {str(t): -100 for t in model.manifest.special_tokens.eos_token_ids}


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def static_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("static-root")
    site = root / "site"
    (site / "js").mkdir(parents=True)
    (site / "index.html").write_text("<!doctype html><title>kiosk</title>")
    (site / "js" / "app.js").write_text("console.log('hi')")
    (site / "style.css").write_text("body{}")
    (root / "secret.txt").write_text("do not serve")
    (site / "escape").symlink_to(root)
    return site


@pytest.fixture(scope="module")
def server(
    generators: dict[str, Any], encoder_bundles: dict[str, Path], static_dir: Path
) -> Iterator[RunningServer]:
    sources = [
        ("tiny", generators[FAMILY]),
        ("clf", encoder_bundles["clf"]),
        ("emb", encoder_bundles["emb"]),
    ]
    with running(sources, static_dir=static_dir, max_body_bytes=50_000, max_live=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return client_for(server)


# ---------------------------------------------------------------------- openai client
def test_models_and_health(server: RunningServer, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny", "clf", "emb"]
    assert client.models.retrieve("tiny").owned_by == "edge-slm"
    response = httpx.get(server.url + "/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_chat_matches_the_library(client: openai.OpenAI, generators: dict[str, Any]) -> None:
    model = generators[FAMILY]
    answer = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        temperature=0,
        max_tokens=12,  # type: ignore[arg-type]
    )
    expected = model.chat(MESSAGES, temperature=0, max_new_tokens=12)
    choice = answer.choices[0]
    assert choice.message.content == expected.text
    assert choice.message.role == "assistant"
    assert (
        choice.finish_reason
        == {"stop_token": "stop", "length": "length"}[str(expected.finish_reason)]
    )
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert answer.usage.completion_tokens == len(expected.token_ids)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + len(expected.token_ids)
    assert answer.object == "chat.completion" and answer.model == "tiny"


def test_completion_matches_the_library_with_logprobs(
    client: openai.OpenAI, generators: dict[str, Any]
) -> None:
    model = generators[FAMILY]
    answer = client.completions.create(
        model="tiny",
        prompt="Once upon a time",
        temperature=0,
        max_tokens=8,
        logprobs=2,
        extra_body={"logit_bias": None},
    )
    expected = model.generate("Once upon a time", temperature=0, max_new_tokens=8, logprobs=2)
    choice = answer.choices[0]
    assert choice.text == expected.text
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    assert len(choice.logprobs.token_logprobs) == len(expected.token_ids)
    np.testing.assert_allclose(
        choice.logprobs.token_logprobs, [s.logprob for s in expected.logprobs], rtol=1e-6
    )
    assert choice.logprobs.top_logprobs is not None
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert answer.usage is not None and answer.usage.completion_tokens == len(expected.token_ids)


def test_streamed_chat_equals_the_answer(client: openai.OpenAI) -> None:
    settings: dict[str, Any] = {
        "model": "tiny",
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": 16,
    }
    whole = client.chat.completions.create(**settings)
    chunks = list(
        client.chat.completions.create(
            **settings, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == whole.choices[0].finish_reason and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_streamed_completion(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model="tiny", prompt="The quick", temperature=0, max_tokens=10
    )
    parts = list(
        client.completions.create(
            model="tiny", prompt="The quick", temperature=0, max_tokens=10, stream=True
        )
    )
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_logprobs_stop_and_bias(client: openai.OpenAI, generators: dict[str, Any]) -> None:
    model = generators[FAMILY]
    answer = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        temperature=0,
        max_tokens=6,  # type: ignore[arg-type]
        logprobs=True,
        top_logprobs=3,
    )
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == answer.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    # logit_bias +100 on one token: greedy picks it every time (until max_tokens)
    forced = model.encode(" the", add_special_tokens=False)[0]
    biased = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        temperature=0,
        max_tokens=4,  # type: ignore[arg-type]
        logit_bias={str(forced): 100},
        logprobs=True,
    )
    tokens = [
        model.encode(t.token, add_special_tokens=False) for t in biased.choices[0].logprobs.content
    ]  # type: ignore[union-attr]
    assert tokens == [[forced]] * 4 and biased.choices[0].finish_reason == "length"
    # a stop string cuts the text and reports "stop"
    text = biased.choices[0].message.content
    assert text
    stopped = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        temperature=0,
        max_tokens=4,  # type: ignore[arg-type]
        logit_bias={str(forced): 100},
        stop=[text[len(text) // 2 :]],
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert text.startswith(stopped.choices[0].message.content or "")
    assert len(stopped.choices[0].message.content or "") < len(text)


def test_seeded_choices(client: openai.OpenAI, generators: dict[str, Any]) -> None:
    """n choices run concurrently with seeds seed, seed+1, ...: each equals a library call."""
    model = generators[FAMILY]
    settings: dict[str, Any] = {
        "model": "tiny",
        "messages": MESSAGES,
        "temperature": 1.0,
        "max_tokens": 8,
        "seed": 7,
        "n": 3,
        "extra_body": {"top_k": 50, "repetition_penalty": 1.1},
    }
    first = client.chat.completions.create(**settings)
    again = client.chat.completions.create(**settings)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    for i, text in enumerate(texts):
        expected = model.chat(
            MESSAGES,
            temperature=1.0,
            max_new_tokens=8,
            seed=7 + i,
            top_k=50,
            repetition_penalty=1.1,
        )
        assert text == expected.text
    assert first.usage is not None
    assert first.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_errors_through_the_client(client: openai.OpenAI, generators: dict[str, Any]) -> None:
    context = generators[FAMILY].manifest.context_length
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=5)  # type: ignore[arg-type]
    assert bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found" and "tiny" in missing.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="emb", messages=MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny", prompt="fox " * (context + 10), max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as cap:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=context + 1)  # type: ignore[arg-type]
    assert cap.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,  # type: ignore[arg-type]
            tools=[{"type": "retrieval"}],  # type: ignore[list-item]
        )
    assert tools.value.param == "tools"  # function tools: tests/test_tools.py
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,  # type: ignore[arg-type]
            extra_body={"mirostat": 2},
        )
    assert unknown.value.param == "mirostat"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,  # type: ignore[arg-type]
            logit_bias={"999999": 1},
        )
    # harmless OpenAI fields are accepted and ignored
    ok = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=2,  # type: ignore[arg-type]
        user="kiosk-3",
        metadata={"a": "b"},
        store=False,
    )
    assert ok.choices[0].message.content is not None


def test_embeddings_and_classifications(
    server: RunningServer, client: openai.OpenAI, encoder_bundles: dict[str, Path]
) -> None:
    import edge_slm

    texts = ["Where is the station?", "Café 東京 😀"]
    embedder = edge_slm.load(encoder_bundles["emb"])
    expected = embedder.embed_all(texts)  # type: ignore[union-attr]
    got = client.embeddings.create(model="emb", input=texts)  # the client asks for base64
    np.testing.assert_allclose([d.embedding for d in got.data], expected, atol=1e-6)
    assert got.usage.prompt_tokens > 0 and [d.index for d in got.data] == [0, 1]
    floats = post(server, "/v1/embeddings", {"input": texts[0], "encoding_format": "float"})
    np.testing.assert_allclose(floats.json()["data"][0]["embedding"], expected[0], atol=1e-6)
    encoded = post(server, "/v1/embeddings", {"input": texts, "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(encoded.json()["data"][1]["embedding"]), "<f4")
    np.testing.assert_allclose(vector, expected[1], atol=1e-6)

    classifier = edge_slm.load(encoder_bundles["clf"])
    reference = list(classifier.classify(texts, top_k=2))  # type: ignore[union-attr]
    answer = post(server, "/v1/classifications", {"model": "clf", "input": texts, "top_k": 2})
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert [d["label"] for d in data] == [r.label for r in reference]
    assert [d["labels"] for d in data] == [list(r.labels) for r in reference]
    np.testing.assert_allclose([d["scores"] for d in data], [r.scores for r in reference])
    assert post(server, "/v1/classifications", {"input": 3}).status_code == 400


# ---------------------------------------------------------------------- raw HTTP
def test_sse_framing(server: RunningServer) -> None:
    payload = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 5,
        "stream": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    response = post(server, "/v1/chat/completions", payload)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert all(c["usage"] is None for c in chunks[:-1])


def test_status_codes(server: RunningServer) -> None:
    status, _, body = raw(
        server, "POST", "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"}
    )
    error = json.loads(body)["error"]
    assert status == 400 and set(error) == {"message", "type", "param", "code"}
    assert raw(server, "POST", "/v1/chat/completions", b"[1, 2]")[0] == 400
    assert raw(server, "POST", "/v1/chat/completions", b"\xff\xfe")[0] == 400
    big = json.dumps({"model": "tiny", "messages": MESSAGES, "pad": "x" * 60_000}).encode()
    status, _, body = raw(server, "POST", "/v1/chat/completions", big)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert raw(server, "GET", "/v1/chat/completions")[0] == 405
    assert raw(server, "DELETE", "/v1/models")[0] == 405
    assert raw(server, "POST", "/v1/nothing", b"{}")[0] == 404
    assert raw(server, "GET", "/v1/models/nope")[0] == 404
    status, _, body = raw(
        server,
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": "tiny", "messages": [{"role": "function", "content": "x"}]}).encode(),
    )
    assert status == 400 and json.loads(body)["error"]["param"] == "messages[0].role"
    # no Content-Length: 411 (chunked bodies are not read)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 411")


def test_keep_alive(server: RunningServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 3}).encode()
    conn.request("POST", "/v1/completions", body)
    first = conn.getresponse()
    assert first.status == 200 and first.getheader("Connection") != "close"
    first.read()
    sock = conn.sock
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True}).encode(),
    )
    second = conn.getresponse()
    assert second.status == 200 and second.getheader("Transfer-Encoding") == "chunked"
    assert sse_events(second.read().decode())[-1] == "[DONE]"
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    assert conn.sock is sock  # one connection for all three
    conn.close()


def test_static_files(server: RunningServer) -> None:
    status, headers, body = raw(server, "GET", "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b"kiosk" in body
    status, headers, _ = raw(server, "GET", "/js/app.js")
    assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"
    assert raw(server, "GET", "/style.css")[1]["content-type"] == "text/css; charset=utf-8"
    assert "access-control-allow-origin" not in headers  # CORS is off by default
    for path in (
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/js/../../secret.txt",
        "/escape/secret.txt",
        "/%2Fetc%2Fpasswd",
        "/missing.html",
        "/..%5csecret.txt",
    ):
        status, _, body = raw(server, "GET", path)
        assert status == 404 and b"do not serve" not in body, path
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /../../secret.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b"".join(iter(lambda: sock.recv(4096), b""))
    assert reply.startswith(b"HTTP/1.1 404") and b"do not serve" not in reply


def test_metrics(server: RunningServer, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)  # type: ignore[arg-type]
    response = httpx.get(server.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert (
        metric(text, "edge_slm_requests_total", endpoint="/v1/chat/completions", status="200") >= 1
    )
    assert metric(text, "edge_slm_completion_tokens_total", model="tiny") >= 1
    assert metric(text, "edge_slm_prompt_tokens_total", model="tiny") >= 1
    assert metric(text, "edge_slm_time_to_first_token_seconds_count", model="tiny") >= 1
    assert metric(text, "edge_slm_queue_depth") == 0
    assert metric(text, "edge_slm_generations_live") == 0
    assert metric(text, "edge_slm_requests_in_flight") == 0
    assert "# TYPE edge_slm_decode_tokens_per_second histogram" in text
    for line in text.splitlines():  # every sample line: name{labels} value
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? \S+", line), line


def test_api_key(generators: dict[str, Any]) -> None:
    with running([("tiny", generators[FAMILY])], api_key="s3cret") as srv:
        with pytest.raises(openai.AuthenticationError) as denied:
            client_for(srv, "wrong").models.list()
        assert denied.value.code == "invalid_api_key"
        status, headers, body = raw(srv, "POST", "/v1/completions", b'{"prompt": "x"}')
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        assert raw(srv, "GET", "/metrics")[0] == 401
        assert raw(srv, "GET", "/health")[0] == 200  # public
        assert [m.id for m in client_for(srv, "s3cret").models.list()] == ["tiny"]


def test_cors_when_asked(generators: dict[str, Any]) -> None:
    with running([("tiny", generators[FAMILY])], cors_origin="http://kiosk.local") as srv:
        status, headers, _ = raw(
            srv,
            "OPTIONS",
            "/v1/chat/completions",
            headers={"Origin": "http://kiosk.local", "Access-Control-Request-Method": "POST"},
        )
        assert status == 204
        assert headers["access-control-allow-origin"] == "http://kiosk.local"
        assert "Authorization" in headers["access-control-allow-headers"]
        assert raw(srv, "GET", "/v1/models")[1]["access-control-allow-origin"] == (
            "http://kiosk.local"
        )


def test_health_while_loading(generators: dict[str, Any]) -> None:
    release = threading.Event()

    def slow_loader(path: Path) -> Any:
        release.wait(30)
        return generators[FAMILY]

    server = RunningServer(
        ServerConfig(port=0, quiet=True), [("tiny", Path("x"))], loader=slow_loader
    ).start()
    try:
        status, headers, body = raw(server, "GET", "/health")
        assert (status, json.loads(body)) == (503, {"status": "loading"})
        assert headers["retry-after"] == "1"
        status, headers, body = raw(server, "POST", "/v1/completions", b'{"prompt": "x"}')
        assert status == 503 and json.loads(body)["error"]["code"] == "loading"
        release.set()
        assert server.wait_ready(30)
        assert raw(server, "GET", "/health")[0] == 200
    finally:
        release.set()
        server.stop()


def test_queue_full_is_429_and_deadline_is_length(generators: dict[str, Any]) -> None:
    model = generators[FAMILY]
    slow = SlowGenerator(model, 0.05)
    with running([("slow", slow)], max_live=1, max_queue=0, request_timeout_s=1.0) as srv:
        payload = {
            "messages": MESSAGES,
            "max_tokens": 100,
            "logit_bias": eos_ban(model),
            "temperature": 0,
        }
        with ThreadPoolExecutor(1) as pool:
            long_run = pool.submit(post, srv, "/v1/chat/completions", payload)
            deadline = time.monotonic() + 10
            while srv.app.admission.live == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = post(srv, "/v1/chat/completions", payload)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            answer = long_run.result().json()
        # the 1 s request timeout reached the runtime as deadline_s: cut short, "length"
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] < 40


def test_admission_timeout_is_503() -> None:
    admission = Admission(max_live=1, max_queue=4)
    admission.acquire(1, None)
    with pytest.raises(ApiError) as timed_out:
        admission.acquire(1, 0.05)
    assert timed_out.value.status == 503 and timed_out.value.headers["Retry-After"] == "1"
    admission.release(1)
    admission.acquire(1, 0.05)
    assert (admission.live, admission.waiting) == (1, 0)


def test_disconnect_stops_the_generation(generators: dict[str, Any]) -> None:
    model = generators[FAMILY]
    slow = SlowGenerator(model, 0.02)
    with running([("slow", slow)]) as srv:
        body = json.dumps(
            {"messages": MESSAGES, "max_tokens": 100, "stream": True, "logit_bias": eos_ban(model)}
        ).encode()
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while received.count(b"data: ") < 4:  # the role delta and three pieces of text
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
        sock.close()
        closed_at = srv.app.metrics.completion_tokens_total("slow")
        deadline = time.monotonic() + 10
        while srv.app.admission.live and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.app.admission.live == 0
        generated = srv.app.metrics.completion_tokens_total("slow")
        assert generated - closed_at <= 5, (closed_at, generated)
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "edge_slm_generations_cancelled_total", reason="disconnect") == 1
        assert (
            metric(text, "edge_slm_requests_total", endpoint="/v1/chat/completions", status="499")
            == 1
        )


def test_concurrent_requests_are_not_mixed(server: RunningServer, client: openai.OpenAI) -> None:
    """Requests from several threads at once get the answers they get one at a time."""
    requests: list[dict[str, Any]] = [
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": q}],
            "max_tokens": 12,
            "temperature": t,
            "seed": s,
        }
        for q, t, s in [
            ("Where is Paris?", 0, None),
            ("Name a colour.", 0.9, 3),
            ("Once upon a time", 0, None),
            ("2 + 2 =", 1.0, 11),
            ("Tell me about foxes.", 0.7, 5),
            ("Hello!", 0, None),
        ]
    ]
    alone = [client.chat.completions.create(**r).choices[0].message.content for r in requests]
    streamed = {"stream": True}

    def ask(i: int) -> str | None:
        if i % 2:  # half of them streamed
            chunks = client.chat.completions.create(**requests[i], **streamed)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(**requests[i]).choices[0].message.content

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(ask, range(len(requests))))
    assert together == alone


# ---------------------------------------------------------------------- the command
def test_serve_command_answers_and_stops_on_sigterm(bundles: dict[str, Path]) -> None:
    env = {**os.environ, "EDGE_SLM_API_KEY": "k"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_slm",
            "serve",
            f"tiny={bundles[FAMILY]}",
            "--port",
            "0",
            "--quiet",
            "--max-tokens",
            "16",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert found, line
        url = found.group(1)
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        answer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
        assert answer.usage is not None and answer.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError):  # over --max-tokens
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=17)  # type: ignore[arg-type]
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        rest = process.stderr.read()
        assert "Traceback" not in rest and "stopping" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_command_refuses_a_missing_bundle(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edge_slm", "serve", str(tmp_path / "none"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "not a bundle folder" in done.stderr
    assert "Traceback" not in done.stderr


def test_runtime_errors_map_to_statuses() -> None:
    from edge_slm.errors import CapacityError, ContextLengthError, InvalidArgumentError
    from edge_slm.server.errors import from_runtime_error

    busy = from_runtime_error(CapacityError("all 8 conversations are generating"))
    assert (busy.status, busy.headers["Retry-After"], busy.code) == (503, "1", "capacity_exceeded")
    assert from_runtime_error(ContextLengthError("long")).code == "context_length_exceeded"
    assert from_runtime_error(InvalidArgumentError("bad")).status == 400


def test_shutdown_ends_a_running_stream(generators: dict[str, Any]) -> None:
    model = generators[FAMILY]
    server = RunningServer(
        ServerConfig(port=0, quiet=True), [("slow", SlowGenerator(model, 0.02))]
    ).start()
    assert server.wait_ready(30)
    payload = {
        "messages": MESSAGES,
        "max_tokens": 100,
        "stream": True,
        "logit_bias": eos_ban(model),
    }
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=payload, timeout=30
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        rest = [line for line in lines if line]
    stopping.join(30)
    assert not stopping.is_alive()
    assert json.loads(rest[-1][len("data: ") :])["error"]["code"] == "shutting_down"
    assert server.app.admission.live == 0
