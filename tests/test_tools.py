"""Tool calls (edge_slm/generation/tools.py and the server's ``tools``/``tool_choice``)
on a tiny random model whose free output is noise: every constrained call must parse
and validate against its tool's schema."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from edge_slm import ConstraintError, InvalidArgumentError
from edge_slm.generation.tools import (
    Tool,
    ToolCall,
    chat_with_tools,
    parse_tool_call,
    parse_tools,
    tool_constraint,
    tool_messages,
)
from edge_slm.server import RunningServer, ServerConfig

FAMILY = "llama"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,4}$"},
        "unit": {"enum": ["C", "F"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
GATE = {
    "type": "object",
    "properties": {"flight": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}},
    "required": ["flight"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {"name": "gate", "description": "Gate of a flight", "parameters": GATE},
    },
]
SCHEMAS = {"weather": WEATHER, "gate": GATE}
MESSAGES = [{"role": "user", "content": "Where does BA123 leave from?"}]


@pytest.fixture(scope="module")
def model(generators: dict[str, Any]) -> Any:
    return generators[FAMILY]


def ask(model: Any, choice: Any, seed: int, **options: Any) -> Any:
    """The tiny models hold 128 tokens: the prompt (which lists the schemas) is cut to
    its end; the constraint does not depend on it."""
    options = {"temperature": 1.0, "max_new_tokens": 96, "truncate_prompt": True, **options}
    return chat_with_tools(model, MESSAGES, TOOLS, choice, seed=seed, **options)


def test_required_gives_a_valid_call_every_time(model: Any) -> None:
    names = set()
    for seed in range(12):
        answer = ask(model, "required", seed)
        assert answer.finish_reason == "tool_calls", (seed, answer.text, answer.result)
        (call,) = answer.tool_calls
        assert isinstance(call, ToolCall) and call.id.startswith("call_")
        jsonschema.validate(call.arguments, SCHEMAS[call.name])
        names.add(call.name)
    assert names == set(SCHEMAS)  # random sampling reaches both tools


def test_a_named_tool_is_the_one_called(model: Any) -> None:
    choice = {"type": "function", "function": {"name": "weather"}}
    for seed in range(12):
        answer = ask(model, choice, seed)
        (call,) = answer.tool_calls
        assert call.name == "weather"
        jsonschema.validate(call.arguments, WEATHER)


def test_auto_is_a_call_or_text(model: Any) -> None:
    kinds = set()
    for seed in range(16):
        answer = ask(model, "auto", seed)
        if answer.text.startswith("{") and answer.finish_reason != "length":
            (call,) = answer.tool_calls
            jsonschema.validate(call.arguments, SCHEMAS[call.name])
            kinds.add("call")
        else:
            assert not answer.tool_calls
            assert not answer.text.startswith("{")
            kinds.add("text")
    assert "text" in kinds


def test_auto_grammar_forces_a_call_once_it_starts(model: Any) -> None:
    """A ``{`` as the first token commits the answer to a valid call."""
    brace = model.encode("{", add_special_tokens=False)
    assert len(brace) == 1
    for seed in range(8):
        answer = ask(model, "auto", seed, logit_bias={brace[0]: 100.0})
        (call,) = answer.tool_calls
        jsonschema.validate(call.arguments, SCHEMAS[call.name])


def test_none_gives_plain_text(model: Any) -> None:
    answer = ask(model, "none", 1, max_new_tokens=20)
    assert answer.tool_calls == ()
    assert answer.finish_reason != "tool_calls"


def test_a_bad_tool_schema_is_a_constraint_error(model: Any) -> None:
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]
    with pytest.raises(ConstraintError, match="strin"):
        chat_with_tools(model, MESSAGES, bad, "required", max_new_tokens=5, truncate_prompt=True)


@pytest.mark.parametrize(
    ("tools", "choice", "words"),
    [
        ([], "auto", "non-empty"),
        ([{"type": "retrieval"}], "auto", "tools[0]"),
        ([{"type": "function", "function": {"name": ""}}], "auto", "name"),
        (TOOLS + TOOLS[:1], "auto", "duplicate"),
        (TOOLS, "sometimes", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "nope"),
    ],
)
def test_malformed_tools_are_refused(tools: Any, choice: Any, words: str) -> None:
    with pytest.raises(InvalidArgumentError, match=words.replace("[", r"\[")):
        tool_constraint(parse_tools(tools), choice)


def test_history_with_calls_and_results_renders(model: Any) -> None:
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "gate", "arguments": '{"flight": "BA12"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Gate B7"},
    ]
    plain = tool_messages(history, parse_tools(TOOLS))
    assert [m["role"] for m in plain] == ["system", "user", "assistant", "user"]
    assert json.loads(plain[2]["content"]) == {"name": "gate", "arguments": {"flight": "BA12"}}
    assert plain[3]["content"] == "Tool result (gate): Gate B7"
    assert '"weather"' in plain[0]["content"]
    answer = chat_with_tools(
        model, history, TOOLS, "auto", seed=0, max_new_tokens=30, truncate_prompt=True
    )
    assert answer.result.timings.prompt_tokens > 0


def test_parse_tool_call() -> None:
    tools = parse_tools(TOOLS)
    call = parse_tool_call('{"name": "gate", "arguments": {"flight": "BA12"}}', tools)
    assert call is not None and call.arguments == {"flight": "BA12"}
    assert json.loads(call.to_openai()["function"]["arguments"]) == {"flight": "BA12"}
    assert parse_tool_call('{"name": "other", "arguments": {}}', tools) is None
    assert parse_tool_call("Gate B7", tools) is None
    assert isinstance(tools[0], Tool)


# ------------------------------------------------------------------ the server
class Truncating:
    """The tiny model, cutting the long tool prompt to the end of its 128-token context
    (the server has no truncation option; the constraint does not depend on the prompt)."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def stream_chat(self, messages: Any, **options: Any) -> Any:
        return self._model.stream_chat(messages, truncate_prompt=True, **options)


@pytest.fixture(scope="module")
def server(model: Any) -> Iterator[RunningServer]:
    config = ServerConfig(port=0, quiet=True, max_live=4)
    srv = RunningServer(config, [("tiny", Truncating(model))]).start()
    try:
        assert srv.wait_ready(60), srv.registry.error
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "gate"}}])
def test_server_answers_tool_calls(client: openai.OpenAI, choice: Any) -> None:
    for seed in range(4):
        answer = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice=choice,
            temperature=1.0,
            seed=seed,
            max_tokens=96,
        )
        choice_ = answer.choices[0]
        assert choice_.finish_reason == "tool_calls", choice_
        assert choice_.message.content is None
        (call,) = choice_.message.tool_calls or []
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(choice, dict):
            assert call.function.name == "gate"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_server_streams_the_call_in_one_delta(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        temperature=1.0,
        seed=5,
        max_tokens=96,
        stream=True,
    )
    calls, reasons, texts = [], [], []
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            calls.extend(delta.tool_calls or [])
            texts.append(delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
    assert reasons[-1] == "tool_calls" and "".join(texts) == ""
    (call,) = calls
    assert call.function is not None and call.function.name in SCHEMAS
    jsonschema.validate(json.loads(call.function.arguments or ""), SCHEMAS[call.function.name])


def test_server_none_and_history(client: openai.OpenAI) -> None:
    history: list[Any] = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "gate", "arguments": '{"flight": "BA12"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Gate B7"},
    ]
    answer = client.chat.completions.create(
        model="tiny",
        messages=history,
        tools=TOOLS,
        tool_choice="none",
        seed=1,
        max_tokens=10,  # type: ignore[arg-type]
    )
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert isinstance(choice.message.content, str)


@pytest.mark.parametrize(
    ("patch", "param", "words"),
    [
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}
                ],
                "tool_choice": "required",
            },
            None,
            "strin",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools", "tools[0]"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "cannot be combined",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]},
            "messages[0]",
            "only assistant",
        ),
    ],
)
def test_server_bad_tools_are_a_400(
    server: RunningServer, patch: dict[str, Any], param: str | None, words: str
) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, **patch}
    with contextlib.closing(httpx.Client(timeout=60)) as http:
        response = http.post(server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param


def test_tools_go_in_the_first_user_message_without_a_system_role() -> None:
    plain = tool_messages(MESSAGES, parse_tools(TOOLS), "required", system_role=False)
    assert [m["role"] for m in plain] == ["user"]
    assert plain[0]["content"].startswith("You can call these tools")
    assert plain[0]["content"].endswith(MESSAGES[0]["content"])
    assert MESSAGES[0]["content"] == "Where does BA123 leave from?"  # the input is not changed
