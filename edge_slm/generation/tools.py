"""Tool calls: the model answers with calls to tools (OpenAI's function schema) and
their arguments, constrained so that every call parses and validates.

A chat call takes ``tools=`` (``model.chat``, ``model.stream_chat`` and the same on a
:class:`~edge_slm.generation.conversation.Conversation`); :meth:`ToolUse.resolve` turns
the tools, ``tool_choice``, ``parallel_tool_calls`` and ``tool_format`` into the prompt's
token ids, the constraint on the answer and the parser of its calls.

When the bundle's raw chat template supports tools in the ``<tool_call>`` format
(Qwen2.5's, Hermes'; :func:`~edge_slm.text.chat_format.template_supports_tools`), the
chat is rendered by that template with its ``tools`` variable (as transformers'
``apply_chat_template(messages, tools=tools)`` renders it; needs jinja2), and a call is
``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``, the syntax the model
was trained on; parallel calls are such blocks joined by ``\n``, as the template writes
several calls of one turn. Otherwise (SmolLM2's template, or ``tool_format="plain"``)
the plain format is used, the same for every bundle (docs/structured-output.md, "Tool
calls"):

* the tools are described in the system message (:func:`tool_prompt`): one JSON line
  per tool, and how to call one;
* a call is one JSON object ``{"name": <tool name>, "arguments": {...}}`` on one line,
  and an answer that calls is only calls, one per line;
* earlier calls in the history (assistant messages with ``tool_calls``) are rendered as
  those lines, and tool results (``role: "tool"``) as user messages
  ``Tool result (<name>): <content>``.

``tool_choice`` decides the constraint (:func:`tool_constraint`, a Lark grammar whose
calls embed a JSON schema, ``anyOf`` over the allowed tools, each
``{"name": {"const": ...}, "arguments": <its parameters>}``): ``"required"`` or a named
function constrain the answer to calls; ``"auto"`` allows calls or plain text that does
not start as a call does (``{``, or ``<`` in the template format); ``"none"`` adds no
constraint (the tools are still described). ``parallel_tool_calls`` (default True, as
OpenAI's) allows one or more calls per answer; False allows exactly one.

Nothing here imports llguidance: the constraint objects are compiled by the generation
call, like any other constraint.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_slm.errors import InvalidArgumentError
from edge_slm.generation import limits
from edge_slm.generation.constraints import Constraint, Grammar
from edge_slm.generation.results import ToolCall
from edge_slm.text.chat_format import render_chat_with_tools, template_supports_tools
from edge_slm.text.inputs import check_text
from edge_slm.text.safe_chat import special_token_strings
from edge_slm.text.stops import FinishReason

if TYPE_CHECKING:
    from edge_slm.generation.model import TextGenerator

__all__ = [
    "Tool",
    "ToolCall",
    "ToolUse",
    "check_no_tool_messages",
    "parse_tool_calls",
    "parse_tools",
    "template_messages",
    "template_tools",
    "tool_constraint",
    "tool_messages",
    "tool_prompt",
]

TOOL_CHOICES = ("none", "auto", "required")
TOOL_FORMATS = ("auto", "template", "plain")
CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
"""The template format's call markers (Qwen2.5's template, Hermes' format)."""
CALL_SEPARATOR = "\n"
"""Between two calls of one answer, in both formats (a call's JSON holds no newline)."""
COMPLETE = (FinishReason.CONSTRAINT, FinishReason.STOP_TOKEN)
MAX_TOOL_CALLS = 8
"""Calls one answer may make with ``parallel_tool_calls``: a small model that keeps
repeating calls ends with eight valid ones instead of a call cut by the token limit."""
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
    tools: Sequence[Tool],
    tool_choice: object = "auto",
    tagged: bool = False,
    parallel: bool = True,
) -> Constraint | None:
    """The constraint for ``tool_choice`` (None for ``"none"``): a Lark :class:`Grammar`.

    ``"required"`` or a named function: the answer is calls to the allowed tools;
    ``"auto"``: calls, or text whose first character is not the one a call starts with.
    A call is the tool-call JSON (``%json``); with ``tagged`` (a template's own tool
    format) it is wrapped as ``<tool_call>\n<call JSON>\n</tool_call>``. With
    ``parallel`` an answer holds one or more calls joined by ``\n``, else exactly one.
    """
    kind, allowed = _chosen(tools, tool_choice)
    if kind == "none":
        return None
    options = TEMPLATE_CALL_JSON_OPTIONS if tagged else CALL_JSON_OPTIONS
    rules = [f"call: %json {json.dumps(_call_schema(allowed, options))}"]
    one = "call"
    if tagged:
        rules.append(f"tagged: {json.dumps(CALL_OPEN)} call {json.dumps(CALL_CLOSE)}")
        one = "tagged"
    more = f" ({json.dumps(CALL_SEPARATOR)} {one}){{0,{MAX_TOOL_CALLS - 1}}}" if parallel else ""
    rules.insert(0, f"calls: {one}{more}")
    if kind == "required":
        return Grammar("\n".join(["start: calls", *rules]) + "\n")
    first = "<" if tagged else "{"
    text = f"TEXT: /[^{first}][\\s\\S]*/"
    return Grammar("\n".join(["start: calls | TEXT", *rules, text]) + "\n")


def tool_prompt(tools: Sequence[Tool], tool_choice: object = "auto", parallel: bool = True) -> str:
    """The system-message text of the plain format: ``tools`` and how to call them."""
    kind, allowed = _chosen(tools, tool_choice)
    lines = ["You can call these tools (one JSON line each):"]
    for t in tools:
        spec = {"name": t.name, "description": t.description, "parameters": dict(t.parameters)}
        lines.append(json.dumps(spec))
    call = 'To call a tool, answer with only {"name": <tool name>, "arguments": {<arguments>}}'
    lines.append(call + (", one line per call." if parallel else "."))
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
    parallel: bool = True,
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
            out.append({"role": "assistant", "content": CALL_SEPARATOR.join(texts)})
            continue
        out.append({"role": str(role), "content": content})
    if not tools:
        return out
    prompt = tool_prompt(tools, tool_choice, parallel)
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


def check_no_tool_messages(messages: object) -> None:
    """Refuse tool calls and tool results in a chat without tools: they render only in
    the tool format of the tools they came from (InvalidArgumentError saying so).
    Anything but a list of messages is left to the chat's own validation."""
    if not isinstance(messages, (list, tuple)):
        return
    for i, message in enumerate(messages):
        if isinstance(message, Mapping) and (
            message.get("role") == "tool" or message.get("tool_calls")
        ):
            raise InvalidArgumentError(
                f"messages[{i}] is a tool call or a tool result: pass the tools "
                "(tools=...) the conversation uses"
            )


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


def _template_for(model: TextGenerator, tool_format: object) -> str | None:
    """The raw chat template to render tools with, or None for the plain format."""
    if tool_format not in TOOL_FORMATS:
        raise InvalidArgumentError(
            f"tool_format must be one of {list(TOOL_FORMATS)}, got {tool_format!r}"
        )
    template = model.manifest.chat_template
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


def _parse_call(text: str, names: set[str]) -> ToolCall | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or set(data) != {"name", "arguments"}:
        return None
    if data["name"] not in names or not isinstance(data["arguments"], dict):
        return None
    return ToolCall(data["name"], data["arguments"])


def parse_tool_calls(
    text: str, tools: Sequence[Tool], tagged: bool = False
) -> tuple[ToolCall, ...]:
    """The calls ``text`` is made of (each a JSON object naming one of ``tools``; with
    ``tagged``, each inside ``<tool_call>\\n`` ... ``\\n</tool_call>``; joined by
    ``\\n``), or ``()`` when ``text`` is anything else (plain text, a cut call). Each
    call gets its own id."""
    body = text.strip()
    if tagged:
        if not (body.startswith(CALL_OPEN) and body.endswith(CALL_CLOSE)):
            return ()
        inner = body[len(CALL_OPEN) : -len(CALL_CLOSE)]
        parts = inner.split(CALL_CLOSE + CALL_SEPARATOR + CALL_OPEN)
    else:
        parts = body.split(CALL_SEPARATOR)
    names = {t.name for t in tools}
    calls = [_parse_call(part, names) for part in parts]
    return tuple(c for c in calls if c is not None) if all(calls) else ()


@dataclass(frozen=True)
class ToolUse:
    """The tools offered to one chat call, resolved against a model: the format, the
    constraint on the answer, the prompt's token ids and the parser of the answer's calls.

    Made by :meth:`resolve`; the chat calls (``tools=``) make one per call, and the
    server makes one to check a request and count its prompt before generating.
    """

    tools: tuple[Tool, ...]
    """The tools, parsed."""
    tool_dicts: tuple[Mapping[str, Any], ...]
    """The tools as a chat template's ``tools`` variable receives them."""
    tool_choice: object
    parallel: bool
    template: str | None
    """The raw chat template rendering the tools (template format), or None (plain)."""
    constraint: Constraint | None = field(hash=False)
    """The answer's constraint (None for ``tool_choice="none"``)."""

    @classmethod
    def resolve(
        cls,
        model: TextGenerator,
        tools: object,
        tool_choice: object = "auto",
        parallel_tool_calls: bool = True,
        tool_format: str = "auto",
    ) -> ToolUse:
        """Check the arguments of a chat call with tools and pick the format.

        ``tool_choice``: ``"auto"`` (calls or plain text), ``"required"`` (calls to the
        tools), ``{"type": "function", "function": {"name": ...}}`` (calls to that one)
        or ``"none"`` (plain text, unconstrained). ``parallel_tool_calls``: one or more
        calls per answer (True) or exactly one (False). ``tool_format``: ``"auto"``
        renders through the bundle's chat template when it supports tools
        (``<tool_call>`` format, e.g. Qwen2.5) and jinja2 is installed, else the plain
        format; ``"template"`` insists on the template; ``"plain"`` never uses it.

        Raises:
            InvalidArgumentError: malformed tools, tool_choice, parallel_tool_calls or
                tool_format (or ``"template"`` for a template without tool support).
        """
        parsed = parse_tools(tools)
        if not isinstance(parallel_tool_calls, bool):
            raise InvalidArgumentError(
                f"parallel_tool_calls must be True or False, got {parallel_tool_calls!r}"
            )
        template = _template_for(model, tool_format)
        constraint = tool_constraint(parsed, tool_choice, template is not None, parallel_tool_calls)
        return cls(
            parsed,
            tuple(template_tools(tools, parsed)),
            "auto" if tool_choice is None else tool_choice,
            parallel_tool_calls,
            template,
            constraint,
        )

    def prompt_ids(self, model: TextGenerator, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of ``messages`` (OpenAI-style, with ``tool`` results and assistant
        ``tool_calls``) and the tools, with the generation prompt.

        Message and tool text cannot forge special tokens: the plain format encodes it
        as :meth:`TextGenerator.chat_ids` does; the template format refuses it
        (:class:`InvalidArgumentError`) unless the model was loaded with
        ``LoadOptions(chat_special_tokens=True)``.
        """
        if self.template is None:
            chat_format = model.chat_format
            system_role = chat_format is None or "system" in chat_format.roles
            plain = tool_messages(
                messages, self.tools, self.tool_choice, system_role, self.parallel
            )
            return model.chat_ids(plain)
        shaped = template_messages(messages)
        schemas = [dict(t) for t in self.tool_dicts]
        tokens = model.manifest.special_tokens
        strings = {"bos_token": tokens.bos_token or "", "eos_token": tokens.eos_token or ""}
        text = render_chat_with_tools(shaped, self.template, schemas, True, strings)
        if not model.chat_special_tokens:
            typed = json.dumps([shaped, schemas], ensure_ascii=False, default=str)
            found = next(
                (t for t in special_token_strings(model.tokenizer) if t and t in typed), None
            )
            if found is not None:
                raise InvalidArgumentError(
                    f"a message or tool contains the special token text {found!r}; remove it, "
                    "or load with LoadOptions(chat_special_tokens=True) if the caller is trusted"
                )
        return model.encode(text, add_special_tokens=False)

    def calls(self, text: str, finish_reason: FinishReason | None) -> tuple[ToolCall, ...]:
        """The calls a finished answer makes: ``()`` for plain text, for
        ``tool_choice="none"``, or for an answer that did not complete (``length``,
        ``deadline``: a cut call stays text).

        A call repeating an earlier one of the same answer (same name and arguments) is
        dropped: small models, SmolLM2-135M among them, tend to write the same call
        again and again, and running it twice (a booking) would be wrong.
        """
        if self.constraint is None or finish_reason not in COMPLETE:
            return ()
        seen: set[str] = set()
        out = []
        for call in parse_tool_calls(text, self.tools, tagged=self.template is not None):
            key = json.dumps([call.name, call.arguments], sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(call)
        return tuple(out)
