"""`response_format` on the server (json_object, json_schema, regex and grammar extensions),
driven by the official `openai` client over a tiny random model: the answers validate."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest

from edge_slm.server import RunningServer, ServerConfig

FAMILY = "llama"
MESSAGES = [{"role": "user", "content": "Book a table for two, name Ana."}]
BOOKING = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
        "guests": {"type": "integer", "minimum": 1, "maximum": 12},
    },
    "required": ["name", "guests"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(generators: dict[str, Any]) -> Iterator[RunningServer]:
    config = ServerConfig(port=0, quiet=True, max_live=4)
    srv = RunningServer(config, [("tiny", generators[FAMILY])]).start()
    try:
        assert srv.wait_ready(60), srv.registry.error
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_json_schema_chat_validates(client: openai.OpenAI) -> None:
    for seed in range(5):
        answer = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,  # type: ignore[arg-type]
            temperature=1.0,
            seed=seed,
            max_tokens=100,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "booking", "schema": BOOKING, "strict": True},
            },
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content or ""), BOOKING)


def test_json_object_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        temperature=0.8,
        seed=3,
        max_tokens=110,
        stream=True,
        response_format={"type": "json_object"},
    )
    parts, reasons = [], []
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
    if reasons[-1] == "stop":
        assert isinstance(json.loads("".join(parts)), dict)
    else:
        assert reasons[-1] == "length"


def test_completions_regex_and_grammar_extensions(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model="tiny",
        prompt="Gate:",
        temperature=1.0,
        seed=1,
        max_tokens=20,
        n=3,
        extra_body={"response_format": {"type": "regex", "regex": "[A-D][1-9]"}},
    )
    assert all(re.fullmatch("[A-D][1-9]", c.text) for c in answer.choices)
    answer = client.completions.create(
        model="tiny",
        prompt="Route:",
        temperature=1.0,
        seed=2,
        max_tokens=20,
        extra_body={"response_format": {"type": "grammar", "grammar": 'root ::= "lift" | "desk"'}},
    )
    assert answer.choices[0].text in ("lift", "desk")
    assert answer.choices[0].finish_reason == "stop"


class Booking(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    guests: int = pydantic.Field(ge=1, le=12)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    answer = parse(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        temperature=1.0,
        seed=4,
        max_tokens=100,
        response_format=Booking,
    )
    booking = answer.choices[0].message.parsed
    assert isinstance(booking, Booking) and 1 <= booking.guests <= 12


@pytest.mark.parametrize(
    ("response_format", "words"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
            "strin",
        ),
        ({"type": "regex", "regex": "[a-"}, "regex"),
        ({"type": "xml"}, "'response_format'"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "schema"),
    ],
)
def test_invalid_response_format_is_a_400(
    server: RunningServer, response_format: dict[str, Any], words: str
) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "response_format": response_format}
    with contextlib.closing(httpx.Client(timeout=60)) as http:
        response = http.post(server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"]
