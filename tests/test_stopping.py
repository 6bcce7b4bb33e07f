"""Tests of edge_slm.text.stops: stop strings over streamed pieces, stop tokens, deadlines."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_slm.errors import InvalidArgumentError
from edge_slm.text.stops import (
    Deadline,
    FinishReason,
    Stop,
    StopStringMatcher,
    StopStringResult,
    make_stop_token_ids,
)

# --- references ------------------------------------------------------------------------


def reference_cut(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """The text as it should be shown, and the stop that fired, by brute force.

    Reads the text one character at a time; the first time the text read so far ends
    with a stop string, that stop fires (the longest, if several end there) and the text
    is cut where it starts.
    """
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return text[: end - len(stop)], stop
    return text, None


def reference_held(consumed: str, stops: Sequence[str]) -> str:
    """The longest suffix of ``consumed`` that is a proper prefix of a stop string."""
    for start in range(len(consumed) + 1):
        tail = consumed[start:]
        if tail and any(s.startswith(tail) and len(s) > len(tail) for s in stops):
            return tail
    return ""


def run_matcher(
    pieces: Sequence[str], stops: Sequence[str]
) -> tuple[str, str | None, list[StopStringResult]]:
    """Streams ``pieces`` through a matcher, checking its invariants after every push.

    Returns the text shown (flush included when no stop fired), the stop that fired and
    the result of every push.
    """
    matcher = StopStringMatcher(stops)
    shown: list[str] = []
    results: list[StopStringResult] = []
    consumed = ""
    for piece in pieces:
        consumed += piece
        result = matcher.push(piece)
        results.append(result)
        shown.append(result.text)
        expected_text, expected_stop = reference_cut(consumed, stops)
        if result.stopped:
            # It fires on the piece that completes the stop, not earlier, not later.
            assert "".join(shown) == expected_text
            assert result.stop_string == expected_stop == matcher.stop_string
            return "".join(shown), result.stop_string, results
        assert expected_stop is None, "a stop string was complete but did not fire"
        # Nothing is lost and only what may still become a stop string is held back.
        assert matcher.held == reference_held(consumed, stops)
        assert "".join(shown) + matcher.held == consumed
    shown.append(matcher.flush())
    assert matcher.held == ""
    return "".join(shown), None, results


def splits(text: str, cuts: Sequence[int]) -> list[str]:
    """``text`` cut at the given positions (duplicates and order ignored)."""
    points = sorted({0, len(text), *(c for c in cuts if 0 <= c <= len(text))})
    return [text[a:b] for a, b in itertools.pairwise(points)]


# --- stop strings: examples -------------------------------------------------------------


def test_stop_in_one_piece() -> None:
    matcher = StopStringMatcher(["STOP"])
    result = matcher.push("Hello STOP world")
    assert result == StopStringResult("Hello ", "STOP")
    assert result.stopped


def test_stop_split_across_pieces() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("Hel") == StopStringResult("Hel")
    assert matcher.push("lo ST") == StopStringResult("lo ")
    assert matcher.held == "ST"
    assert matcher.push("O") == StopStringResult("")
    assert matcher.push("P and more") == StopStringResult("", "STOP")


def test_held_prefix_released_when_not_a_stop() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("a ST").text == "a "
    assert matcher.push("O").text == ""
    assert matcher.held == "STO"
    result = matcher.push("RM")
    assert result == StopStringResult("STORM")
    assert matcher.held == ""


def test_held_prefix_partly_released() -> None:
    """A held prefix that fails can itself contain the start of a new match."""
    matcher = StopStringMatcher(["aab"])
    assert [matcher.push(c).text for c in "aaa"] == ["", "", "a"]
    assert matcher.held == "aa"
    assert matcher.push("b") == StopStringResult("", "aab")


def test_stop_at_very_start() -> None:
    assert StopStringMatcher(["<|im_end|>"]).push("<|im_end|>rest") == StopStringResult(
        "", "<|im_end|>"
    )
    matcher = StopStringMatcher(["<|im_end|>"])
    assert matcher.push("<|im") == StopStringResult("")
    assert matcher.push("_end|>") == StopStringResult("", "<|im_end|>")


def test_text_after_stop_in_same_piece_is_dropped() -> None:
    matcher = StopStringMatcher(["\n\n"])
    assert matcher.push("answer\n") == StopStringResult("answer")
    assert matcher.push("\nQuestion: more") == StopStringResult("", "\n\n")


def test_multiple_stop_strings_first_completed_wins() -> None:
    matcher = StopStringMatcher(["User:", "\n\n", "###"])
    assert matcher.push("one\ntwo ##") == StopStringResult("one\ntwo ")
    assert matcher.push("# three User:") == StopStringResult("", "###")


def test_overlapping_stops_first_to_complete_wins() -> None:
    """ "bc" completes before "abcd" can, so it fires even though "abcd" starts earlier."""
    assert run_matcher(["abcd"], ["abcd", "bc"])[:2] == ("a", "bc")
    assert run_matcher(list("abcd"), ["abcd", "bc"])[:2] == ("a", "bc")
    assert run_matcher(["xabcd"], ["bcd", "abc"])[:2] == ("x", "abc")


def test_stops_ending_together_longest_wins() -> None:
    for stops in (["bc", "abc"], ["abc", "bc"], ["c", "bc", "abc"]):
        assert run_matcher(["xabc"], stops)[:2] == ("x", "abc")
        assert run_matcher(list("xabc"), stops)[:2] == ("x", "abc")


def test_stop_that_is_prefix_of_another_fires_at_once() -> None:
    """With "\\n" and "\\n\\n", the first newline already stops: no waiting for more."""
    matcher = StopStringMatcher(["\n\n", "\n"])
    assert matcher.push("line\n") == StopStringResult("line", "\n")


def test_unicode_stop_strings() -> None:
    stops = ["😀", "中文", "e\u0301"]
    assert run_matcher(["ab", "c中", "文d"], stops)[:2] == ("abc", "中文")
    assert run_matcher(["caf", "e", "\u0301!"], stops)[:2] == ("caf", "e\u0301")
    assert run_matcher(["é"], stops)[:2] == ("é", None)  # no normalisation
    assert run_matcher(["x😀"], ["😀"])[:2] == ("x", "😀")
    assert run_matcher(["中", "中", "文"], ["中文"])[:2] == ("中", "中文")


def test_flush_releases_held_text() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("the end ST").text == "the end "
    assert matcher.flush() == "ST"
    assert matcher.held == ""
    assert matcher.flush() == ""
    # Usable again: text from before the flush does not combine with new text.
    assert matcher.push("OP") == StopStringResult("OP")


def test_after_stop_everything_is_dropped() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("aSTOPb").stopped
    assert matcher.push("more STOP text") == StopStringResult("", "STOP")
    assert matcher.flush() == ""
    assert matcher.stop_string == "STOP"
    matcher.reset()
    assert matcher.stop_string is None
    assert matcher.push("fresh") == StopStringResult("fresh")


def test_reset_forgets_held_text() -> None:
    matcher = StopStringMatcher(["STOP"])
    matcher.push("ST")
    matcher.reset()
    assert matcher.held == ""
    assert matcher.push("OP") == StopStringResult("OP")


def test_no_stop_strings_passes_everything() -> None:
    matcher = StopStringMatcher([])
    assert matcher.push("anything at all") == StopStringResult("anything at all")
    assert matcher.held == ""
    assert matcher.flush() == ""


def test_empty_piece() -> None:
    matcher = StopStringMatcher(["ab"])
    assert matcher.push("") == StopStringResult("")
    assert matcher.push("a") == StopStringResult("")
    assert matcher.push("") == StopStringResult("")
    assert matcher.push("b") == StopStringResult("", "ab")


def test_held_text_stays_shorter_than_longest_stop() -> None:
    stops = ["a" * 50, "xyz"]
    matcher = StopStringMatcher(stops)
    for _ in range(200):
        matcher.push("a" * 7)  # 49 a's would be held at most; 50 fire
        if matcher.stop_string:
            break
        assert len(matcher.held) < 50
    assert matcher.stop_string == "a" * 50


def test_stop_strings_deduplicated_in_order() -> None:
    assert StopStringMatcher(["b", "a", "b"]).stop_strings == ("b", "a")


@pytest.mark.parametrize(
    ("stops", "message"),
    [
        ([""], "non-empty"),
        (["ok", ""], "non-empty"),
        ("STOP", "got the string 'STOP'"),
        ([1], "got 1 of type int"),
        ([None], "got None"),
    ],
)
def test_invalid_stop_strings(stops: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        StopStringMatcher(stops)


# --- stop strings: every split, random texts ---------------------------------------------

_EXHAUSTIVE_CASES = [
    ("a STOP b", ["STOP"]),
    ("aaabaab", ["aab"]),
    ("abcabcd", ["abcd", "bc"]),
    ("xxabab", ["abab", "bab", "ba"]),
    ("ab😀中文é\u0301", ["中文", "😀中x", "e\u0301"]),
    ("no stop", ["STOP", "zz"]),
    ("<|im_end|>", ["<|im_end|>", "<|"]),
]


@pytest.mark.parametrize(("text", "stops"), _EXHAUSTIVE_CASES)
def test_every_split_gives_reference(text: str, stops: list[str]) -> None:
    expected = reference_cut(text, stops)
    count = 0
    for mask in range(2 ** (len(text) - 1)):
        cuts = [i + 1 for i in range(len(text) - 1) if mask >> i & 1]
        assert run_matcher(splits(text, cuts), stops)[:2] == expected, cuts
        count += 1
    assert count == 2 ** (len(text) - 1)


_ALPHABET = st.sampled_from(list("aabbc😀中é\u0301\n"))


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(_ALPHABET, max_size=30),
    stops=st.lists(st.text(_ALPHABET, min_size=1, max_size=5), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 30), max_size=30),
)
def test_random_splits_give_reference(text: str, stops: list[str], cuts: list[int]) -> None:
    assert run_matcher(splits(text, cuts), stops)[:2] == reference_cut(text, stops)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(max_size=40),
    stops=st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=40),
)
def test_random_unicode_splits_give_reference(text: str, stops: list[str], cuts: list[int]) -> None:
    # Plant a stop string in the text half of the time, so that stops really fire.
    planted = text[: len(text) // 2] + stops[0] + text[len(text) // 2 :]
    for candidate in (text, planted):
        assert run_matcher(splits(candidate, cuts), stops)[:2] == reference_cut(candidate, stops)


def test_reference_is_first_to_complete() -> None:
    """The reference itself, on the cases the docs promise."""
    assert reference_cut("abcd", ["abcd", "bc"]) == ("a", "bc")
    assert reference_cut("xabc", ["bc", "abc"]) == ("x", "abc")
    assert reference_cut("plain", ["zz"]) == ("plain", None)
    assert reference_held("xxST", ["STOP"]) == "ST"
    assert reference_held("xxSTX", ["STOP"]) == ""


# --- finish reasons and Stop --------------------------------------------------------------


def test_finish_reason_values() -> None:
    assert {r.value for r in FinishReason} == {
        "stop_token",
        "stop_string",
        "length",
        "deadline",
        "context_length",
        "constraint",
    }
    assert FinishReason("length") is FinishReason.LENGTH
    as_text: str = FinishReason.STOP_TOKEN  # a str: compares equal to its value
    assert as_text == "stop_token"
    assert str(FinishReason.DEADLINE) == "deadline"
    assert f"{FinishReason.STOP_STRING}" == "stop_string"
    assert json.dumps({"finish_reason": FinishReason.LENGTH}) == '{"finish_reason": "length"}'


def test_stop_records_what_fired() -> None:
    assert Stop(FinishReason.STOP_TOKEN, token_id=2).token_id == 2
    assert Stop(FinishReason.STOP_STRING, text="\n\n").text == "\n\n"
    stop = Stop("length")  # type: ignore[arg-type]
    assert stop.reason is FinishReason.LENGTH
    assert stop == Stop(FinishReason.LENGTH)
    assert Stop(FinishReason.STOP_TOKEN, token_id=np.int64(7)).token_id == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        stop.reason = FinishReason.DEADLINE  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reason": "finished"}, "reason must be one of .*'stop_token'.*got 'finished'"),
        ({"reason": FinishReason.STOP_TOKEN}, "needs the token_id"),
        ({"reason": FinishReason.STOP_TOKEN, "token_id": -1}, "got -1"),
        ({"reason": FinishReason.STOP_TOKEN, "token_id": 2, "text": "x"}, "text is only set"),
        ({"reason": FinishReason.STOP_STRING}, "needs the non-empty stop string"),
        ({"reason": FinishReason.STOP_STRING, "text": ""}, "got text=''"),
        ({"reason": FinishReason.STOP_STRING, "text": "x", "token_id": 1}, "token_id is only"),
        ({"reason": FinishReason.LENGTH, "token_id": 3}, "token_id=3 with reason 'length'"),
        ({"reason": FinishReason.DEADLINE, "text": "x"}, "text='x' with reason 'deadline'"),
    ],
)
def test_stop_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        Stop(**kwargs)


# --- stop token ids -----------------------------------------------------------------------


def test_make_stop_token_ids() -> None:
    ids = make_stop_token_ids([2, np.int64(32000), 2])
    assert ids == frozenset({2, 32000})
    assert all(type(i) is int for i in ids)
    assert make_stop_token_ids([]) == frozenset()
    assert 32000 in ids and 3 not in ids


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([1, -1], "integer >= 0, got -1"),
        ([1.0], "got 1.0"),
        (["</s>"], "got '</s>'"),
        ("</s>", "got the string '</s>'.*token_to_id"),
        ([True], "got True"),
    ],
)
def test_make_stop_token_ids_validation(ids: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        make_stop_token_ids(ids)


# --- deadline ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_deadline_expires_after_its_seconds() -> None:
    clock = FakeClock()
    deadline = Deadline(2.5, clock=clock)
    assert deadline.seconds == 2.5
    assert not deadline.expired()
    assert deadline.remaining() == 2.5
    clock.now += 2.0
    assert not deadline.expired()
    assert deadline.remaining() == pytest.approx(0.5)
    clock.now += 0.5
    assert deadline.expired()
    assert deadline.remaining() == 0.0
    clock.now += 100.0
    assert deadline.expired()
    assert deadline.remaining() == 0.0


def test_deadline_none_never_expires() -> None:
    clock = FakeClock()
    deadline = Deadline(None, clock=clock)
    clock.now += 1e12
    assert not deadline.expired()
    assert deadline.remaining() is None
    assert deadline.seconds is None


def test_deadline_infinite_never_expires() -> None:
    clock = FakeClock()
    deadline = Deadline(math.inf, clock=clock)
    clock.now += 1e12
    assert not deadline.expired()


def test_deadline_uses_monotonic_clock_by_default() -> None:
    assert not Deadline(5.0).expired()
    deadline = Deadline(0.02)
    time.sleep(0.05)
    assert deadline.expired()


@pytest.mark.parametrize("seconds", [0, 0.0, -1.0, math.nan, -math.inf])
def test_deadline_rejects_non_positive(seconds: float) -> None:
    with pytest.raises(InvalidArgumentError, match=r"must be > 0 or None, got"):
        Deadline(seconds)


@pytest.mark.parametrize("seconds", ["1", True, [1.0]])
def test_deadline_rejects_non_numbers(seconds: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="must be a number > 0 or None, got"):
        Deadline(seconds)


def test_deadline_accepts_numpy_and_int() -> None:
    assert Deadline(np.float32(1.5), clock=FakeClock()).seconds == 1.5
    assert Deadline(3, clock=FakeClock()).seconds == 3.0
