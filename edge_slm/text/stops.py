"""Stop conditions of text generation: stop strings, stop tokens, finish reasons, deadlines.

The generation loop checks, after each token: is it a stop token, has the token budget
run out, has the wall-clock deadline passed; the text layer feeds each decoded piece to a
:class:`StopStringMatcher`, which hides the stop string and anything after it. Every way
a generation can end is a :class:`FinishReason`; :class:`Stop` records which condition
fired.
"""

from __future__ import annotations

import numbers
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from edge_slm.errors import InvalidArgumentError

__all__ = [
    "Deadline",
    "FinishReason",
    "Stop",
    "StopStringMatcher",
    "StopStringResult",
    "make_stop_token_ids",
]


class FinishReason(str, Enum):
    """Why a generation ended. The values are stable strings, safe to log or serialise."""

    STOP_TOKEN = "stop_token"
    """The model produced a stop token (end of sequence, end of turn, or one given)."""
    STOP_STRING = "stop_string"
    """The text contained one of the stop strings."""
    LENGTH = "length"
    """The maximum number of new tokens was generated."""
    DEADLINE = "deadline"
    """The wall-clock time allowed for the generation ran out."""
    CONTEXT_LENGTH = "context_length"
    """The model's context window is full: no position is left for another token."""
    CONSTRAINT = "constraint"
    """The output completes its constraint (JSON schema, regex, grammar) and nothing may
    follow it. With a constraint, ``CONSTRAINT`` and ``STOP_TOKEN`` are the reasons of a
    complete, valid output; any other reason means it was cut short."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Stop:
    """Which stop condition ended a generation.

    ``token_id`` is set exactly when ``reason`` is ``STOP_TOKEN`` (the stop token), and
    ``text`` exactly when it is ``STOP_STRING`` (the stop string that matched).

    Args:
        reason: A :class:`FinishReason` or its string value (``"length"``...).
        token_id: The stop token that fired.
        text: The stop string that fired.

    Raises:
        InvalidArgumentError: An unknown reason, or fields that do not fit the reason.
    """

    reason: FinishReason
    token_id: int | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        try:
            reason = FinishReason(self.reason)
        except ValueError:
            allowed = ", ".join(repr(r.value) for r in FinishReason)
            raise InvalidArgumentError(
                f"reason must be one of {allowed}, got {self.reason!r}"
            ) from None
        object.__setattr__(self, "reason", reason)
        if reason is FinishReason.STOP_TOKEN:
            if self.token_id is None:
                raise InvalidArgumentError("a stop_token Stop needs the token_id that fired")
            object.__setattr__(self, "token_id", _check_token_id(self.token_id))
        elif self.token_id is not None:
            raise InvalidArgumentError(
                f"token_id is only set when reason is 'stop_token', got token_id="
                f"{self.token_id!r} with reason {reason.value!r}"
            )
        if reason is FinishReason.STOP_STRING:
            if not isinstance(self.text, str) or not self.text:
                raise InvalidArgumentError(
                    f"a stop_string Stop needs the non-empty stop string that fired, "
                    f"got text={self.text!r}"
                )
        elif self.text is not None:
            raise InvalidArgumentError(
                f"text is only set when reason is 'stop_string', got text={self.text!r} "
                f"with reason {reason.value!r}"
            )


def make_stop_token_ids(token_ids: Iterable[int]) -> frozenset[int]:
    """Validates stop token ids and returns them as a set for ``token_id in stop_ids``.

    Args:
        token_ids: Token ids (Python or numpy integers) that end generation.

    Returns:
        The ids as a frozenset of ``int``.

    Raises:
        InvalidArgumentError: ``token_ids`` is a string, or an id is not an integer >= 0
            (a token's text must first be turned into its id with the tokenizer).
    """
    if isinstance(token_ids, (str, bytes)):
        raise InvalidArgumentError(
            f"stop token ids must be integer ids, got the string {token_ids!r}; "
            "look the token up with tokenizer.token_to_id first"
        )
    return frozenset(_check_token_id(token_id) for token_id in token_ids)


def _check_token_id(token_id: object) -> int:
    if isinstance(token_id, bool):
        raise InvalidArgumentError(f"a stop token id must be an integer >= 0, got {token_id!r}")
    try:
        value = operator.index(token_id)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentError(
            f"a stop token id must be an integer >= 0, got {token_id!r}"
        ) from None
    if value < 0:
        raise InvalidArgumentError(f"a stop token id must be an integer >= 0, got {value}")
    return value


@dataclass(frozen=True)
class StopStringResult:
    """What :meth:`StopStringMatcher.push` lets through.

    Attributes:
        text: Text that is safe to show now: it cannot be part of a stop string. When a
            stop string fired, the text up to the stop string (which is excluded).
        stop_string: The stop string that fired, or None.
    """

    text: str
    stop_string: str | None = None

    @property
    def stopped(self) -> bool:
        """True when a stop string fired: generation should end."""
        return self.stop_string is not None


class StopStringMatcher:
    """Finds stop strings in streamed text, across piece (token) boundaries.

    Each :meth:`push` returns the text that can no longer be part of a stop string. The
    text at the end that could still grow into a stop string (a proper prefix of one) is
    held back, and released as soon as the next piece shows it is not a stop; :meth:`flush`
    releases it at the end of the stream. When a stop string appears, the text before it
    is returned with the stop string's name, and the stop string and everything after it
    are dropped.

    Which stop fires: the first one to be *completed*, that is the match that ends
    earliest in the text; if several end at the same character, the longest (the one
    that starts earliest) wins. A stop string therefore fires on the piece that completes
    it, and generation never waits for text that might not come. The result depends only
    on the text, not on how it was split into pieces. Example: with stop strings
    ``["abcd", "bc"]`` the text ``"abcd"`` stops at ``"bc"`` and returns ``"a"``.

    Matching compares code points; no Unicode normalisation is applied (``"é"`` does not
    match ``"e\\u0301"``).

    Args:
        stop_strings: The stop strings, in any order; duplicates are ignored. An empty
            sequence never stops.

    Raises:
        InvalidArgumentError: ``stop_strings`` is a single string, or contains an empty
            string or a non-string.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        if isinstance(stop_strings, str):
            raise InvalidArgumentError(
                f"stop_strings must be a sequence of strings, got the string {stop_strings!r}; "
                f"wrap it in a list: [{stop_strings!r}]"
            )
        unique: dict[str, None] = {}
        for stop in stop_strings:
            if not isinstance(stop, str):
                raise InvalidArgumentError(
                    f"stop strings must be strings, got {stop!r} of type {type(stop).__name__}"
                )
            if not stop:
                raise InvalidArgumentError(
                    "stop strings must be non-empty, got '' (an empty string would match "
                    "everywhere)"
                )
            unique[stop] = None
        self._stops: tuple[str, ...] = tuple(unique)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._first_chars = frozenset(s[0] for s in self._stops)
        self._held = ""
        self._stopped: str | None = None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings, deduplicated, in the order given."""
        return self._stops

    @property
    def held(self) -> str:
        """The text held back because it may be the start of a stop string."""
        return self._held

    @property
    def stop_string(self) -> str | None:
        """The stop string that fired, or None while none has."""
        return self._stopped

    def push(self, piece: str) -> StopStringResult:
        """Feeds the next piece of text.

        Args:
            piece: Newly decoded text (any length, possibly empty).

        Returns:
            The text safe to show now and, if one fired, the stop string. Once a stop
            string has fired, every later call returns empty text and that stop string.
        """
        if self._stopped is not None:
            return StopStringResult("", self._stopped)
        text = self._held + piece
        match = self._first_completed(text)
        if match is not None:
            start, stop = match
            self._held = ""
            self._stopped = stop
            return StopStringResult(text[:start], stop)
        hold = self._hold_start(text)
        self._held = text[hold:]
        return StopStringResult(text[:hold])

    def flush(self) -> str:
        """Ends the stream: returns the held-back text (empty once a stop fired).

        The held text cannot be a stop string (it would have fired), so it is plain
        text. The matcher may be used again afterwards, for a new stream.
        """
        held, self._held = self._held, ""
        return held if self._stopped is None else ""

    def reset(self) -> None:
        """Forgets held text and any fired stop, ready for a new stream."""
        self._held = ""
        self._stopped = None

    def _first_completed(self, text: str) -> tuple[int, str] | None:
        """The (start, stop string) of the match ending first, longest on a tie."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self._stops:
            start = text.find(stop)  # the first occurrence of a string ends first too
            if start >= 0:
                key = (start + len(stop), -len(stop), stop)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        end, negative_length, stop = best
        return end + negative_length, stop

    def _hold_start(self, text: str) -> int:
        """Index of the longest suffix of ``text`` that is a proper prefix of a stop string.

        Returns ``len(text)`` when no suffix is. Only the last ``longest - 1`` characters
        can begin such a suffix, so the cost per piece does not grow with the text.
        """
        for start in range(max(0, len(text) - self._longest + 1), len(text)):
            if text[start] in self._first_chars:
                tail = text[start:]
                if any(stop.startswith(tail) for stop in self._stops):
                    return start
        return len(text)


class Deadline:
    """A wall-clock limit on a generation, measured with a monotonic clock.

    The clock starts when the object is created.

    Args:
        seconds: Time allowed, > 0; None means no limit (never expires).
        clock: Returns the current time in seconds; ``time.monotonic`` unless a test
            passes a fake clock.

    Raises:
        InvalidArgumentError: ``seconds`` is not a number > 0 (NaN included).
    """

    def __init__(
        self, seconds: float | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if seconds is not None:
            if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
                raise InvalidArgumentError(
                    f"deadline seconds must be a number > 0 or None, got {seconds!r}"
                )
            seconds = float(seconds)
            if not seconds > 0:  # also rejects NaN
                raise InvalidArgumentError(f"deadline seconds must be > 0 or None, got {seconds!r}")
        self._seconds = seconds
        self._clock = clock
        self._expires_at = None if seconds is None else clock() + seconds

    @property
    def seconds(self) -> float | None:
        """The time allowed, as given (None: no limit)."""
        return self._seconds

    def remaining(self) -> float | None:
        """Seconds left, never below 0 (None: no limit)."""
        if self._expires_at is None:
            return None
        return max(0.0, self._expires_at - self._clock())

    def expired(self) -> bool:
        """True once the allowed time has passed."""
        return self._expires_at is not None and self._clock() >= self._expires_at
