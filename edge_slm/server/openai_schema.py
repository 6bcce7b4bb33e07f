"""OpenAI request bodies -> the runtime's options, validated, with OpenAI's error fields.

Policy for fields (docs/server.md, "Request fields"):

* implemented fields are validated (type and range) and mapped to
  :class:`edge_slm.GenerationOptions` names;
* harmless OpenAI fields that only label or route a request (``user``, ``metadata``,
  ``store``, ``service_tier``, ...) are accepted and ignored (:data:`IGNORED`);
* OpenAI fields whose default we honour are accepted only at that default
  (``tools: []``, ``echo: false``, ...);
* ``response_format`` (``text``, ``json_object``, ``json_schema``, and the extensions
  ``regex`` and ``grammar``) becomes a generation ``constraint``
  (docs/structured-output.md); ``tools``, ``tool_choice`` and ``parallel_tool_calls``
  are checked here and handed to the runtime's chat call, which renders the messages
  (``role: "tool"``, assistant ``tool_calls``) in the bundle's tool format and
  constrains and parses the calls (edge_slm/generation/tools.py);
* anything else is refused with a 400 naming the field: a request is never silently
  answered differently from what it asked for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_slm.encoders.entities import AGGREGATIONS
from edge_slm.errors import InvalidArgumentError
from edge_slm.generation.constraints import Constraint, Grammar, JsonSchema, Regex
from edge_slm.generation.tools import check_no_tool_messages, parse_tools, tool_constraint
from edge_slm.server.errors import ApiError, bad_request

IGNORED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
    }
)
"""OpenAI fields accepted and ignored: they label or route a request, never change an answer."""

EXTENSIONS = ("top_k", "min_p", "typical_p", "repetition_penalty")
"""Our sampler fields beyond OpenAI's, accepted in the same body (as llama.cpp's server does)."""

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class Job:
    """One generation: a chat (messages) or a plain prompt, and its choice index."""

    index: int
    seed_offset: int
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class CompletionRequest:
    """A validated /v1/chat/completions or /v1/completions request."""

    chat: bool
    model: str | None
    jobs: tuple[Job, ...]
    options: dict[str, Any]
    max_tokens: int | None
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    tools: tuple[dict[str, Any], ...] = ()
    """OpenAI's ``tools`` as given (empty: none)."""
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True

    @property
    def tool_args(self) -> dict[str, Any]:
        """The keyword arguments of the runtime's ``stream_chat`` for the tools."""
        if not self.tools:
            return {}
        return {
            "tools": list(self.tools),
            "tool_choice": self.tool_choice,
            "parallel_tool_calls": self.parallel_tool_calls,
        }

    @property
    def may_call(self) -> bool:
        """Whether an answer may be tool calls (tools given, ``tool_choice`` not none)."""
        return bool(self.tools) and self.tool_choice != "none"


@dataclass(frozen=True)
class EncoderRequest:
    """A validated /v1/embeddings or /v1/classifications request."""

    model: str | None
    texts: tuple[str, ...]
    single: bool
    encoding_format: str = "float"
    dimensions: int | None = None
    top_k: int | None = None
    threshold: float | None = None
    aggregation: str | None = None
    ignore_labels: tuple[str, ...] | None = None


# ------------------------------------------------------------------ field checks
def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low:g} and {high:g}, got {value!r}", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise bad_request(f"'{name}' must be {allowed}, got {value}", name)
    return value


def _boolean(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _model(body: Mapping[str, Any]) -> str | None:
    value = body.get("model")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad_request(f"'model' must be a string, got {value!r}", "model")
    return value


def _only_default(body: Mapping[str, Any], name: str, allowed: Sequence[Any], why: str) -> None:
    """Accept ``name`` only at a value we honour (its OpenAI default)."""
    if name in body and body[name] not in allowed:
        raise bad_request(f"'{name}' is not supported by this server ({why})", name, "unsupported")


def _check_unknown(body: Mapping[str, Any], known: frozenset[str]) -> None:
    for name in body:
        if name not in known and name not in IGNORED:
            raise bad_request(
                f"unknown or unsupported field '{name}' (see docs/server.md for the fields "
                "this server implements)",
                name,
                "unsupported",
            )


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_request("'stop' must be a non-empty string or a list of them", "stop")
    if len(items) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(items)


def _logit_bias(body: Mapping[str, Any], vocab_size: int) -> dict[int, float] | None:
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("'logit_bias' must map token ids (strings) to biases", "logit_bias")
    bias: dict[int, float] = {}
    for key, amount in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad_request(
                f"'logit_bias' keys are token ids, got {key!r}", "logit_bias"
            ) from None
        if not 0 <= token < vocab_size:
            raise bad_request(
                f"'logit_bias' token id {token} is outside the vocabulary [0, {vocab_size})",
                "logit_bias",
            )
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise bad_request(f"'logit_bias' values are numbers, got {amount!r}", "logit_bias")
        if not -100 <= amount <= 100:
            raise bad_request(
                f"'logit_bias' values must be between -100 and 100, got {amount}", "logit_bias"
            )
        bias[token] = float(amount)
    return bias or None


def _content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(
                    f"messages[{index}]: content part of type {kind!r} is not supported "
                    "(text only)",
                    f"messages[{index}].content",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(
                    f"messages[{index}]: a text part needs a string 'text'",
                    f"messages[{index}].content",
                )
            texts.append(text)
        return "".join(texts)
    raise bad_request(
        f"messages[{index}]: 'content' must be a string or a list of text parts",
        f"messages[{index}].content",
    )


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(
                f"messages[{i}]: role {role!r} is not supported; allowed: {', '.join(ROLES)}",
                f"messages[{i}].role",
            )
        if message.get("function_call"):
            raise bad_request(
                f"messages[{i}]: 'function_call' is not supported (use 'tool_calls')",
                f"messages[{i}]",
            )
        calls = message.get("tool_calls")
        if calls and role != "assistant":
            raise bad_request(
                f"messages[{i}]: only assistant messages carry 'tool_calls'", f"messages[{i}]"
            )
        # OpenAI's "developer" role is the system role of newer models.
        plain: dict[str, Any] = {"role": "system" if role == "developer" else role}
        if calls or (role == "assistant" and message.get("content") is None):
            plain["content"] = "" if message.get("content") is None else _content(message, i)
        else:
            plain["content"] = _content(message, i)
        if calls:
            plain["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if role == "tool" and isinstance(message.get(key), str):
                plain[key] = message[key]
        out.append(plain)
    return out


def _tools(body: Mapping[str, Any]) -> tuple[tuple[dict[str, Any], ...], Any, bool]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` (OpenAI's shapes), validated."""
    value, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request(
            f"'parallel_tool_calls' must be true or false, got {parallel!r}", "parallel_tool_calls"
        )
    if not value:
        if choice not in (None, "none", "auto"):
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        return (), "auto", True
    try:
        tools = parse_tools(value)
    except InvalidArgumentError as error:
        raise bad_request(str(error), "tools") from None
    try:
        tool_constraint(tools, choice)  # checks the choice
    except InvalidArgumentError as error:
        raise bad_request(str(error), "tool_choice") from None
    return tuple(value), "auto" if choice is None else choice, parallel is not False


def _prompts(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("prompt")
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise bad_request(
        "'prompt' must be a string or a non-empty list of strings (token-id prompts are "
        "not supported)",
        "prompt",
    )


# ------------------------------------------------------------------ requests
_SAMPLING = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "logit_bias",
        "logprobs",
        "presence_penalty",
        "frequency_penalty",
        *EXTENSIONS,
    }
)
_CHAT_FIELDS = _SAMPLING | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "modalities",
}
_COMPLETION_FIELDS = _SAMPLING | {"prompt", "echo", "best_of", "suffix", "response_format"}
RESPONSE_FORMATS = ("text", "json_object", "json_schema", "regex", "grammar")


def _response_format(body: Mapping[str, Any]) -> Constraint | None:
    """``response_format`` as a constraint (None: free text).

    ``json_object`` is any JSON object; ``json_schema`` is OpenAI's
    ``{"json_schema": {"name": ..., "schema": {...}, "strict": ...}}`` (the schema is
    always enforced, strict or not); ``{"type": "regex", "regex": "..."}`` and
    ``{"type": "grammar", "grammar": "..."}`` (Lark or GBNF) are our extensions.
    """
    value = body.get("response_format")
    if value is None:
        return None
    name = "response_format"
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        raise bad_request(
            f"'{name}' must be an object whose 'type' is one of {list(RESPONSE_FORMATS)}", name
        )
    kind = value["type"]
    if kind == "json_object":
        return JsonSchema()
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request(f"'{name}.json_schema' must be an object", name)
        schema = spec.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise bad_request(f"'{name}.json_schema.schema' must be an object", name)
        return JsonSchema(schema)
    if kind in ("regex", "grammar"):
        text = value.get(kind)
        if not isinstance(text, str) or not text:
            raise bad_request(f"'{name}.{kind}' must be a non-empty string", name)
        return Regex(text) if kind == "regex" else Grammar(text)
    return None


def parse_completion(
    body: Mapping[str, Any], *, chat: bool, vocab_size: int, max_n: int
) -> CompletionRequest:
    """Validate a chat or text completion body; ``vocab_size`` bounds ``logit_bias``."""
    _check_unknown(body, _CHAT_FIELDS if chat else _COMPLETION_FIELDS)
    if chat:
        _only_default(body, "functions", [None, []], "use 'tools'")
        _only_default(body, "function_call", [None, "none", "auto"], "use 'tool_choice'")
        _only_default(body, "modalities", [None, ["text"]], "text answers only")
    else:
        _only_default(body, "echo", [None, False], "the prompt is not echoed")
        _only_default(body, "suffix", [None, ""], "no insertion")
    n = _integer(body, "n", 1, max_n) or 1
    if not chat:
        best_of = _integer(body, "best_of", 1)
        if best_of is not None and best_of != n:
            raise bad_request("'best_of' other than n is not supported", "best_of", "unsupported")
    max_tokens = _integer(body, "max_tokens", 1)
    if chat:
        alias = _integer(body, "max_completion_tokens", 1)
        if alias is not None and max_tokens is not None and alias != max_tokens:
            raise bad_request(
                "'max_tokens' and 'max_completion_tokens' disagree", "max_completion_tokens"
            )
        max_tokens = alias if alias is not None else max_tokens
    stream = _boolean(body, "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options")
        if not stream:
            raise bad_request("'stream_options' needs 'stream': true", "stream_options")
        include_usage = bool(stream_options.get("include_usage", False))
    if chat:
        logprobs = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        top_logprobs = top or 0
    else:
        # /v1/completions: logprobs is the number of alternatives (null = none).
        top = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        logprobs, top_logprobs = top is not None, top or 0
    seed = _integer(body, "seed", 0)
    options: dict[str, Any] = {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0),
        "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0) or 0.0,
        "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0) or 0.0,
        "top_k": _integer(body, "top_k", 0),
        "min_p": _number(body, "min_p", 0.0, 1.0),
        "typical_p": _number(body, "typical_p", 0.0, 1.0),
        "repetition_penalty": _number(body, "repetition_penalty", 0.0, 10.0),
        "stop": _stop(body),
        "logit_bias": _logit_bias(body, vocab_size),
        "logprobs": top_logprobs if logprobs else None,  # None: none computed
        "constraint": _response_format(body),
    }
    options = {k: v for k, v in options.items() if v is not None}
    tools: tuple[dict[str, Any], ...] = ()
    choice: Any = "auto"
    parallel = True
    if chat:
        tools, choice, parallel = _tools(body)
        if tools and choice != "none" and "constraint" in options:
            raise bad_request(
                "'response_format' cannot be combined with 'tools' (use tool_choice "
                "'none' for a formatted answer)",
                "response_format",
            )
        messages = tuple(_messages(body))
        if not tools:
            try:
                check_no_tool_messages(messages)
            except InvalidArgumentError as error:
                raise bad_request(str(error), "messages") from None
        jobs = tuple(Job(i, i, messages=messages) for i in range(n))
    else:
        prompts = _prompts(body)
        jobs = tuple(
            Job(p * n + i, i, prompt=prompt) for p, prompt in enumerate(prompts) for i in range(n)
        )
    return CompletionRequest(
        chat=chat,
        model=_model(body),
        jobs=jobs,
        options=options,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        seed=seed,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
    )


def _texts(body: Mapping[str, Any]) -> tuple[tuple[str, ...], bool]:
    value = body.get("input")
    if isinstance(value, str):
        texts: tuple[str, ...] = (value,)
        single = True
    elif isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        texts, single = tuple(value), False
    else:
        raise bad_request(
            "'input' must be a string or a non-empty list of strings (token-id inputs are "
            "not supported)",
            "input",
        )
    if any(not t for t in texts):
        raise bad_request("'input' must not contain empty strings", "input")
    return texts, single


def parse_embeddings(body: Mapping[str, Any], max_inputs: int) -> EncoderRequest:
    """Validate a /v1/embeddings body."""
    _check_unknown(body, frozenset({"model", "input", "encoding_format", "dimensions"}))
    texts, single = _texts(body)
    if len(texts) > max_inputs:
        raise bad_request(f"'input' takes at most {max_inputs} texts", "input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad_request(
            f"'encoding_format' must be 'float' or 'base64', got {encoding!r}", "encoding_format"
        )
    return EncoderRequest(
        model=_model(body),
        texts=texts,
        single=single,
        encoding_format=encoding,
        dimensions=_integer(body, "dimensions", 1),
    )


def parse_classifications(body: Mapping[str, Any], max_inputs: int) -> EncoderRequest:
    """Validate a /v1/classifications body (our endpoint, shaped like /v1/embeddings);
    ``aggregation`` and ``ignore_labels`` are for token-classification models."""
    known = {"model", "input", "top_k", "threshold", "aggregation", "ignore_labels"}
    _check_unknown(body, frozenset(known))
    texts, single = _texts(body)
    if len(texts) > max_inputs:
        raise bad_request(f"'input' takes at most {max_inputs} texts", "input")
    aggregation = body.get("aggregation")
    if aggregation is not None and aggregation not in AGGREGATIONS:
        raise bad_request(
            f"'aggregation' must be one of {list(AGGREGATIONS)}, got {aggregation!r}",
            "aggregation",
        )
    ignore = body.get("ignore_labels")
    if ignore is not None and (
        not isinstance(ignore, list) or not all(isinstance(label, str) for label in ignore)
    ):
        raise bad_request(
            f"'ignore_labels' must be a list of label strings, got {ignore!r}", "ignore_labels"
        )
    return EncoderRequest(
        model=_model(body),
        texts=texts,
        single=single,
        top_k=_integer(body, "top_k", 1),
        threshold=_number(body, "threshold", 0.0, 1.0),
        aggregation=aggregation,
        ignore_labels=None if ignore is None else tuple(ignore),
    )


def require_object(body: Any) -> dict[str, Any]:
    """The parsed JSON must be an object."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body
