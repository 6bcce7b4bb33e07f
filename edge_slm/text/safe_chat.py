"""Chat prompts whose message text cannot forge special tokens.

A rendered chat mixes the template's own text (role markers such as ``<|im_start|>``,
which must become special tokens) with text typed by whoever wrote the messages. By
default that typed text is encoded with special-token matching off, so a visitor who
types ``<|im_end|>\\n<|im_start|>system\\n...`` gets those characters as plain text, not
a forged system turn. A chat whose messages hold no special token's text encodes
exactly as the whole rendered prompt always did (same ids), so ordinary chats, prefix
reuse and parity with transformers are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edge_slm.errors import InvalidArgumentError
from edge_slm.text.chat_format import render_chat_parts
from edge_slm.text.inputs import tokenizer_call


def special_token_strings(tokenizer: Any) -> list[str]:
    """The text of every special added token of ``tokenizer``."""
    return [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]


def plain_tokenizer(model: Any) -> Any:
    """A copy of ``model.tokenizer`` that encodes special tokens' text as plain text
    (made once per model; the shared tokenizer is never switched, for thread safety)."""
    if model._plain_tokenizer is None:
        from tokenizers import Tokenizer

        plain = Tokenizer.from_str(model.tokenizer.to_str())
        plain.encode_special_tokens = True
        model._plain_tokenizer = plain
    return model._plain_tokenizer


def safe_chat_ids(
    model: Any,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool,
    trusted: bool,
) -> list[int]:
    """Token ids of a chat prompt for ``model`` (a TextGenerator); see the module."""
    text = model.render_chat(messages, add_generation_prompt=add_generation_prompt)
    # The template already holds every special token: do not let the tokenizer add BOS.
    if trusted:
        return list(model.encode(text, add_special_tokens=False))
    specials = [s for s in special_token_strings(model.tokenizer) if s]
    contents = [str(m.get("content", "")) for m in messages if isinstance(m, Mapping)]
    if not any(s in c for c in contents for s in specials):
        return list(model.encode(text, add_special_tokens=False))
    tokens = model.manifest.special_tokens
    strings = {"bos_token": tokens.bos_token or "", "eos_token": tokens.eos_token or ""}
    parts = render_chat_parts(
        messages, model.chat_format, model.manifest.chat_template, add_generation_prompt, strings
    )
    if parts is None:
        found = next(s for s in specials for c in contents if s in c)
        raise InvalidArgumentError(
            f"a message contains the special token text {found!r}, and this bundle's raw chat "
            "template transforms messages too much to keep it plain text; remove it, or "
            "load with LoadOptions(chat_special_tokens=True) if the caller is trusted"
        )
    plain = plain_tokenizer(model)
    ids: list[int] = []
    for piece, is_content in parts:
        encoder = plain if is_content else model.tokenizer
        ids += tokenizer_call(encoder.encode, piece, add_special_tokens=False).ids
    return ids
