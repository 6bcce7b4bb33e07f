"""Token classification on the device: named entities and tags with character offsets.

    >>> ner = edge_slm.load("bundles/ner")                  # a TokenClassifier
    >>> [e.to_dict() for e in ner("My name is Wolfgang and I live in Berlin")]
    [{'entity_group': 'PER', 'score': 0.99, 'word': 'Wolfgang', 'start': 11, 'end': 19},
     {'entity_group': 'LOC', 'score': 0.99, 'word': 'Berlin', 'start': 34, 'end': 40}]
    >>> for result in ner.classify(open("notes.txt"), aggregation="first"):
    ...     print([(e.label, e.start, e.end) for e in result.entities])

The graph gives logits ``[batch, seq, labels]``; the runtime takes a softmax per token
and groups tokens into entities with the strategies of transformers' token
classification pipeline (:mod:`edge_slm.encoders.entities`): ``none``, ``simple``,
``first``, ``average``, ``max``, leaving out ``ignore_labels`` (``["O"]`` by default).

Three layers as in :mod:`edge_slm.encoders.classify`: :meth:`TokenClassifier.logits`
runs one batch; :meth:`classify_batches` yields one list of results per batch of a
(possibly endless) iterable, sorting each window of ``8 * batch_size`` texts by length;
:meth:`classify` takes one text or an iterable. ``ner(text)`` / ``ner([texts])`` return
the entities alone, shaped like the pipeline's output.

A text over the context length is refused (``truncation="error"``), cut (``"warn"``,
``"silent"``; :attr:`TokenClassification.truncated` says so, and entities after the cut
are missing), or, with ``stride=N``, tagged whole in windows of the context length that
overlap by ``N`` tokens, entities of overlapping windows merged as the pipeline's
``stride`` does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding, Tokenizer

from edge_slm.bundle import Manifest
from edge_slm.encoders.classify import softmax
from edge_slm.encoders.encoder import (
    MAX_BATCH_SIZE,
    SORT_WINDOW_BATCHES,
    EncoderModel,
    Truncation,
    check_positive,
    check_truncation,
)
from edge_slm.encoders.entities import (
    Aggregation,
    Entity,
    TokenizerFacts,
    aggregate,
    check_aggregation,
    gather_tokens,
    merge_overlapping,
)
from edge_slm.engine.session import LoadOptions
from edge_slm.errors import BundleError, ContextLengthError, InvalidArgumentError
from edge_slm.text.inputs import check_text, tokenizer_call

DEFAULT_BATCH_SIZE = 32
DEFAULT_AGGREGATION: Aggregation = "simple"
DEFAULT_IGNORE_LABELS: tuple[str, ...] = ("O",)


@dataclass(frozen=True)
class TokenClassification:
    """The result for one text.

    Attributes:
        entities: tokens or groups (see :class:`~edge_slm.encoders.entities.Entity`)
            in text order, labels in ``ignore_labels`` left out.
        truncated: the text was cut to the context length (entities after the cut are
            missing).
        windows: graph rows the text took (more than 1 only with ``stride``).
    """

    entities: tuple[Entity, ...]
    truncated: bool = False
    windows: int = 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``edge-slm ner`` prints)."""
        return {
            "entities": [entity.to_dict() for entity in self.entities],
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class _Options:
    aggregation: Aggregation
    ignore: frozenset[str]
    batch_size: int
    truncation: Truncation
    stride: int | None


class TokenClassifier:
    """A token-classification bundle loaded for inference (numpy + onnxruntime only)."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        options: LoadOptions | None = None,
    ) -> None:
        if manifest.task != "token-classification" or not manifest.labels:
            raise BundleError(
                f"TokenClassifier needs a token-classification bundle with labels, got task "
                f"{manifest.task!r}"
            )
        self.manifest = manifest
        self.labels: tuple[str, ...] = tuple(manifest.labels)
        self.model = EncoderModel(folder, manifest, options)
        tokenizer = self.model.tokenizer
        unk = getattr(tokenizer.model, "unk_token", None)
        decoder = tokenizer.decoder
        self.facts = TokenizerFacts(
            subword_prefix=getattr(tokenizer.model, "continuing_subword_prefix", None),
            unk_token_id=tokenizer.token_to_id(unk) if unk else None,
            decode=decoder.decode if decoder is not None else " ".join,
        )
        self._specials = int(tokenizer.num_special_tokens_to_add(False))
        self._striding: dict[int, Tokenizer] = {}
        self._lock = threading.Lock()

    @property
    def max_length(self) -> int:
        """Tokens per window (special tokens included) the model accepts."""
        return self.model.max_length

    def logits(
        self, texts: Sequence[str], truncation: Truncation = "error"
    ) -> npt.NDArray[np.float32]:
        """Raw logits ``[len(texts), seq, labels]`` of one batch padded to its longest text."""
        checked = [check_text(t, f"input {i}") for i, t in enumerate(texts)]
        return self.model.run(self.model.encode(checked, check_truncation(truncation)))

    def _options(
        self,
        aggregation: str,
        ignore_labels: Iterable[str] | None,
        batch_size: int,
        truncation: str,
        stride: int | None,
    ) -> _Options:
        strategy = check_aggregation(aggregation)
        check_positive("batch_size", batch_size, MAX_BATCH_SIZE)
        if ignore_labels is None:
            ignore = frozenset(DEFAULT_IGNORE_LABELS)
        elif isinstance(ignore_labels, str) or not all(
            isinstance(label, str) for label in ignore_labels
        ):
            raise InvalidArgumentError(
                f"ignore_labels must be a list of label strings, got {ignore_labels!r}"
            )
        else:
            ignore = frozenset(ignore_labels)
        if stride is not None:
            usable = self.max_length - self._specials
            if isinstance(stride, bool) or not isinstance(stride, int) or not 0 <= stride < usable:
                raise InvalidArgumentError(
                    f"stride must be an integer in [0, {usable - 1}] (tokens shared by "
                    f"consecutive windows of {usable} text tokens), got {stride!r}"
                )
            if strategy == "none":
                raise InvalidArgumentError(
                    "stride needs a grouping aggregation (simple, first, average or max): "
                    "the tokens of overlapping windows are merged as entities"
                )
        return _Options(strategy, ignore, batch_size, check_truncation(truncation), stride)

    def _striding_tokenizer(self, stride: int) -> Tokenizer:
        """The bundle's tokenizer cutting texts into windows overlapping by ``stride``."""
        with self._lock:
            tokenizer = self._striding.get(stride)
            if tokenizer is None:
                tokenizer = Tokenizer.from_str(self.model.tokenizer.to_str())
                tokenizer.enable_truncation(self.max_length, stride=stride)
                self._striding[stride] = tokenizer
            return tokenizer

    def _windows(
        self, texts: Sequence[str], options: _Options, offset: int
    ) -> tuple[list[list[Encoding]], tuple[bool, ...]]:
        """Per text its windows (one unless ``stride``) and whether it was cut."""
        if options.stride is not None:
            tokenizer = self._striding_tokenizer(options.stride)
            encodings = tokenizer_call(tokenizer.encode_batch, list(texts))
            return [[e, *e.overflowing] for e in encodings], (False,) * len(texts)
        try:
            encodings, truncated = self.model.tokenize(texts, options.truncation, offset)
        except ContextLengthError as exc:
            raise ContextLengthError(f"{exc}; or stride=N to tag it whole in windows") from None
        return [[e] for e in encodings], truncated

    def _probabilities(
        self, rows: Sequence[Encoding], batch_size: int
    ) -> list[npt.NDArray[np.float32]]:
        """Per row its token probabilities ``[tokens, labels]``, run in length-sorted batches."""
        order = sorted(range(len(rows)), key=lambda r: len(rows[r].ids))
        out: list[npt.NDArray[np.float32]] = [np.empty(0, np.float32)] * len(rows)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = self.model.pad([rows[r] for r in chunk], [False] * len(chunk))
            logits = self.model.run(batch)  # [batch, seq, labels]
            for j, r in enumerate(chunk):
                out[r] = softmax(logits[j, : len(rows[r].ids)])
        return out

    def _entities(
        self,
        text: str,
        windows: Sequence[Encoding],
        probabilities: Sequence[npt.NDArray[np.float32]],
        options: _Options,
    ) -> list[Entity]:
        tokenizer = self.model.tokenizer
        entities: list[Entity] = []
        for encoding, scores in zip(windows, probabilities, strict=True):
            tokens = [tokenizer.id_to_token(i) for i in encoding.ids]
            gathered = gather_tokens(
                text,
                encoding.ids,
                tokens,
                encoding.offsets,
                encoding.special_tokens_mask,
                scores,
                self.facts,
            )
            grouped = aggregate(gathered, options.aggregation, self.labels, self.facts)
            entities.extend(e for e in grouped if e.label not in options.ignore)
        return merge_overlapping(entities) if len(windows) > 1 else entities

    def classify_batches(
        self,
        texts: Iterable[str],
        *,
        aggregation: Aggregation = DEFAULT_AGGREGATION,
        ignore_labels: Iterable[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        truncation: Truncation = "error",
        stride: int | None = None,
    ) -> Iterator[list[TokenClassification]]:
        """Tag an iterable lazily, yielding one list of results per ``batch_size`` texts.

        Arguments as in :meth:`classify`. The iterable is read ``8 * batch_size`` texts
        at a time; within that window the graph rows (one per text, or per window of a
        long text with ``stride``) run in batches of similar token length, and the
        results come back in input order.
        """
        options = self._options(aggregation, ignore_labels, batch_size, truncation, stride)
        iterator = iter(texts)
        offset = 0
        while chunk := list(islice(iterator, batch_size * SORT_WINDOW_BATCHES)):
            window = [check_text(t, f"input {offset + i}") for i, t in enumerate(chunk)]
            per_text, flags = self._windows(window, options, offset)
            rows = [encoding for windows in per_text for encoding in windows]
            probabilities = self._probabilities(rows, batch_size)
            results = []
            first = 0
            for text, windows, truncated in zip(window, per_text, flags, strict=True):
                scores = probabilities[first : first + len(windows)]
                first += len(windows)
                entities = self._entities(text, windows, scores, options)
                results.append(TokenClassification(tuple(entities), truncated, len(windows)))
            offset += len(window)
            for start in range(0, len(results), batch_size):
                yield results[start : start + batch_size]

    @overload
    def classify(  # type: ignore[overload-overlap]  # str is also an Iterable
        self,
        texts: str,
        *,
        aggregation: Aggregation = ...,
        ignore_labels: Iterable[str] | None = ...,
        batch_size: int = ...,
        truncation: Truncation = ...,
        stride: int | None = ...,
    ) -> TokenClassification: ...

    @overload
    def classify(
        self,
        texts: Iterable[str],
        *,
        aggregation: Aggregation = ...,
        ignore_labels: Iterable[str] | None = ...,
        batch_size: int = ...,
        truncation: Truncation = ...,
        stride: int | None = ...,
    ) -> Iterator[TokenClassification]: ...

    def classify(
        self,
        texts: str | Iterable[str],
        *,
        aggregation: Aggregation = DEFAULT_AGGREGATION,
        ignore_labels: Iterable[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        truncation: Truncation = "error",
        stride: int | None = None,
    ) -> TokenClassification | Iterator[TokenClassification]:
        """Tag one text, or an iterable of texts.

        Args:
            texts: one ``str`` (returns one result) or an iterable of ``str`` (returns a
                generator, one result per text, computed ``batch_size`` rows at a time).
            aggregation: "none" (every token), "simple", "first", "average" or "max"
                (see :mod:`edge_slm.encoders.entities`); the transformers pipeline's
                default is "none", ours "simple" (entities rather than tokens).
            ignore_labels: labels (or groups) left out; default ``["O"]``.
            batch_size: graph rows per run (each batch padded to its longest row).
            truncation: "error" (ContextLengthError for a text over the context
                length), "warn" (cut it with a TruncationWarning) or "silent".
            stride: tag long texts whole, in windows of the context length that share
                ``stride`` tokens (needs a grouping aggregation; ``truncation`` then
                does not apply).

        Raises:
            InvalidArgumentError: a bad option or a text that is not a ``str``.
            ContextLengthError: a text is too long, ``truncation`` is "error" and no
                ``stride`` is given.
        """
        kwargs: dict[str, Any] = {
            "aggregation": aggregation,
            "ignore_labels": ignore_labels,
            "batch_size": batch_size,
            "truncation": truncation,
            "stride": stride,
        }
        if isinstance(texts, str):
            (results,) = self.classify_batches([texts], **kwargs)
            return results[0]
        self._options(aggregation, ignore_labels, batch_size, truncation, stride)  # fail early
        return (result for batch in self.classify_batches(texts, **kwargs) for result in batch)

    @overload
    def __call__(self, texts: str, **options: Any) -> list[Entity]: ...

    @overload
    def __call__(self, texts: Sequence[str], **options: Any) -> list[list[Entity]]: ...

    def __call__(self, texts: str | Sequence[str], **options: Any) -> Any:
        """The entities of one text, or a list of entity lists for a list of texts.

        Shaped like ``pipeline("token-classification")(texts)``; ``options`` are
        :meth:`classify`'s.
        """
        if isinstance(texts, str):
            return list(self.classify(texts, **options).entities)
        return [list(result.entities) for result in self.classify(texts, **options)]
