"""Text classification on the device: labels and probabilities from an encoder bundle.

    >>> clf = edge_slm.load("bundles/sentiment")
    >>> clf.classify("What a lovely day").label
    'positive'
    >>> for result in clf.classify(open("feedback.txt"), batch_size=32):
    ...     print(result.label, result.score)

Three layers: :meth:`TextClassifier.logits` runs one batch; :meth:`classify_batches`
yields one list of results per batch of a (possibly endless) iterable;
:meth:`classify` takes one text and returns one result, or an iterable and yields
one result per text. Single-label models score with a softmax, multi-label models
(``problem_type`` "multi_label_classification" in the manifest) with a sigmoid per
label, and keep the labels at or above ``threshold``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from edge_slm.bundle import Manifest
from edge_slm.encoders.encoder import (
    MAX_BATCH_SIZE,
    SORT_WINDOW_BATCHES,
    EncoderModel,
    TextInput,
    Truncation,
    batched,
    check_positive,
    check_text,
    check_truncation,
)
from edge_slm.engine.session import LoadOptions
from edge_slm.errors import BundleError, InvalidArgumentError

DEFAULT_BATCH_SIZE = 32
DEFAULT_MULTI_LABEL_THRESHOLD = 0.5


@dataclass(frozen=True)
class Classification:
    """The result for one text: labels best first, with their probabilities.

    Attributes:
        labels: chosen labels, highest score first (may be empty for a multi-label
            model when no label reaches the threshold).
        scores: the probabilities of ``labels``, in the same order.
        truncated: the text was cut to the model's context length.
    """

    labels: tuple[str, ...]
    scores: tuple[float, ...]
    truncated: bool = False

    @property
    def label(self) -> str | None:
        """The best label, or None when no label passed the threshold."""
        return self.labels[0] if self.labels else None

    @property
    def score(self) -> float | None:
        """The best label's probability, or None when there is no label."""
        return self.scores[0] if self.scores else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``edge-slm classify`` prints)."""
        return {
            "label": self.label,
            "score": self.score,
            "labels": list(self.labels),
            "scores": list(self.scores),
            "truncated": self.truncated,
        }


def softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Row-wise softmax of ``logits`` [batch, labels], stable for large values."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=-1, keepdims=True), dtype=np.float32)


def sigmoid(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Element-wise logistic function, without overflow warnings for large |x|."""
    out = np.empty_like(logits, dtype=np.float32)
    positive = logits >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-logits[positive]))
    exp = np.exp(logits[~positive])
    out[~positive] = exp / (1.0 + exp)
    return out


def select(
    probabilities: npt.NDArray[np.float32],
    labels: Sequence[str],
    top_k: int | None,
    threshold: float | None,
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Labels of one row of ``probabilities``, best first, at most ``top_k``, >= threshold."""
    order = np.argsort(-probabilities, kind="stable")
    if threshold is not None:
        order = order[probabilities[order] >= threshold]
    if top_k is not None:
        order = order[:top_k]
    return tuple(labels[i] for i in order), tuple(float(probabilities[i]) for i in order)


class TextClassifier:
    """A text-classification bundle loaded for inference (numpy + onnxruntime only)."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        options: LoadOptions | None = None,
    ) -> None:
        if manifest.task != "text-classification" or not manifest.labels:
            raise BundleError(
                f"TextClassifier needs a text-classification bundle with labels, got task "
                f"{manifest.task!r}"
            )
        self.manifest = manifest
        self.labels: tuple[str, ...] = tuple(manifest.labels)
        self.model = EncoderModel(folder, manifest, options)
        assert manifest.encoder is not None
        self.multi_label = manifest.encoder.problem_type == "multi_label_classification"

    @property
    def max_length(self) -> int:
        """Tokens per input (pair included, special tokens included) the model accepts."""
        return self.model.max_length

    def logits(
        self, texts: Sequence[TextInput], truncation: Truncation = "error"
    ) -> npt.NDArray[np.float32]:
        """Raw logits [len(texts), labels] of one batch (padded to its longest text)."""
        checked = [check_text(t, i) for i, t in enumerate(texts)]
        return self.model.run(self.model.encode(checked, check_truncation(truncation)))

    def probabilities(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Softmax (single-label) or sigmoid (multi-label) of ``logits``."""
        return sigmoid(logits) if self.multi_label else softmax(logits)

    def _options(
        self, top_k: int | None, threshold: float | None, batch_size: int, truncation: str
    ) -> tuple[int | None, float | None]:
        check_positive("batch_size", batch_size, MAX_BATCH_SIZE)
        check_truncation(truncation)
        if top_k is not None:
            check_positive("top_k", top_k)
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InvalidArgumentError(f"threshold must be in [0, 1], got {threshold!r}")
        if self.multi_label:
            return top_k, DEFAULT_MULTI_LABEL_THRESHOLD if threshold is None else threshold
        return (1 if top_k is None else top_k), threshold

    def classify_batches(
        self,
        texts: Iterable[TextInput],
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        truncation: Truncation = "error",
    ) -> Iterator[list[Classification]]:
        """Classify an iterable lazily, yielding one list of results per batch.

        Arguments as in :meth:`classify`. The iterable is read ``8 * batch_size`` inputs
        at a time; within that window inputs are run in batches of similar token length
        (less padding) and the results come back in input order. Memory stays at one
        window however long the iterable is.
        """
        top_k, threshold = self._options(top_k, threshold, batch_size, truncation)
        offset = 0
        for window in batched(texts, batch_size * SORT_WINDOW_BATCHES):
            logits, flags = self.model.run_sorted(window, batch_size, truncation, offset)
            probabilities = self.probabilities(logits)  # [window, labels]
            results = []
            for row, truncated in zip(probabilities, flags, strict=True):
                labels, scores = select(row, self.labels, top_k, threshold)
                results.append(Classification(labels, scores, truncated))
            offset += len(window)
            for start in range(0, len(results), batch_size):
                yield results[start : start + batch_size]

    @overload
    def classify(  # type: ignore[overload-overlap]  # str is also an Iterable
        self,
        texts: str,
        *,
        top_k: int | None = ...,
        threshold: float | None = ...,
        batch_size: int = ...,
        truncation: Truncation = ...,
    ) -> Classification: ...

    @overload
    def classify(
        self,
        texts: Iterable[TextInput],
        *,
        top_k: int | None = ...,
        threshold: float | None = ...,
        batch_size: int = ...,
        truncation: Truncation = ...,
    ) -> Iterator[Classification]: ...

    def classify(
        self,
        texts: str | Iterable[TextInput],
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        truncation: Truncation = "error",
    ) -> Classification | Iterator[Classification]:
        """Classify one text, or an iterable of texts / (first, second) pairs.

        Args:
            texts: one ``str`` (returns one result), or an iterable of ``str`` and
                ``(first, second)`` tuples (returns a generator, one result per input,
                computed ``batch_size`` inputs at a time).
            top_k: how many labels to keep per text; default 1 for single-label
                models, all labels over the threshold for multi-label ones.
            threshold: keep labels with probability >= threshold; default 0.5 for
                multi-label models, none for single-label ones.
            batch_size: inputs per graph run (each batch padded to its longest input).
            truncation: "error" (ContextLengthError for a text over the context
                length), "warn" (cut it with a TruncationWarning) or "silent".

        Raises:
            InvalidArgumentError: a bad option or input type (names the value).
            ContextLengthError: a text is too long and ``truncation`` is "error".
        """
        if isinstance(texts, str):
            (results,) = self.classify_batches(
                [texts],
                top_k=top_k,
                threshold=threshold,
                batch_size=batch_size,
                truncation=truncation,
            )
            return results[0]
        if isinstance(texts, tuple) and len(texts) == 2 and all(isinstance(t, str) for t in texts):
            raise InvalidArgumentError(
                "classify() got a bare 2-tuple of strings: pass [(first, second)] for one text "
                "pair or [first, second] for two texts"
            )
        self._options(top_k, threshold, batch_size, truncation)  # fail before iterating
        return self._flatten(
            self.classify_batches(
                texts,
                top_k=top_k,
                threshold=threshold,
                batch_size=batch_size,
                truncation=truncation,
            )
        )

    @staticmethod
    def _flatten(batches: Iterator[list[Classification]]) -> Iterator[Classification]:
        for batch in batches:
            yield from batch
