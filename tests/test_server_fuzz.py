"""Fuzzing the server's request bodies (hypothesis): random JSON, wrong types for every
known field, huge and negative numbers, NaN/Infinity, lone surrogates, deep nesting,
random headers and content types, truncated bodies.

Every answer is either a valid 200 or an OpenAI error JSON with a 4xx status; never a
500, never a hang, and the server still answers ``/health`` afterwards.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_slm.server import RunningServer, ServerConfig

EXAMPLES = 150
ENDPOINTS = {
    "/v1/chat/completions": "tiny",
    "/v1/completions": "tiny",
    "/v1/embeddings": "emb",
    "/v1/classifications": "clf",
}
FIELDS = [
    "model", "messages", "prompt", "input", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "top_k", "min_p", "typical_p", "n", "stream", "stream_options",
    "stop", "seed", "logprobs", "top_logprobs", "logit_bias", "echo", "suffix", "best_of",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "response_format",
    "tools", "tool_choice", "functions", "function_call", "user", "encoding_format",
    "dimensions", "threshold", "metadata", "store", "parallel_tool_calls", "modalities",
]  # fmt: skip
VALID = {
    "/v1/chat/completions": {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "temperature": 0,
    },
    "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0},
    "/v1/embeddings": {"model": "emb", "input": "hi"},
    "/v1/classifications": {"model": "clf", "input": ["hi", "there"]},
}

# ---------------------------------------------------------------------- strategies
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63, -(2**63), 10**30, 0.5, -0.0, 1e308, 1e-320]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["NaN", "nan", "inf", "-inf", "Infinity", "1e999", "0.5", "3"]),
)
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\ud800", "a\udfffb", "<|im_end|>\n<|im_start|>system\n", "\x00", "é" * 50]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(FIELDS) | TEXT, inner, max_size=4),
    ),
    max_leaves=12,
)
MESSAGES = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer"]) | JSON},
            optional={"content": TEXT | JSON, "name": JSON, "tool_calls": JSON},
        ),
        JSON,
    ),
    max_size=4,
)


def bodies(endpoint: str) -> st.SearchStrategy[Any]:
    """A valid request with fields replaced, added or dropped; or any JSON at all."""
    base = VALID[endpoint]
    mutated = st.builds(
        lambda changes, dropped: {
            **{k: v for k, v in base.items() if k not in dropped},
            **changes,
        },
        st.dictionaries(
            st.sampled_from(FIELDS),
            st.one_of(JSON, MESSAGES, NUMBERS),
            max_size=4,
        ),
        st.sets(st.sampled_from(sorted(base))),
    )
    return st.one_of(mutated, mutated, JSON)


def encode(body: Any, style: str) -> bytes:
    if style == "ascii":  # lone surrogates escaped as \udxxx, as a JS client would send them
        return json.dumps(body, ensure_ascii=True).encode()
    if style == "nan":  # bare NaN / Infinity tokens (not JSON)
        text = json.dumps(body, ensure_ascii=True)
        return text.replace('"NaN"', "NaN").replace('"inf"', "Infinity").encode()
    if style == "nested":
        return (b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")[:49_000]
    if style == "deep":
        return b'{"messages": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}"
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(
            ["application/json", "text/plain", "application/x-www-form-urlencoded", "", "\x7f"]
        ),
        "Accept": st.sampled_from(["*/*", "text/event-stream", "application/json"]),
        "Transfer-Encoding": st.sampled_from(["chunked", "gzip", "identity"]),
        "Content-Encoding": st.sampled_from(["gzip", "br"]),
        "Expect": st.just("100-continue"),
        "X-Junk": st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
    },
)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(generators: dict[str, Any], encoder_bundles: dict[str, Path]) -> Iterator[RunningServer]:
    bundles = encoder_bundles
    sources = [("tiny", generators["llama"]), ("clf", bundles["clf"]), ("emb", bundles["emb"])]
    config = ServerConfig(
        port=0,
        quiet=True,
        max_body_bytes=50_000,
        max_tokens=8,
        max_live=4,
        max_inputs=16,
        request_timeout_s=20,
        idle_timeout_s=3,
    )
    running = RunningServer(config, sources).start()
    try:
        assert running.wait_ready(60), running.registry.error
        yield running
    finally:
        running.stop()


# ---------------------------------------------------------------------- checks
def send(
    server: RunningServer, path: str, data: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        names = {k.lower() for k in headers}
        for name, value in headers.items():
            conn.putheader(name, value)
        if "transfer-encoding" not in names:
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def check_answer(status: int, headers: dict[str, str], payload: bytes, what: str) -> None:
    assert status < 500 or status == 503, (status, payload[:300], what)
    if status == 200:
        if headers.get("content-type", "").startswith("text/event-stream"):
            text = payload.decode("utf-8")
            assert text.endswith("data: [DONE]\n\n") or '"error"' in text, (text[-300:], what)
            for event in text[:-2].split("\n\n"):
                assert event.startswith("data: "), (event, what)
                if event != "data: [DONE]":
                    json.loads(event[len("data: ") :])
        else:
            answer = json.loads(payload)
            assert isinstance(answer, dict) and "error" not in answer, (answer, what)
        return
    assert 400 <= status < 500 or status == 503, (status, payload[:300], what)
    error = json.loads(payload)["error"]
    assert isinstance(error["message"], str) and error["message"], (error, what)
    assert isinstance(error["type"], str), (error, what)
    assert set(error) == {"message", "type", "param", "code"}, (error, what)
    if status in (429, 503):
        assert "retry-after" in headers, (headers, what)


def healthy(server: RunningServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_fuzzed_bodies_never_500(server: RunningServer, endpoint: str) -> None:
    @FUZZ
    @given(
        body=bodies(endpoint),
        style=st.sampled_from(["utf8", "utf8", "ascii", "nan", "nested", "deep"]),
        headers=HEADERS,
        cut=st.none() | st.integers(min_value=0, max_value=200),
    )
    def run(body: Any, style: str, headers: dict[str, str], cut: int | None) -> None:
        data = encode(body, style)
        if cut is not None:
            data = data[: max(0, len(data) - cut)]  # truncated, with a matching length
        if headers.get("Transfer-Encoding") == "chunked":
            data = f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"
        what = f"{endpoint} {style} {headers} {data[:200]!r}"
        check_answer(*send(server, endpoint, data, headers), what)

    run()
    healthy(server)


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_short_bodies_and_broken_connections(server: RunningServer, endpoint: str) -> None:
    """A body shorter than its Content-Length (the client then stops sending), a length
    that is not a number or is huge: a 4xx or a closed connection, never a 500 or a hang."""
    body = json.dumps(VALID[endpoint]).encode()
    heads = [
        f"Content-Length: {len(body) + 50}",
        "Content-Length: -5",
        "Content-Length: abc",
        "Content-Length: 99999999999999999999",
        f"Content-Length: {len(body)}\r\nContent-Length: 3",
    ]
    for head in heads:
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            request = (
                f"POST {endpoint} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"{head}\r\n\r\n"
            ).encode()
            sock.sendall(request + body)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        if not answer:
            continue  # the server closed the connection: acceptable for a broken request
        first, _, rest = answer.partition(b"\r\n")
        status = int(first.split()[1])
        assert status < 500, (head, answer[:300])
        if status != 200:
            payload = rest.partition(b"\r\n\r\n")[2]
            assert "error" in json.loads(payload), (head, answer[:300])
    healthy(server)
