"""Sentence embeddings on the device, and a small cosine index (a kiosk FAQ).

    >>> embedder = edge_slm.load("bundles/minilm")
    >>> faq = CosineIndex.build(embedder, ["Where is the toilet?", "Opening hours?"])
    >>> faq.search("when do you open", k=1)[0].text
    'Opening hours?'

The bundle's graph already pools token states into one vector per text (mean or CLS,
as the sentence-transformers files of the source said) and L2-normalises it when the
source did (``encoder.pooling`` / ``encoder.normalize`` in the manifest), so the
runtime only batches texts and returns the graph's output.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

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
    check_truncation,
)
from edge_slm.engine.session import LoadOptions
from edge_slm.errors import BundleError, InvalidArgumentError

DEFAULT_BATCH_SIZE = 32


class TextEmbedder:
    """A feature-extraction bundle loaded for inference (numpy + onnxruntime only)."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        options: LoadOptions | None = None,
    ) -> None:
        if manifest.task != "feature-extraction":
            raise BundleError(
                f"TextEmbedder needs a feature-extraction bundle, got {manifest.task!r}"
            )
        self.manifest = manifest
        self.model = EncoderModel(folder, manifest, options)
        assert manifest.encoder is not None
        self.normalized = manifest.encoder.normalize
        self.dimension = manifest.encoder.hidden_size

    @property
    def max_length(self) -> int:
        """Tokens per input (special tokens included) the model accepts."""
        return self.model.max_length

    def embed_batches(
        self,
        texts: Iterable[TextInput],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        truncation: Truncation = "warn",
    ) -> Iterator[npt.NDArray[np.float32]]:
        """Embed an iterable lazily, yielding one ``[batch, dim]`` array per batch.

        Inputs are read ``8 * batch_size`` at a time and run in batches of similar
        length (see :meth:`TextClassifier.classify_batches`); output is in input order.
        """
        check_positive("batch_size", batch_size, MAX_BATCH_SIZE)
        check_truncation(truncation)
        offset = 0
        for window in batched(texts, batch_size * SORT_WINDOW_BATCHES):
            vectors, _ = self.model.run_sorted(window, batch_size, truncation, offset)
            offset += len(window)
            for start in range(0, len(vectors), batch_size):
                yield vectors[start : start + batch_size]

    @overload
    def embed(  # type: ignore[overload-overlap]  # str is also an Iterable
        self, texts: str, *, batch_size: int = ..., truncation: Truncation = ...
    ) -> npt.NDArray[np.float32]: ...

    @overload
    def embed(
        self, texts: Iterable[TextInput], *, batch_size: int = ..., truncation: Truncation = ...
    ) -> Iterator[npt.NDArray[np.float32]]: ...

    def embed(
        self,
        texts: str | Iterable[TextInput],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        truncation: Truncation = "warn",
    ) -> npt.NDArray[np.float32] | Iterator[npt.NDArray[np.float32]]:
        """Embed one text (a ``[dim]`` vector) or an iterable (a generator of vectors).

        Args:
            texts: one ``str``, or an iterable of texts, computed ``batch_size`` at a time.
            batch_size: texts per graph run (each batch padded to its longest text).
            truncation: "warn" (default, as sentence-transformers cuts silently),
                "silent", or "error" for ContextLengthError on a text that is too long.
        """
        if isinstance(texts, str):
            (vectors,) = self.embed_batches([texts], batch_size=1, truncation=truncation)
            vector: npt.NDArray[np.float32] = vectors[0]
            return vector
        check_positive("batch_size", batch_size, MAX_BATCH_SIZE)
        check_truncation(truncation)
        return self._rows(self.embed_batches(texts, batch_size=batch_size, truncation=truncation))

    def embed_all(
        self,
        texts: Sequence[TextInput],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        truncation: Truncation = "warn",
    ) -> npt.NDArray[np.float32]:
        """Embeddings of a finite sequence as one ``[len(texts), dim]`` matrix."""
        batches = list(self.embed_batches(texts, batch_size=batch_size, truncation=truncation))
        if not batches:
            return np.zeros((0, self.dimension or 0), dtype=np.float32)
        return np.concatenate(batches, axis=0)

    @staticmethod
    def _rows(batches: Iterator[npt.NDArray[np.float32]]) -> Iterator[npt.NDArray[np.float32]]:
        for batch in batches:
            yield from batch


def normalize_rows(matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Rows scaled to unit L2 norm (zero rows stay zero), like torch's F.normalize."""
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return np.asarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)


@dataclass(frozen=True)
class Hit:
    """One neighbour: its position in the index, its text and its cosine similarity."""

    index: int
    text: str
    score: float


@dataclass(frozen=True, eq=False)  # holds arrays: compare by identity
class CosineIndex:
    """Exact top-k search by cosine similarity over a few thousand texts (e.g. a FAQ).

    Built once at start-up; a query costs one embedding plus one matrix-vector product.
    """

    embedder: TextEmbedder
    texts: tuple[str, ...]
    vectors: npt.NDArray[np.float32]  # [len(texts), dim], unit rows

    @classmethod
    def build(
        cls, embedder: TextEmbedder, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE
    ) -> CosineIndex:
        """Embed ``texts`` (e.g. the FAQ's questions) and keep them for search."""
        if not texts:
            raise InvalidArgumentError("a CosineIndex needs at least one text")
        vectors = normalize_rows(embedder.embed_all(list(texts), batch_size=batch_size))
        return cls(embedder, tuple(texts), vectors)

    def search(self, query: str, k: int = 3) -> list[Hit]:
        """The ``k`` texts most similar to ``query``, most similar first."""
        check_positive("k", k)
        vector = normalize_rows(self.embedder.embed(query)[None, :])[0]  # [dim]
        scores = self.vectors @ vector  # [len(texts)]
        k = min(k, len(self.texts))
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [Hit(int(i), self.texts[i], float(scores[i])) for i in best]
