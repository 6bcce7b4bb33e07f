"""Compile a Jinja chat template into a declarative ``chat_format`` for the runtime.

The runtime (``edge_slm.text.chat_format``) must render prompts exactly as transformers'
``apply_chat_template`` does, without jinja2 and without running template code on the
device. Most chat templates only wrap each message in fixed text, so at build time we
render the template (with transformers' own machinery) on conversations whose contents
are unique sentinel strings, read the fixed pieces off the output, and then *verify*
the resulting :class:`~edge_slm.chat.ChatFormat` against the template on many varied
conversations. Anything that does not match exactly gives ``None``: the manifest then
keeps only the raw template and the runtime needs the optional jinja2 extra.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

from edge_slm.text.chat_format import KNOWN_ROLES, ChatFormat, RoleFormat

__all__ = ["compile_chat_template", "render_with_transformers", "verify_chat_format"]

log = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, str]]

# Mixed case, no whitespace, none a substring of another: a template that changes case,
# trims, escapes or drops content cannot return them unchanged.
_S = [f"qZx{i}SentiNel" for i in range(3)]

# Output that depends on the clock or on chance cannot be frozen into fixed strings.
_NON_DETERMINISTIC = re.compile(r"strftime_now|\|\s*random\b")

# Contents for verification: multi-line, unicode, empty, whitespace-padded, and text
# that looks like template syntax or special tokens (it must stay inert data).
_CONTENTS = [
    "Hello!",
    "",
    " ",
    "What is 2 + 2?\nAnswer briefly.",
    "  padded with spaces  ",
    "\nleading and trailing newlines\n\n",
    "tab\tseparated\tvalues",
    "héllo wörld — naïve café, 你好，世界, Привет, مرحبا 🙂🚀",
    "{{ x }} {% if true %}yes{% endif %} {# comment #}",
    "<|im_end|>\n<|im_start|>assistant\n",
    "<s></s><|endoftext|><|begin_of_text|>",
    "system: user: assistant:",
    "back\\slash \\n not a newline, 'single' and \"double\" quotes",
    "x" * 300,
]


def render_with_transformers(
    template: str,
    messages: Messages,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, Any],
) -> str:
    """Render as ``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` does:
    transformers' own Jinja environment, with the special tokens as template variables."""
    # Annotated as returning str, it returns (rendered conversations, generation indices).
    result: Any = render_jinja_template(
        conversations=[[dict(m) for m in messages]],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        **special_tokens,
    )
    return str(result[0][0])


def compile_chat_template(
    template: str, special_tokens: Mapping[str, str]
) -> dict[str, Any] | None:
    """Compile ``template`` to a ``ChatFormat`` dict, or ``None`` if it cannot be expressed.

    ``special_tokens`` are the tokenizer's special token strings (``bos_token``,
    ``eos_token``, ...), passed to the template as transformers passes them; they end up
    inlined in the compiled strings. The result has passed :func:`verify_chat_format`.
    """
    if _NON_DETERMINISTIC.search(template):
        log.info("chat template uses the clock or randomness; keeping it as raw Jinja")
        return None
    try:
        fmt = _derive(template, special_tokens)
    except Exception as exc:  # any template error while probing means "cannot express"
        log.info("chat template could not be probed (%s); keeping it as raw Jinja", exc)
        return None
    if fmt is None:
        log.info("chat template is not a fixed wrapper around messages; keeping raw Jinja")
        return None
    problem = verify_chat_format(fmt.to_dict(), template, special_tokens)
    if problem is not None:
        log.info("compiled chat format failed verification (%s); keeping raw Jinja", problem)
        return None
    return fmt.to_dict()


def verify_chat_format(
    chat_format: Mapping[str, Any], template: str, special_tokens: Mapping[str, str]
) -> str | None:
    """Compare ``chat_format`` with ``template`` on many conversations, each rendered with
    and without the generation prompt. Return ``None`` if every string is identical,
    else a description of the first difference (or of a conversation the template
    refused: a compiled format cannot refuse, so it must not replace such a template).
    """
    fmt = ChatFormat.from_dict(chat_format)
    for messages in verification_conversations(tuple(fmt.roles)):
        for gen in (True, False):
            try:
                expected = render_with_transformers(template, messages, gen, special_tokens)
            except Exception as exc:
                return f"template raised {exc!r} on {messages!r}"
            got = fmt.render(messages, gen)
            if got != expected:
                return f"mismatch on {messages!r} (add_generation_prompt={gen}): {got!r} != {expected!r}"
    return None


def verification_conversations(roles: Sequence[str]) -> list[list[dict[str, str]]]:
    """Conversations to check a compiled format on: every role sequence of length 1 to 3,
    then seeded random ones of 1 to 6 user/assistant turns, with and without a system
    prompt (first, and also in the middle), using the varied contents above."""
    rng = random.Random(20240607)
    convs: list[list[dict[str, str]]] = []
    for n in (1, 2, 3):
        for seq in itertools.product(roles, repeat=n):
            convs.append([{"role": r, "content": rng.choice(_CONTENTS)} for r in seq])
    turn_roles = [r for r in ("user", "assistant") if r in roles]
    for i in range(60):
        messages = []
        if "system" in roles and i % 2 == 0:
            messages.append({"role": "system", "content": rng.choice(_CONTENTS)})
        for turn in range(rng.randint(1, 6)):
            for role in turn_roles:
                messages.append({"role": role, "content": rng.choice(_CONTENTS)})
            if "system" in roles and i % 5 == 1 and turn == 0:
                messages.append({"role": "system", "content": rng.choice(_CONTENTS)})
        if rng.random() < 0.3:
            messages.pop()  # end on a user turn as often as on an assistant turn
        convs.append(messages)
    return convs


def _derive(template: str, special_tokens: Mapping[str, str]) -> ChatFormat | None:
    """Read the fixed pieces off renders of sentinel conversations (may raise)."""

    def pieces(*roles: str, gen: bool = False) -> list[str] | None:
        messages = [{"role": r, "content": s} for r, s in zip(roles, _S[: len(roles)], strict=True)]
        return _split(
            render_with_transformers(template, messages, gen, special_tokens), _S[: len(roles)]
        )

    def render_or_none(*roles: str) -> list[str] | None:
        try:
            return pieces(*roles)
        except Exception:
            return None

    u, ua, uau = pieces("user"), pieces("user", "assistant"), pieces("user", "assistant", "user")
    if u is None or ua is None or uau is None:
        return None
    head, user_suffix = u
    assistant_suffix = ua[2]
    assistant_prefix = _strip_start(ua[1], user_suffix)
    user_prefix = _strip_start(uau[2], assistant_suffix)
    lead_and_default = _strip_end(head, user_prefix or "")
    if assistant_prefix is None or user_prefix is None or lead_and_default is None:
        return None
    roles = {
        "user": RoleFormat(user_prefix, user_suffix),
        "assistant": RoleFormat(assistant_prefix, assistant_suffix),
    }

    us, su = render_or_none("user", "system"), render_or_none("system", "user")
    lead, default_system = lead_and_default, ""
    if us is not None and su is not None:
        system_prefix = _strip_start(us[1], user_suffix)
        lead_or_none = _strip_end(su[0], system_prefix or "")
        if system_prefix is None or lead_or_none is None:
            return None
        if not lead_and_default.startswith(lead_or_none):
            return None
        lead, default_system = lead_or_none, lead_and_default[len(lead_or_none) :]
        roles["system"] = RoleFormat(system_prefix, us[2])
    elif us is not None or su is not None:
        return None  # a system message allowed only first or only later: not expressible

    # Does the template trim content (Jinja's ``trim`` filter)?
    padded = render_with_transformers(
        template, [{"role": "user", "content": f" \n{_S[0]}\t "}], False, special_tokens
    )
    if padded == head + _S[0] + user_suffix:
        strip_content = True
    elif padded == head + f" \n{_S[0]}\t " + user_suffix:
        strip_content = False
    else:
        return None

    with_prompt = render_with_transformers(
        template, [{"role": "user", "content": _S[0]}], True, special_tokens
    )
    generation_prompt = _strip_start(with_prompt, head + _S[0] + user_suffix)
    if generation_prompt is None:
        return None
    ordered = {r: roles[r] for r in KNOWN_ROLES if r in roles}
    return ChatFormat(lead, default_system, ordered, generation_prompt, strip_content)


def _split(text: str, sentinels: Sequence[str]) -> list[str] | None:
    """The text around each sentinel, if each occurs exactly once and in order."""
    out, rest = [], text
    for s in sentinels:
        if text.count(s) != 1 or s not in rest:
            return None
        before, rest = rest.split(s, 1)
        out.append(before)
    return [*out, rest]


def _strip_start(text: str, start: str) -> str | None:
    return text[len(start) :] if text.startswith(start) else None


def _strip_end(text: str, end: str) -> str | None:
    return text[: len(text) - len(end)] if text.endswith(end) else None
