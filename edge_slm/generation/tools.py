"""Tool calls: the model picks one of several tools (OpenAI's function schema) and its
arguments, constrained so that the call always parses and validates.

When the bundle's raw chat template supports tools in the ``<tool_call>`` format
(Qwen2.5's, Hermes'; :func:`~edge_slm.text.chat_format.template_supports_tools`), the
chat is rendered by that template with its ``tools`` variable (as transformers'
``apply_chat_template(messages, tools=tools)`` renders it; needs jinja2), and a call is
``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``, the syntax the model
was trained on. Otherwise (SmolLM2's template, or ``tool_format="plain"``) the plain
format is used, the same for every bundle (docs/structured-output.md, "Tool calls"):

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

import importlib.util
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_slm.errors import InvalidArgumentError
from edge_slm.generation import limits
from edge_slm.generation.constraints import Constraint, Grammar, JsonSchema
from edge_slm.generation.options import GenerationOptions
from edge_slm.text.chat_format import render_chat_with_tools, template_supports_tools
from edge_slm.text.inputs import check_text
from edge_slm.text.safe_chat import special_token_strings
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
    "template_messages",
    "template_tools",
    "tool_constraint",
    "tool_messages",
]

TOOL_CHOICES = ("none", "auto", "required")
TOOL_FORMATS = ("auto", "template", "plain")
CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
"""The template format's call markers (Qwen2.5's template, Hermes' format)."""
COMPLETE = (FinishReason.CONSTRAINT, FinishReason.STOP_TOKEN)
CALL_JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": "[ ]?"}
"""A call's JSON allows at most one space between two JSON tokens (``{"name": "f"}``,
as the prompt shows it, or ``{"name":"f"}``): a small model cannot spend its token
budget on whitespace inside a call."""
TEMPLATE_CALL_JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
"""In a template's ``<tool_call>`` format the call's JSON is spaced exactly as the
template writes earlier calls (``tojson``: ``{"name": "f", "arguments": {"a": 1}}``)."""


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
    limits.check_length("tools", tools, limits.MAX_TOOLS, "MAX_TOOLS")
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


def _call_schema(
    tools: Sequence[Tool], options: Mapping[str, Any] = CALL_JSON_OPTIONS
) -> dict[str, Any]:
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
    return {**schema, "x-guidance": dict(options)}


def tool_constraint(
    tools: Sequence[Tool], tool_choice: object = "auto", tagged: bool = False
) -> Constraint | None:
    """The constraint for ``tool_choice``: None for ``"none"``; a :class:`JsonSchema`
    (a call to one of the allowed tools) for ``"required"`` or a named function; for
    ``"auto"`` a Lark :class:`Grammar`: a call, or text whose first character is not
    ``{``. With ``tagged`` (a template's own tool format), the call is wrapped as
    ``<tool_call>\n<call JSON>\n</tool_call>`` (a Lark grammar), and ``"auto"``'s text
    may not start with ``<``."""
    kind, allowed = _chosen(tools, tool_choice)
    if kind == "none":
        return None
    schema = _call_schema(allowed, TEMPLATE_CALL_JSON_OPTIONS if tagged else CALL_JSON_OPTIONS)
    embedded = json.dumps(schema)
    if not tagged:
        if kind == "required":
            return JsonSchema(schema)
        return Grammar(f"start: call | TEXT\ncall: %json {embedded}\nTEXT: /[^{{][\\s\\S]*/\n")
    call = (
        f"tagged: {json.dumps(CALL_OPEN)} call {json.dumps(CALL_CLOSE)}\ncall: %json {embedded}\n"
    )
    if kind == "required":
        return Grammar(f"start: tagged\n{call}")
    return Grammar(f"start: tagged | TEXT\n{call}TEXT: /[^<][\\s\\S]*/\n")


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


def template_tools(tools: object, parsed: Sequence[Tool]) -> list[dict[str, Any]]:
    """The ``tools`` variable of a chat template: OpenAI's tool dicts as the caller gave
    them (as transformers passes them), :class:`Tool` objects in that shape."""
    given = list(tools) if isinstance(tools, (list, tuple)) else []
    out: list[dict[str, Any]] = []
    for item, tool in zip(given, parsed, strict=True):
        if isinstance(item, Mapping):
            out.append(dict(item))
            continue
        spec = {"name": tool.name, "description": tool.description}
        out.append({"type": "function", "function": {**spec, "parameters": dict(tool.parameters)}})
    return out


def template_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style messages checked and shaped for a chat template with tool support
    (what transformers' ``apply_chat_template`` expects): ``system``, ``user``,
    ``assistant`` (optionally with ``tool_calls``, whose JSON-text ``arguments`` become
    objects) and ``tool`` messages (``content``, with ``tool_call_id``/``name`` kept)."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidArgumentError(f"messages[{i}] must be a dict")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidArgumentError(
                f"messages[{i}]['role'] is {role!r}; with tools the roles are "
                "'system', 'user', 'assistant' and 'tool'"
            )
        calls = message.get("tool_calls")
        if content is None and not (role == "assistant" and calls):
            content = ""
        if content is not None:
            check_text(content, f"messages[{i}]['content']")
        shaped: dict[str, Any] = {"role": role, "content": content}
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(message.get(key), str):
                    shaped[key] = message[key]
        elif calls:
            if role != "assistant" or not isinstance(calls, list):
                raise InvalidArgumentError(
                    f"messages[{i}]['tool_calls'] must be a list, on an assistant message"
                )
            shaped["tool_calls"] = [_template_call(i, call) for call in calls]
        out.append(shaped)
    if not out:
        raise InvalidArgumentError("messages must contain at least one message, got []")
    return out


def _template_call(i: int, call: object) -> dict[str, Any]:
    spec = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise InvalidArgumentError(
            f"messages[{i}]: a tool call needs 'function': {{'name', 'arguments'}}"
        )
    arguments = json.loads(_call_text(spec["name"], spec.get("arguments") or {}))["arguments"]
    assert isinstance(call, Mapping)
    shaped: dict[str, Any] = {"type": "function"}
    if isinstance(call.get("id"), str):
        shaped["id"] = call["id"]
    shaped["function"] = {"name": spec["name"], "arguments": arguments}
    return shaped


def _uses_template(model: object, tool_format: object) -> str | None:
    """The raw chat template to render tools with, or None for the plain format."""
    if tool_format not in TOOL_FORMATS:
        raise InvalidArgumentError(
            f"tool_format must be one of {list(TOOL_FORMATS)}, got {tool_format!r}"
        )
    template = getattr(getattr(model, "manifest", None), "chat_template", None)
    supported = isinstance(template, str) and template_supports_tools(template)
    if tool_format == "plain":
        return None
    if tool_format == "template":
        if not supported:
            raise InvalidArgumentError(
                "tool_format='template': this bundle's chat template does not render "
                "tools in the <tool_call> format"
            )
        return template
    if supported and importlib.util.find_spec("jinja2") is not None:
        return template
    return None


def parse_tool_call(text: str, tools: Sequence[Tool], tagged: bool = False) -> ToolCall | None:
    """The call ``text`` makes (a JSON object naming one of ``tools``; with ``tagged``,
    inside ``<tool_call>`` ... ``</tool_call>``), else None."""
    stripped = text.strip()
    if tagged:
        head, tail = CALL_OPEN.strip(), CALL_CLOSE.strip()
        if not (stripped.startswith(head) and stripped.endswith(tail)):
            return None
        stripped = stripped[len(head) : -len(tail)].strip()
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
    tool_format: str = "auto",
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

    ``tool_format``: ``"auto"`` renders through the bundle's chat template when it
    supports tools (``<tool_call>`` format, e.g. Qwen2.5) and jinja2 is installed, else
    the plain format; ``"template"`` insists on the template (InvalidArgumentError if
    it has no tool support); ``"plain"`` always uses the plain format.

    Raises:
        InvalidArgumentError: malformed tools, tool_choice or messages.
        ConstraintError: a tool's parameters schema cannot be compiled, or llguidance
            is missing (``pip install 'edge-slm[structured]'``).
    """
    if "constraint" in options:
        raise InvalidArgumentError("chat_with_tools sets the constraint itself")
    parsed = parse_tools(tools)
    template = _uses_template(model, tool_format)
    if template is not None:
        return _chat_with_template(model, template, messages, tools, parsed, tool_choice, options)
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


def _chat_with_template(
    model: TextGenerator,
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: object,
    parsed: Sequence[Tool],
    tool_choice: object,
    options: dict[str, Any],
) -> ToolChatResult:
    """:func:`chat_with_tools` through the bundle's own template and call syntax."""
    constraint = tool_constraint(parsed, tool_choice, tagged=True)
    shaped = template_messages(messages)
    schemas = template_tools(tools, parsed)
    tokens = model.manifest.special_tokens
    strings = {"bos_token": tokens.bos_token or "", "eos_token": tokens.eos_token or ""}
    text = render_chat_with_tools(shaped, template, schemas, True, strings)
    if not getattr(model, "chat_special_tokens", False):
        # Caller text must not forge special tokens (as TextGenerator.chat_ids ensures).
        typed = json.dumps([shaped, schemas], ensure_ascii=False, default=str)
        found = next((t for t in special_token_strings(model.tokenizer) if t and t in typed), None)
        if found is not None:
            raise InvalidArgumentError(
                f"a message or tool contains the special token text {found!r}; remove it, or "
                "load with LoadOptions(chat_special_tokens=True) if the caller is trusted"
            )
    ids = model.encode(text, add_special_tokens=False)
    if constraint is not None:
        options["constraint"] = constraint
    config = model.decode_config(GenerationOptions.build(None, options))
    with model.conversation() as conversation:
        result = conversation._collect(ids, config)
    call = None
    if constraint is not None and result.finish_reason in COMPLETE:
        call = parse_tool_call(result.text, parsed, tagged=True)
    return ToolChatResult(result.text, (call,) if call else (), result)
