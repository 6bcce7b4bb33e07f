"""Tool calls: the model picks one of several tools (OpenAI's function schema) and its
arguments, constrained so that the call always parses and validates.

The format is the same for every bundle (docs/structured-output.md, "Tool calls"):

* the tools are described in the system message (:func:`tool_prompt`): one JSON line
  per tool, and how to call one;
* a call is the whole answer, one JSON object
  ``{"name": <tool name>, "arguments": {...}}`` (one call per answer);
* earlier calls in the history (assistant messages with ``tool_calls``) are rendered as
  that JSON, and tool results (``role: "tool"``) as user messages
  ``Tool result (<name>): <content>``.

``tool_choice`` decides the constraint (:func:`tool_constraint`): ``"required"`` or a
named function constrain the answer to a call (a JSON schema, ``anyOf`` over the
allowed tools, each ``{"name": {"const": ...}, "arguments": <its parameters>}``);
``"auto"`` is a Lark grammar allowing either such a call or plain text that does not
start with ``{``; ``"none"`` adds no constraint (the tools are still described).

Nothing here imports llguidance: the constraint objects are compiled by the generation
call, like any other constraint.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_slm.errors import InvalidArgumentError
from edge_slm.generation.constraints import Constraint, Grammar, JsonSchema
from edge_slm.text.stops import FinishReason

if TYPE_CHECKING:
    from edge_slm.generation.model import TextGenerator
    from edge_slm.generation.results import GenerationResult

__all__ = [
    "Tool",
    "ToolCall",
    "ToolChatResult",
    "chat_with_tools",
    "parse_tool_call",
    "parse_tools",
    "tool_constraint",
    "tool_messages",
]

TOOL_CHOICES = ("none", "auto", "required")
COMPLETE = (FinishReason.CONSTRAINT, FinishReason.STOP_TOKEN)
CALL_JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": "[ ]?"}
"""A call's JSON allows at most one space between two JSON tokens (``{"name": "f"}``,
as the prompt shows it, or ``{"name":"f"}``): a small model cannot spend its token
budget on whitespace inside a call."""


@dataclass(frozen=True)
class Tool:
    """One callable function: its name, description and JSON schema of arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}, hash=False
    )


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: the tool's name, its arguments (valid against its schema), an id."""

    name: str
    arguments: Mapping[str, Any] = field(hash=False)
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's ``tool_calls`` item (``arguments`` as a JSON string)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }


@dataclass(frozen=True)
class ToolChatResult:
    """A chat answer with tools: the text, the parsed calls and the whole result."""

    text: str
    tool_calls: tuple[ToolCall, ...]
    result: GenerationResult

    @property
    def finish_reason(self) -> str:
        """``"tool_calls"`` when the answer is a call, else the generation's reason."""
        return "tool_calls" if self.tool_calls else str(self.result.finish_reason)


def parse_tools(tools: object) -> tuple[Tool, ...]:
    """Validate OpenAI's ``tools`` list (``[{"type": "function", "function": {...}}]``).

    :class:`Tool` objects are accepted as they are. Raises :class:`InvalidArgumentError`
    naming the first problem (a JSON schema llguidance cannot compile is reported when
    the constraint is compiled, as :class:`~edge_slm.ConstraintError`).
    """
    if not isinstance(tools, (list, tuple)) or not tools:
        raise InvalidArgumentError("tools must be a non-empty list of function tools")
    out: list[Tool] = []
    for i, item in enumerate(tools):
        if isinstance(item, Tool):
            out.append(item)
            continue
        where = f"tools[{i}]"
        if not isinstance(item, Mapping) or item.get("type") != "function":
            raise InvalidArgumentError(f"{where} must be {{'type': 'function', 'function': ...}}")
        spec = item.get("function")
        if not isinstance(spec, Mapping):
            raise InvalidArgumentError(f"{where}.function must be an object")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"{where}.function.name must be a non-empty string")
        description = spec.get("description") or ""
        if not isinstance(description, str):
            raise InvalidArgumentError(f"{where}.function.description must be a string")
        parameters = spec.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise InvalidArgumentError(f"{where}.function.parameters must be a JSON schema object")
        out.append(Tool(name, description, dict(parameters)))
    names = [t.name for t in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidArgumentError(f"tools: duplicate function names {duplicates}")
    return tuple(out)


def _chosen(tools: Sequence[Tool], tool_choice: object) -> tuple[str, tuple[Tool, ...]]:
    """The choice's kind (``none``, ``auto``, ``required``) and the tools it allows."""
    if tool_choice is None:
        return "auto", tuple(tools)
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise InvalidArgumentError(
                f"tool_choice must be one of {list(TOOL_CHOICES)} or "
                f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}"
            )
        return tool_choice, tuple(tools)
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        spec = tool_choice.get("function")
        name = spec.get("name") if isinstance(spec, Mapping) else None
        named = tuple(t for t in tools if t.name == name)
        if not named:
            raise InvalidArgumentError(
                f"tool_choice names {name!r}, which is not among the tools "
                f"{[t.name for t in tools]}"
            )
        return "required", named
    raise InvalidArgumentError(
        "tool_choice must be 'none', 'auto', 'required' or "
        f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}"
    )


def _call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": dict(t.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {**schema, "x-guidance": CALL_JSON_OPTIONS}


def tool_constraint(tools: Sequence[Tool], tool_choice: object = "auto") -> Constraint | None:
    """The constraint for ``tool_choice``: None for ``"none"``; a :class:`JsonSchema`
    (a call to one of the allowed tools) for ``"required"`` or a named function; for
    ``"auto"`` a Lark :class:`Grammar`: a call, or text whose first character is not
    ``{``."""
    kind, allowed = _chosen(tools, tool_choice)
    if kind == "none":
        return None
    schema = _call_schema(allowed)
    if kind == "required":
        return JsonSchema(schema)
    embedded = json.dumps(schema)
    return Grammar(f"start: call | TEXT\ncall: %json {embedded}\nTEXT: /[^{{][\\s\\S]*/\n")


def tool_prompt(tools: Sequence[Tool], tool_choice: object = "auto") -> str:
    """The system-message text that describes ``tools`` and how to call one."""
    kind, allowed = _chosen(tools, tool_choice)
    lines = ["You can call these tools (one JSON line each):"]
    for t in tools:
        spec = {"name": t.name, "description": t.description, "parameters": dict(t.parameters)}
        lines.append(json.dumps(spec))
    call = 'To call a tool, answer with only {"name": <tool name>, "arguments": {<arguments>}}.'
    lines.append(call)
    if kind == "required" and len(allowed) == 1 and len(tools) > 1:
        lines.append(f"Call the tool {allowed[0].name}.")
    elif kind == "required":
        lines.append("Call one of the tools.")
    elif kind == "auto":
        lines.append("If no tool is needed, answer in plain text.")
    else:
        lines.append("Do not call a tool now; answer in plain text.")
    return "\n".join(lines)


def _call_text(name: str, arguments: Any) -> str:
    if isinstance(arguments, str):  # OpenAI's history carries arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise InvalidArgumentError(
                f"a tool call's arguments are not valid JSON: {arguments!r}"
            ) from None
    return json.dumps({"name": name, "arguments": arguments})


def tool_messages(
    messages: Iterable[Mapping[str, Any]],
    tools: Sequence[Tool] = (),
    tool_choice: object = "auto",
    system_role: bool = True,
) -> list[dict[str, str]]:
    """OpenAI-style messages (with ``role: "tool"`` results and assistant
    ``tool_calls``) as plain ``{"role", "content"}`` messages in this module's format,
    with the tools described in the system message (appended to the first message's
    system text, or a new first system message; with ``system_role=False``, for chat
    formats without one, prepended to the first user message)."""
    out: list[dict[str, str]] = []
    names: dict[str, str] = {}
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidArgumentError(f"messages[{i}] must be a dict")
        role, content = message.get("role"), message.get("content")
        content = "" if content is None else content
        if not isinstance(content, str):
            raise InvalidArgumentError(f"messages[{i}]['content'] must be a str")
        if role == "tool":
            call_id = message.get("tool_call_id")
            name = message.get("name") or names.get(str(call_id), "")
            label = f"Tool result ({name})" if name else "Tool result"
            out.append({"role": "user", "content": f"{label}: {content}"})
            continue
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                raise InvalidArgumentError(f"messages[{i}]['tool_calls'] must be a list")
            texts = [content] if content else []
            for call in calls:
                spec = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
                    raise InvalidArgumentError(
                        f"messages[{i}]: a tool call needs 'function': {{'name', 'arguments'}}"
                    )
                names[str(call.get("id"))] = spec["name"]
                texts.append(_call_text(spec["name"], spec.get("arguments") or {}))
            out.append({"role": "assistant", "content": "\n".join(texts)})
            continue
        out.append({"role": str(role), "content": content})
    if not tools:
        return out
    prompt = tool_prompt(tools, tool_choice)
    if out and out[0]["role"] == "system":
        head = out[0]["content"]
        out[0] = {"role": "system", "content": f"{head}\n\n{prompt}" if head else prompt}
    elif system_role:
        out.insert(0, {"role": "system", "content": prompt})
    else:
        first = next((m for m in out if m["role"] == "user"), None)
        if first is None:
            raise InvalidArgumentError("messages need a user message to describe the tools in")
        first["content"] = f"{prompt}\n\n{first['content']}"
    return out


def parse_tool_call(text: str, tools: Sequence[Tool]) -> ToolCall | None:
    """The call ``text`` makes (a JSON object naming one of ``tools``), else None."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or set(data) != {"name", "arguments"}:
        return None
    if data["name"] not in {t.name for t in tools} or not isinstance(data["arguments"], dict):
        return None
    return ToolCall(data["name"], data["arguments"])


def chat_with_tools(
    model: TextGenerator,
    messages: Sequence[Mapping[str, Any]],
    tools: object,
    tool_choice: object = "auto",
    **options: Any,
) -> ToolChatResult:
    """Answer ``messages`` with ``tools`` available; the call, if any, is parsed.

    ``tool_choice``: ``"auto"`` (a call or plain text), ``"required"`` (a call to one
    of the tools), ``{"type": "function", "function": {"name": ...}}`` (a call to that
    one) or ``"none"`` (plain text, unconstrained). ``options`` are the usual generation
    options (``temperature``, ``seed``, ``max_new_tokens``...); ``constraint`` is not
    allowed, the tools set it. A call is reported only when the generation completed
    (finish reason ``constraint`` or ``stop_token``): a call cut by ``max_new_tokens``
    stays text with finish reason ``length``.

    Raises:
        InvalidArgumentError: malformed tools, tool_choice or messages.
        ConstraintError: a tool's parameters schema cannot be compiled, or llguidance
            is missing (``pip install 'edge-slm[structured]'``).
    """
    if "constraint" in options:
        raise InvalidArgumentError("chat_with_tools sets the constraint itself")
    parsed = parse_tools(tools)
    constraint = tool_constraint(parsed, tool_choice)
    chat_format = getattr(model, "chat_format", None)
    system_role = chat_format is None or "system" in chat_format.roles
    plain = tool_messages(messages, parsed, tool_choice, system_role)
    if constraint is not None:
        options["constraint"] = constraint
    result = model.chat(plain, **options)
    call = None
    if constraint is not None and result.finish_reason in COMPLETE:
        call = parse_tool_call(result.text, parsed)
    return ToolChatResult(result.text, (call,) if call else (), result)
