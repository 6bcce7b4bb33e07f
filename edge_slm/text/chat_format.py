"""Turn a list of chat messages into the prompt string a model was trained on.

A bundle describes its chat format in one of two ways, written by the build stage
(``export/chat_template.py``):

* ``chat_format``: a small declarative :class:`ChatFormat` compiled from the model's Jinja
  chat template and verified, at build time, to render exactly like transformers'
  ``apply_chat_template`` on many conversations. Rendering it is plain string
  concatenation: no template code runs on the device and no jinja2 is needed.
* ``chat_template``: the raw Jinja template, kept when it cannot be compiled. It is
  rendered with jinja2's sandbox, set up as transformers sets it up, if jinja2 is
  installed (``pip install 'edge-slm[jinja]'``); otherwise :class:`ChatTemplateError`.

A model with neither gets :data:`PLAIN_CHAT_FORMAT` (see its docstring for why).

This module imports only the standard library; jinja2 is imported lazily, and only on
the raw-template path.
"""

from __future__ import annotations

import contextvars
import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from edge_slm.errors import BundleError, ChatTemplateError, InvalidArgumentError
from edge_slm.generation import limits
from edge_slm.text.inputs import check_text

if TYPE_CHECKING:
    import jinja2

__all__ = [
    "KNOWN_ROLES",
    "PLAIN_CHAT_FORMAT",
    "ChatFormat",
    "RoleFormat",
    "render_chat",
    "render_chat_parts",
    "render_chat_with_tools",
    "template_supports_tools",
    "validate_messages",
]

ChatPart = tuple[str, bool]
"""A piece of a rendered chat: its text and whether it is message content (text a
caller typed, which by default may not produce special tokens) or the template's own."""

#: Limits on rendering a raw Jinja template (a template from a bundle is data: it must
#: not loop or allocate without bound). See docs/reliability.md.
MAX_RENDER_CHARS = 1 << 20
MAX_RENDER_S = 2.0
MAX_LOOP_STEPS = 200_000
MAX_REPEAT_CHARS = 1 << 20

#: The roles a message may have (tool calls render through render_chat_with_tools).
KNOWN_ROLES: tuple[str, ...] = ("system", "user", "assistant")

_FORMAT_KEYS = frozenset({"lead", "default_system", "roles", "generation_prompt", "strip_content"})
_ROLE_KEYS = frozenset({"prefix", "suffix"})


@dataclass(frozen=True)
class RoleFormat:
    """The text written just before and just after a message's content."""

    prefix: str
    suffix: str


@dataclass(frozen=True)
class ChatFormat:
    """A chat template reduced to fixed strings around each message.

    A conversation renders as::

        lead
        + default_system            (only if the first message is not a system message)
        + for each message: roles[role].prefix + content + roles[role].suffix
        + generation_prompt         (only if add_generation_prompt)

    where ``content`` is stripped of surrounding whitespace when ``strip_content`` is
    true (templates that apply Jinja's ``trim`` filter to content, as Llama 3's does).
    Only the roles in ``roles`` are accepted. Special tokens such as a BOS string are
    already inlined in the strings.
    """

    lead: str
    default_system: str
    roles: Mapping[str, RoleFormat] = field(hash=False)
    generation_prompt: str
    strip_content: bool = False

    def __post_init__(self) -> None:
        # A read-only copy, so a frozen format cannot be changed through ``roles``.
        object.__setattr__(self, "roles", MappingProxyType(dict(self.roles)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatFormat:
        """Build a format from its manifest dict; raise :class:`BundleError` if malformed.

        Every key must be present and no other is allowed, so a runtime never silently
        ignores a rule written by a newer build stage.
        """
        if not isinstance(data, Mapping):
            raise BundleError(f"chat_format must be a JSON object, got {type(data).__name__}")
        _check_keys("chat_format", data, _FORMAT_KEYS)
        for key in ("lead", "default_system", "generation_prompt"):
            if not isinstance(data[key], str):
                raise BundleError(f"chat_format.{key} must be a string, got {data[key]!r}")
        if not isinstance(data["strip_content"], bool):
            raise BundleError(
                f"chat_format.strip_content must be true or false, got {data['strip_content']!r}"
            )
        roles_data = data["roles"]
        if not isinstance(roles_data, Mapping) or not roles_data:
            raise BundleError(
                f"chat_format.roles must be a non-empty object keyed by role, got {roles_data!r}"
            )
        roles: dict[str, RoleFormat] = {}
        for role, spec in roles_data.items():
            if role not in KNOWN_ROLES:
                raise BundleError(
                    f"chat_format.roles has unknown role {role!r}; allowed: {', '.join(KNOWN_ROLES)}"
                )
            if not isinstance(spec, Mapping):
                raise BundleError(f"chat_format.roles.{role} must be an object, got {spec!r}")
            _check_keys(f"chat_format.roles.{role}", spec, _ROLE_KEYS)
            if not all(isinstance(spec[k], str) for k in _ROLE_KEYS):
                raise BundleError(f"chat_format.roles.{role}: prefix and suffix must be strings")
            roles[role] = RoleFormat(prefix=spec["prefix"], suffix=spec["suffix"])
        if "user" not in roles:
            raise BundleError("chat_format.roles must include 'user'")
        return cls(
            lead=data["lead"],
            default_system=data["default_system"],
            roles=roles,
            generation_prompt=data["generation_prompt"],
            strip_content=data["strip_content"],
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable dict :meth:`from_dict` reads back."""
        return {
            "lead": self.lead,
            "default_system": self.default_system,
            "roles": {r: {"prefix": f.prefix, "suffix": f.suffix} for r, f in self.roles.items()},
            "generation_prompt": self.generation_prompt,
            "strip_content": self.strip_content,
        }

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        """Render already-validated messages (see :func:`render_chat`)."""
        return "".join(text for text, _ in self.render_parts(messages, add_generation_prompt))

    def render_parts(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
    ) -> list[ChatPart]:
        """The rendering as (text, is_message_content) pieces, in order."""
        parts: list[ChatPart] = [(self.lead, False)]
        if messages[0]["role"] != "system":
            parts.append((self.default_system, False))
        for message in messages:
            role = self.roles[message["role"]]
            content = message["content"].strip() if self.strip_content else message["content"]
            parts += [(role.prefix, False), (content, True), (role.suffix, False)]
        if add_generation_prompt:
            parts.append((self.generation_prompt, False))
        return [(text, content) for text, content in parts if text]


#: The format used when a model has no chat template: one ``role: content`` line per
#: message, then ``assistant:`` as the generation prompt.
#:
#: Why this and not ChatML: a model without a chat template is almost always a base
#: model. ChatML's ``<|im_start|>`` markers are not special tokens in its vocabulary, so
#: they would be split into junk pieces the model never saw, whereas transcript-style
#: ``user: ...`` / ``assistant: ...`` lines are common in pretraining text and a base
#: model continues them naturally. The prompt ends in ``assistant:`` with no trailing
#: space because BPE vocabularies attach the space to the next word (`` Hello``); a
#: trailing space would force an unusual tokenisation. The model will tend to go on to
#: write the next ``user:`` line itself, so callers should stop on ``"\nuser:"``.
PLAIN_CHAT_FORMAT = ChatFormat(
    lead="",
    default_system="",
    roles={role: RoleFormat(prefix=f"{role}: ", suffix="\n") for role in KNOWN_ROLES},
    generation_prompt="assistant:",
)


def validate_messages(messages: object, allowed_roles: Sequence[str]) -> list[dict[str, str]]:
    """Check ``messages`` is a non-empty list of ``{"role": str, "content": str}`` dicts.

    Raises :class:`InvalidArgumentError` naming the first problem and what is allowed.
    Extra keys are refused rather than ignored, because a template might have used them
    (a compiled format cannot), so ignoring them could change the prompt silently.
    """
    if not isinstance(messages, (list, tuple)):
        raise InvalidArgumentError(
            f"messages must be a list of {{'role': str, 'content': str}} dicts, "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise InvalidArgumentError("messages must contain at least one message, got []")
    limits.check_length("messages", messages, limits.MAX_MESSAGES, "MAX_MESSAGES")
    allowed = ", ".join(repr(r) for r in allowed_roles)
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidArgumentError(
                f"messages[{i}] must be a dict with keys 'role' and 'content', "
                f"got {type(message).__name__}"
            )
        if set(message) != {"role", "content"}:
            raise InvalidArgumentError(
                f"messages[{i}] must have exactly the keys 'role' and 'content', "
                f"got {sorted(map(str, message))}"
            )
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or role not in allowed_roles:
            raise InvalidArgumentError(
                f"messages[{i}]['role'] is {role!r}; this model's chat format allows {allowed}"
            )
        if not isinstance(content, str):
            raise InvalidArgumentError(
                f"messages[{i}]['content'] must be a str, got {type(content).__name__}"
            )
        check_text(content, f"messages[{i}]['content']")
        checked.append({"role": role, "content": content})
    return checked


def render_chat_parts(
    messages: Sequence[Mapping[str, str]],
    chat_format: ChatFormat | None,
    template: str | None,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
) -> list[ChatPart] | None:
    """:func:`render_chat` as (text, is_message_content) pieces; None when a raw Jinja
    template transforms the contents beyond telling them apart from its own text (the
    caller then treats the whole text with care: see ``TextGenerator.chat_ids``)."""
    if chat_format is None and template is not None:
        checked = validate_messages(messages, KNOWN_ROLES)
        strings = special_tokens or {}
        text = _render_jinja(template, checked, add_generation_prompt, strings)
        marks = [chr(0xF0000 + i) for i in range(len(checked))]
        if len(checked) > 0xFFFD or any(m in text for m in marks):
            return None
        marked = [{"role": m["role"], "content": marks[i]} for i, m in enumerate(checked)]
        try:
            skeleton = _render_jinja(template, marked, add_generation_prompt, strings)
        except (InvalidArgumentError, ChatTemplateError):
            return None
        pieces: list[str] = []
        rest = skeleton
        for mark in marks:
            head, found, rest = rest.partition(mark)
            if not found or mark in rest:
                return None
            pieces.append(head)
        pieces.append(rest)
        for strip in (False, True):
            contents = [m["content"].strip() if strip else m["content"] for m in checked]
            joined = pieces[0] + "".join(c + p for c, p in zip(contents, pieces[1:], strict=True))
            if joined == text:
                parts: list[ChatPart] = [(pieces[0], False)]
                for c, p in zip(contents, pieces[1:], strict=True):
                    parts += [(c, True), (p, False)]
                return [(t, is_content) for t, is_content in parts if t]
        return None
    fmt = chat_format if chat_format is not None else PLAIN_CHAT_FORMAT
    checked = validate_messages(messages, tuple(fmt.roles))
    return fmt.render_parts(checked, add_generation_prompt)


def render_chat(
    messages: Sequence[Mapping[str, str]],
    chat_format: ChatFormat | None,
    template: str | None,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
) -> str:
    """Render ``messages`` as the model's prompt, like transformers' ``apply_chat_template``.

    Uses ``chat_format`` when given; else the raw Jinja ``template`` (needs jinja2);
    else :data:`PLAIN_CHAT_FORMAT` (``role: content`` lines, then ``assistant:``: what a
    base model without a template has seen in pretraining). ``special_tokens`` (``bos_token``, ``eos_token``, ...)
    are passed to a raw template as variables; a compiled format already contains them.

    Raises :class:`InvalidArgumentError` for malformed messages or ones the template
    refuses (its ``raise_exception``), and :class:`ChatTemplateError` when the template
    cannot be rendered here (no jinja2, or a broken template).
    """
    if chat_format is None and template is not None:
        checked = validate_messages(messages, KNOWN_ROLES)
        return _render_jinja(template, checked, add_generation_prompt, special_tokens or {})
    fmt = chat_format if chat_format is not None else PLAIN_CHAT_FORMAT
    checked = validate_messages(messages, tuple(fmt.roles))
    return fmt.render(checked, add_generation_prompt)


def _check_keys(where: str, data: Mapping[str, Any], expected: frozenset[str]) -> None:
    missing, unknown = expected - set(data), set(data) - expected
    if missing or unknown:
        raise BundleError(
            f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(map(str, unknown))}; "
            f"expected exactly {sorted(expected)} (a bundle from another edge-slm version?)"
        )


class _TemplateRaised(Exception):
    """Raised by a template's ``raise_exception()``: it refuses the conversation."""


def template_supports_tools(template: str | None) -> bool:
    """Whether a raw chat template renders a ``tools`` list and calls in the
    ``<tool_call>`` JSON format (Qwen2.5's, Hermes'): the only template tool syntax
    :mod:`edge_slm.generation.tools` can constrain and parse."""
    if not template:
        return False
    return "<tool_call>" in template and _TOOLS_VAR.search(template) is not None


_TOOLS_VAR = re.compile(r"\btools\b")


def render_chat_with_tools(
    messages: Sequence[Mapping[str, Any]],
    template: str,
    tools: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
) -> str:
    """Render OpenAI-style ``messages`` (which may hold ``role: "tool"`` results and
    assistant ``tool_calls``) with ``tools`` through a raw Jinja ``template``, as
    transformers' ``apply_chat_template(messages, tools=tools, tokenize=False)`` does:
    the messages and tools are passed to the template as they are (checked by the
    caller, :func:`edge_slm.generation.tools.template_messages`). Needs jinja2."""
    return _render_jinja(
        template, list(messages), add_generation_prompt, special_tokens or {}, list(tools)
    )


def _render_jinja(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    tools: list[Mapping[str, Any]] | None = None,
) -> str:
    """Render a raw template in a sandbox set up like transformers' own."""
    try:
        import jinja2.exceptions  # an optional extra: imported here so it stays optional
    except ImportError as exc:
        raise ChatTemplateError(
            "this bundle's chat template could not be compiled to a chat_format at build "
            "time, and rendering the raw Jinja template needs jinja2: "
            "pip install 'edge-slm[jinja]'"
        ) from exc

    budget = _Budget(time.monotonic() + MAX_RENDER_S)
    token = _BUDGET.set(budget)
    try:
        compiled = _compile_template(template)
        out: list[str] = []
        size = 0
        for chunk in compiled.generate(
            **special_tokens,
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        ):
            size += len(chunk)
            if size > MAX_RENDER_CHARS:
                raise _TemplateLimit(f"its output passed {MAX_RENDER_CHARS} characters")
            budget.step()
            out.append(chunk)
        return "".join(out)
    except _TemplateRaised as exc:
        raise InvalidArgumentError(f"the chat template refused these messages: {exc}") from exc
    except _TemplateLimit as exc:
        raise ChatTemplateError(f"the chat template was stopped: {exc}") from None
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise ChatTemplateError(
            f"the chat template was stopped: {type(exc).__name__}: {exc}"
        ) from None
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the chat template failed to render: {exc}") from exc
    finally:
        _BUDGET.reset(token)


class _TemplateLimit(Exception):
    """A raw template passed a rendering limit (time, loop steps, output size)."""


@dataclass
class _Budget:
    deadline: float
    steps: int = 0

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_LOOP_STEPS:
            raise _TemplateLimit(f"it took more than {MAX_LOOP_STEPS} steps")
        if self.steps % 64 == 0 and time.monotonic() > self.deadline:
            raise _TemplateLimit(f"it ran longer than {MAX_RENDER_S} s")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("budget", default=None)


def _charge(n: int = 1) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.step(n)


_WIDTH = re.compile(r"\d{7,}")


def _check_widths(fmt: str) -> None:
    """A format string may not ask for a width or precision of a million or more."""
    if _WIDTH.search(fmt):
        raise _TemplateLimit("a format width or precision is over 999999")


def _check_sizes(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_REPEAT_CHARS:
            raise _TemplateLimit(f"an argument of {value} is over {MAX_REPEAT_CHARS}")


def _bounded_filter(fn: Any) -> Any:
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _charge()
        _check_sizes(args[1:], kwargs)
        return fn(*args, **kwargs)

    for attr in ("jinja_pass_arg",):  # pass_context / pass_environment markers
        if hasattr(fn, attr):
            setattr(bounded, attr, getattr(fn, attr))
    return bounded


def _bounded_join(join: Any) -> Any:
    def bounded(seq: Any) -> Any:
        _charge()
        out = join(seq)
        if len(out) > MAX_RENDER_CHARS:
            raise _TemplateLimit(f"a string passed {MAX_RENDER_CHARS} characters")
        return out

    return bounded


def _bounded_range(*args: int) -> Iterator[int]:
    """``range`` for templates: every item drawn is charged to the render's budget."""
    for i in range(*args):
        _charge()
        yield i


@lru_cache(maxsize=8)
def _compile_template(template: str) -> jinja2.Template:
    """Compile like transformers' ``_compile_jinja_template`` (4.57): same sandbox,
    options, ``generation`` tag, filters and globals."""
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body unchanged
        (transformers uses it to mark assistant tokens)."""

        tags = {"generation"}  # noqa: RUF012  (jinja2's own class attribute)

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise _TemplateRaised(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # Like transformers: no HTML escaping, unlike jinja2's built-in tojson.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """Every call, attribute and item access is charged to the render's budget;
        ``*``, ``+`` and ``**`` are checked for the size of what they would make."""

        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _charge()
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    sized = isinstance(seq, (str, list, tuple)) and isinstance(n, int)
                    if sized and len(seq) * max(n, 0) > MAX_REPEAT_CHARS:
                        raise _TemplateLimit(
                            f"a repetition would make more than {MAX_REPEAT_CHARS} items"
                        )
            both = isinstance(left, (str, list)) and isinstance(right, (str, list))
            if operator == "+" and both and len(left) + len(right) > MAX_REPEAT_CHARS:
                raise _TemplateLimit(f"a sum would make more than {MAX_REPEAT_CHARS} items")
            if operator == "%" and isinstance(left, str):
                _check_widths(left)
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
                raise _TemplateLimit(f"an exponent of {right} is over 1024")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            _charge()
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):  # "{:999999999}".format(...), "x".center(10**9)
                _check_widths(owner)
            _check_sizes(args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj: Any, attribute: str) -> Any:
            _charge()
            if isinstance(obj, str) and attribute in ("format", "format_map"):
                _check_widths(obj)
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _charge()
            return super().getitem(obj, argument)

    env = BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["range"] = _bounded_range
    for name, fn in list(env.filters.items()):
        env.filters[name] = _bounded_filter(fn)
    compiled = env.from_string(template)
    # ``~`` and {{ }} output go through str_join / markup_join of the compiled module.
    namespace = compiled.root_render_func.__globals__
    for name in ("str_join", "markup_join"):
        if name in namespace:
            namespace[name] = _bounded_join(namespace[name])
    return compiled
