"""Limits on every list a caller passes per call, checked before the list is read.

A kiosk's server or script hands strangers' requests to the runtime; a list that may be
arbitrarily long (ten million stop strings, a logit bias for every token, a million
``choose()`` options) must be refused in one line, not discovered as memory or minutes
spent. Each limit is far above what a real call needs, and documented in
``docs/reliability.md``; a list over its limit raises
:class:`~edge_slm.errors.InvalidArgumentError` naming the limit.
"""

from __future__ import annotations

from collections.abc import Sized

from edge_slm.errors import InvalidArgumentError

MAX_STOP_STRINGS = 64
"""``stop`` strings of one call (OpenAI takes 4, this server 16)."""

MAX_STOP_STRING_CHARS = 1024
"""Characters of one stop string (the streamed text holds back that many characters)."""

MAX_STOP_TOKEN_IDS = 1024
"""``stop_token_ids`` of one call."""

MAX_LOGIT_BIAS = 4096
"""``logit_bias`` entries of one call (a constraint is the tool for masking more)."""

MAX_CHOICES = 1024
"""``choose()`` options (each one costs a forward)."""

MAX_MESSAGES = 4096
"""Messages of one chat."""

MAX_TOOLS = 128
"""Tools offered in one chat (OpenAI's limit)."""

MAX_BATCH_PROMPTS = 4096
"""Prompts of one ``generate_batch`` call (each is encoded before the first forward)."""


def check_length(what: str, value: object, limit: int, name: str) -> None:
    """Raise InvalidArgumentError unless ``value`` is a collection of at most ``limit``
    items (a generator, which could be endless, is refused too); ``name`` is the
    limit's constant in this module."""
    if not isinstance(value, Sized):
        raise InvalidArgumentError(f"{what} must be a list, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidArgumentError(
            f"{what} holds {len(value)} items, more than the limit of {limit} "
            f"(edge_slm.generation.limits.{name})"
        )
