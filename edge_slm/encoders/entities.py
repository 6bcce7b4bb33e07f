"""Token scores to entities: the grouping strategies of transformers' NER pipeline.

A token classifier scores every token; users want words and entities with character
offsets. This module turns one window of tokens (ids, offsets, special-token mask,
per-token probabilities) into :class:`Entity` objects exactly as transformers'
``TokenClassificationPipeline`` does (``gather_pre_entities``, ``aggregate``,
``aggregate_words``, ``group_entities``, ``aggregate_overlapping_entities`` of
transformers 4.57), so results are interchangeable with ``pipeline("ner", ...)``:

* ``none``: one entity per (non-special) token, its best label, ``index`` = the
  token's position in the window.
* ``simple``: tokens grouped while their labels share a tag (``B-X`` starts a new
  group, ``I-X`` or a bare ``X`` continues one); ``score`` is the mean of the group.
* ``first`` / ``average`` / ``max``: sub-word tokens are first merged into words (the
  word's label is the first token's, the best of the averaged scores, or the label of
  its most confident token), then words grouped as in ``simple``.

Whether a token continues a word: for a tokenizer with a continuing-sub-word prefix
(WordPiece's ``##``) a token whose text differs in length from its span of the input;
otherwise (byte-level BPE) a token that does not start the text nor follows a space,
the pipeline's fallback heuristic. An unknown-token id is never a sub-word and takes
the text of its span as its word.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edge_slm.errors import InvalidArgumentError

AGGREGATIONS: tuple[str, ...] = ("none", "simple", "first", "average", "max")
Aggregation = Literal["none", "simple", "first", "average", "max"]


def check_aggregation(value: object) -> Aggregation:
    """``value`` if it is one of :data:`AGGREGATIONS`; InvalidArgumentError otherwise."""
    if value not in AGGREGATIONS:
        raise InvalidArgumentError(
            f"aggregation must be one of {list(AGGREGATIONS)}, got {value!r}"
        )
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class Entity:
    """One tagged token (aggregation ``none``) or one group of words.

    Attributes:
        label: the token's label (``B-PER``) for ``none``; the group's tag without its
            ``B-``/``I-`` prefix (``PER``) for the grouping strategies.
        score: the label's probability (a group: the mean over its tokens or words).
        word: the token as the vocabulary spells it (``##ing``) for ``none``; the
            group's tokens decoded by the tokenizer's decoder otherwise.
        start: offset of the first character in the input text.
        end: offset one past the last character (``text[start:end]`` is the span).
        index: the token's position in its window (special tokens counted), for
            ``none`` only; None for groups.
    """

    label: str
    score: float
    word: str
    start: int
    end: int
    index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The pipeline's dict: ``entity`` + ``index`` for a token, ``entity_group`` for a group."""
        if self.index is None:
            return {
                "entity_group": self.label,
                "score": self.score,
                "word": self.word,
                "start": self.start,
                "end": self.end,
            }
        return {
            "entity": self.label,
            "score": self.score,
            "index": self.index,
            "word": self.word,
            "start": self.start,
            "end": self.end,
        }


@dataclass(frozen=True)
class TokenizerFacts:
    """What grouping needs from the tokenizer: sub-word marking, the unknown id, decoding."""

    subword_prefix: str | None
    unk_token_id: int | None
    decode: Callable[[list[str]], str]


@dataclass(frozen=True)
class _Token:
    """One non-special token of a window before grouping (the pipeline's pre-entity)."""

    word: str
    scores: npt.NDArray[np.float32]  # [labels]
    start: int
    end: int
    index: int
    is_subword: bool


def gather_tokens(
    text: str,
    ids: Sequence[int],
    tokens: Sequence[str],
    offsets: Sequence[tuple[int, int]],
    special: Sequence[int],
    scores: npt.NDArray[np.float32],
    facts: TokenizerFacts,
) -> list[_Token]:
    """The window's non-special tokens with their probabilities ``scores`` [tokens, labels]."""
    out = []
    for index, token_scores in enumerate(scores):
        if special[index]:
            continue
        start, end = offsets[index]
        word = tokens[index]
        span = text[start:end]
        if facts.subword_prefix:
            is_subword = len(word) != len(span)
        else:
            is_subword = start > 0 and " " not in text[start - 1 : start + 1]
        if ids[index] == facts.unk_token_id:
            word, is_subword = span, False
        out.append(_Token(word, token_scores, start, end, index, is_subword))
    return out


def aggregate(
    tokens: Sequence[_Token],
    strategy: Aggregation,
    labels: Sequence[str],
    facts: TokenizerFacts,
) -> list[Entity]:
    """Entities of one window's tokens under ``strategy`` (nothing filtered yet)."""
    if strategy in ("none", "simple"):
        entities = []
        for token in tokens:
            best = int(token.scores.argmax())
            entities.append(
                Entity(
                    labels[best],
                    float(token.scores[best]),
                    token.word,
                    token.start,
                    token.end,
                    token.index,
                )
            )
        if strategy == "none":
            return entities
    else:
        entities = _aggregate_words(tokens, strategy, labels, facts)
    return _group_entities(entities, facts)


def _aggregate_words(
    tokens: Sequence[_Token], strategy: Aggregation, labels: Sequence[str], facts: TokenizerFacts
) -> list[Entity]:
    """One entity per word: sub-word tokens joined to the token before them."""
    words: list[list[_Token]] = []
    for token in tokens:
        if words and token.is_subword:
            words[-1].append(token)
        else:
            words.append([token])
    return [_aggregate_word(word, strategy, labels, facts) for word in words]


def _aggregate_word(
    pieces: list[_Token], strategy: Aggregation, labels: Sequence[str], facts: TokenizerFacts
) -> Entity:
    if strategy == "first":
        scores = pieces[0].scores
    elif strategy == "max":
        scores = max(pieces, key=lambda piece: piece.scores.max()).scores
    else:  # average
        scores = np.nanmean(np.stack([piece.scores for piece in pieces]), axis=0)
    best = int(scores.argmax())
    word = facts.decode([piece.word for piece in pieces])
    return Entity(labels[best], float(scores[best]), word, pieces[0].start, pieces[-1].end)


def _tag(label: str) -> tuple[str, str]:
    """(``B`` or ``I``, tag) of a label; a label without a prefix continues (``I``)."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def _group_entities(entities: Sequence[Entity], facts: TokenizerFacts) -> list[Entity]:
    """Adjacent entities with the same tag, a ``B-`` starting a new group."""
    groups: list[list[Entity]] = []
    for entity in entities:
        bi, tag = _tag(entity.label)
        if groups and tag == _tag(groups[-1][-1].label)[1] and bi != "B":
            groups[-1].append(entity)
        else:
            groups.append([entity])
    return [
        Entity(
            label=group[0].label.split("-", 1)[-1],
            score=float(np.nanmean([e.score for e in group])),
            word=facts.decode([e.word for e in group]),
            start=group[0].start,
            end=group[-1].end,
        )
        for group in groups
    ]


def merge_overlapping(entities: Sequence[Entity]) -> list[Entity]:
    """Entities of overlapping windows (``stride``) merged as the pipeline does: by
    start; of two overlapping entities the longer, or the more confident if as long."""
    if not entities:
        return []
    ordered = sorted(entities, key=lambda e: e.start)
    merged = []
    previous = ordered[0]
    for entity in ordered:
        if previous.start <= entity.start < previous.end:
            length, previous_length = entity.end - entity.start, previous.end - previous.start
            if length > previous_length or (
                length == previous_length and entity.score > previous.score
            ):
                previous = entity
        else:
            merged.append(previous)
            previous = entity
    merged.append(previous)
    return merged
