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

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from edge_slm.errors import BundleError, ChatTemplateError, InvalidArgumentError

if TYPE_CHECKING:
    import jinja2

__all__ = [
    "KNOWN_ROLES",
    "PLAIN_CHAT_FORMAT",
    "ChatFormat",
    "RoleFormat",
    "render_chat",
    "validate_messages",
]

#: The roles a message may have. Tool calls and multimodal content are out of scope.
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
        parts = [self.lead]
        if messages[0]["role"] != "system":
            parts.append(self.default_system)
        for message in messages:
            role = self.roles[message["role"]]
            content = message["content"].strip() if self.strip_content else message["content"]
            parts += (role.prefix, content, role.suffix)
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)


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
        checked.append({"role": role, "content": content})
    return checked


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


def _render_jinja(
    template: str,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
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

    try:
        compiled = _compile_template(template)
        return compiled.render(
            **special_tokens,
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        )
    except _TemplateRaised as exc:
        raise InvalidArgumentError(f"the chat template refused these messages: {exc}") from exc
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the chat template failed to render: {exc}") from exc


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

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)
