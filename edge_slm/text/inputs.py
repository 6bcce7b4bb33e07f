"""Checks of text and token ids from callers: one error story, no silent coercion.

Every function raises :class:`~edge_slm.errors.InvalidArgumentError` naming the bad
value and what is allowed; :func:`tokenizer_call` turns any failure of the Rust
``tokenizers`` library (including a panic, which is a ``BaseException`` that
``except Exception`` would miss) into one.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from edge_slm.errors import EdgeSlmError, InvalidArgumentError

T = TypeVar("T")


def check_text(text: object, what: str = "a prompt") -> str:
    """``text`` if it is a str that UTF-8 can encode (no lone surrogate)."""
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise InvalidArgumentError(
            f"{what} holds a lone surrogate {bad!r} at index {exc.start}: only valid "
            "Unicode text (encodable as UTF-8) is allowed"
        ) from None
    return text


def check_token_ids(ids: object, vocab_size: int, what: str = "prompt token ids") -> list[int]:
    """``ids`` as a list of ints in ``[0, vocab_size)``; no floats, bools or strings."""
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, (Sequence, Iterable)):
        raise InvalidArgumentError(
            f"{what} must be a sequence of integers, got {type(ids).__name__}"
        )
    out: list[int] = []
    for i, value in enumerate(ids):
        if isinstance(value, bool):
            raise InvalidArgumentError(f"{what}[{i}] must be an integer, got {value!r}")
        try:
            token = operator.index(value)
        except TypeError:
            raise InvalidArgumentError(
                f"{what}[{i}] must be an integer, got {type(value).__name__} {value!r}"
            ) from None
        if not 0 <= token < vocab_size:
            raise InvalidArgumentError(
                f"{what}[{i}] = {token} is outside the vocabulary [0, {vocab_size})"
            )
        out.append(token)
    return out


def tokenizer_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with any tokenizers failure an InvalidArgumentError."""
    try:
        return fn(*args, **kwargs)
    except (EdgeSlmError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InvalidArgumentError(f"the tokenizer failed on this input: {first}") from None
