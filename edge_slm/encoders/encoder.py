"""Run an encoder graph on batches of texts: tokenize, truncate, pad per batch, run.

Shared by :mod:`edge_slm.encoders.classify` and :mod:`edge_slm.encoders.embed`. Inputs are one text
(``str``) or a text pair (a ``(first, second)`` tuple, e.g. question and passage);
the bundle's ``tokenizer.json`` adds the special tokens and token type ids for both.

Padding is dynamic: each batch is padded to its own longest sequence, never to the
model's context length, so a batch of short texts costs what short texts cost.
Texts longer than the context length are refused (``truncation="error"``) or cut
(``"warn"`` warns, ``"silent"`` does not), the way transformers' ``truncation=True``
cuts them: longest sequence of a pair first, special tokens kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding, Tokenizer

from edge_slm.bundle import EncoderIO, Manifest
from edge_slm.bundle.semantics import check_encoder, load_tokenizer
from edge_slm.engine.overlap import build_beside
from edge_slm.engine.session import LoadOptions
from edge_slm.errors import BundleError, ContextLengthError, InvalidArgumentError
from edge_slm.text.inputs import check_text as check_valid_text
from edge_slm.text.inputs import tokenizer_call

TextInput = str | tuple[str, str]
Truncation = Literal["error", "warn", "silent"]
TRUNCATION_MODES: tuple[str, ...] = ("error", "warn", "silent")


class TruncationWarning(UserWarning):
    """A text was longer than the model's context length and was cut."""


@dataclass(frozen=True)
class EncodedBatch:
    """One padded batch, ready for the graph."""

    input_ids: npt.NDArray[np.int64]  # [batch, seq]
    attention_mask: npt.NDArray[np.int64]  # [batch, seq]
    token_type_ids: npt.NDArray[np.int64]  # [batch, seq]
    truncated: tuple[bool, ...]  # per text: was it cut to the context length


def check_text(item: object, index: int) -> TextInput:
    """Return ``item`` as a text or a text pair; InvalidArgumentError otherwise."""
    if isinstance(item, str):
        return check_valid_text(item, f"input {index}")
    if isinstance(item, (tuple, list)):
        if len(item) == 2 and all(isinstance(part, str) for part in item):
            first = check_valid_text(item[0], f"input {index} (first text)")
            return (first, check_valid_text(item[1], f"input {index} (second text)"))
        raise InvalidArgumentError(
            f"input {index} is a {type(item).__name__} of {len(item)} items; a text pair "
            "must be exactly two strings (first, second)"
        )
    raise InvalidArgumentError(
        f"input {index} is a {type(item).__name__}; allowed: str or a (str, str) pair"
    )


MAX_BATCH_SIZE = 4096
"""The most texts one forward may take (a larger batch only allocates more)."""


def check_positive(name: str, value: int, high: int | None = None) -> int:
    """Raise InvalidArgumentError unless ``value`` is an int >= 1 (and <= ``high``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")
    if high is not None and value > high:
        raise InvalidArgumentError(f"{name} must be an integer in [1, {high}], got {value}")
    return value


def check_truncation(value: str) -> Truncation:
    """Raise InvalidArgumentError unless ``value`` is one of TRUNCATION_MODES."""
    if value not in TRUNCATION_MODES:
        raise InvalidArgumentError(
            f"truncation must be one of {list(TRUNCATION_MODES)}, got {value!r}"
        )
    return value  # type: ignore[return-value]


# Inputs read ahead and sorted by length (in units of batch_size) by the batch generators.
SORT_WINDOW_BATCHES = 8


def batched(items: Iterable[object], batch_size: int) -> Iterator[list[TextInput]]:
    """Consume ``items`` lazily in lists of ``batch_size`` checked inputs."""
    iterator = iter(items)
    index = 0
    while chunk := list(islice(iterator, batch_size)):
        yield [check_text(item, index + i) for i, item in enumerate(chunk)]
        index += len(chunk)


class EncoderModel:
    """An encoder graph with its tokenizer: texts in, the graph's output array out."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        options: LoadOptions | None = None,
    ) -> None:
        if manifest.encoder is None:
            raise BundleError(f"a {manifest.task} bundle needs an 'encoder' section")
        self.manifest = manifest
        self.io: EncoderIO = manifest.encoder
        self.max_length = manifest.context_length
        opened, self.tokenizer = build_beside(  # the parse on a second core, see overlap.py
            lambda: (options or LoadOptions()).open(folder / manifest.files["model"]),
            lambda: load_tokenizer(folder / manifest.files["tokenizer"]),
        )
        self.session = opened.session
        self._check_graph()
        check_encoder(manifest, self.session, self.tokenizer)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self._truncating = Tokenizer.from_str(self.tokenizer.to_str())
        self._truncating.enable_truncation(self.max_length)
        pad = manifest.special_tokens.pad_token_id
        self.pad_token_id = 0 if pad is None else pad

    def _check_graph(self) -> None:
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        wanted = {self.io.input_ids, self.io.attention_mask}
        if self.io.token_type_ids is not None:
            wanted.add(self.io.token_type_ids)
        if inputs != wanted:
            raise BundleError(
                f"graph inputs {sorted(inputs)} differ from the manifest's encoder section "
                f"{sorted(wanted)}"
            )
        if self.io.output not in outputs:
            raise BundleError(f"graph has no output {self.io.output!r}; it has {sorted(outputs)}")

    def encode(
        self, texts: Sequence[TextInput], truncation: Truncation = "error", offset: int = 0
    ) -> EncodedBatch:
        """Tokenize ``texts`` and pad them to the batch's longest sequence.

        Args:
            texts: texts or (first, second) pairs, already checked.
            truncation: what to do with a text over the context length.
            offset: index of ``texts[0]`` in the caller's whole input (for messages).

        Raises:
            ContextLengthError: a text is too long and ``truncation`` is "error".
        """
        encodings, truncated = self.tokenize(texts, truncation, offset)
        return self.pad(encodings, truncated)

    def tokenize(
        self, texts: Sequence[TextInput], truncation: Truncation = "error", offset: int = 0
    ) -> tuple[list[Encoding], tuple[bool, ...]]:
        """Token encodings of ``texts`` (cut to the context length as ``truncation`` says)
        and, per text, whether it was cut. Arguments as in :meth:`encode`."""
        if not texts:
            raise InvalidArgumentError("cannot encode an empty batch")
        encodings: list[Encoding] = tokenizer_call(self.tokenizer.encode_batch, list(texts))
        too_long = [i for i, e in enumerate(encodings) if len(e.ids) > self.max_length]
        if too_long:
            first = too_long[0]
            message = (
                f"input {offset + first} has {len(encodings[first].ids)} tokens, more than "
                f"the model's context length {self.max_length}"
            )
            if truncation == "error":
                raise ContextLengthError(
                    f"{message} (truncation='error'; pass truncation='warn' or 'silent' to cut)"
                )
            if truncation == "warn":
                warnings.warn(
                    f"{message}; {len(too_long)} input(s) of this batch were truncated",
                    TruncationWarning,
                    stacklevel=4,
                )
            cut = tokenizer_call(self._truncating.encode_batch, [texts[i] for i in too_long])
            for i, encoding in zip(too_long, cut, strict=True):
                encodings[i] = encoding
        flags = set(too_long)
        return encodings, tuple(i in flags for i in range(len(encodings)))

    def pad(self, encodings: Sequence[Encoding], truncated: Sequence[bool]) -> EncodedBatch:
        """Pad ``encodings`` to the longest of them (ids with the pad id, mask with 0)."""
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            mask[row, :n] = 1
            types[row, :n] = encoding.type_ids
        return EncodedBatch(ids, mask, types, tuple(truncated))

    def run_sorted(
        self,
        texts: Sequence[TextInput],
        batch_size: int,
        truncation: Truncation = "error",
        offset: int = 0,
    ) -> tuple[npt.NDArray[np.float32], tuple[bool, ...]]:
        """Outputs for ``texts`` in their order, computed in batches of similar length.

        The texts are tokenized once, sorted by token count, run ``batch_size`` at a
        time (so each batch pads little), and the outputs put back in input order.
        Row ``i`` of the result equals ``run(encode([texts[i]]))`` up to float rounding.

        Returns:
            (outputs ``[len(texts), ...]``, per text whether it was truncated).
        """
        encodings, truncated = self.tokenize(texts, truncation, offset)
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        parts: list[npt.NDArray[np.float32]] = []
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self.pad([encodings[i] for i in rows], [truncated[i] for i in rows])
            parts.append(self.run(batch))
        sorted_out = np.concatenate(parts, axis=0)
        out = np.empty_like(sorted_out)
        out[np.asarray(order)] = sorted_out
        return out, truncated

    def run(self, batch: EncodedBatch) -> npt.NDArray[np.float32]:
        """The graph's output for one batch, e.g. logits [batch, labels] or embeddings."""
        feeds = {self.io.input_ids: batch.input_ids, self.io.attention_mask: batch.attention_mask}
        if self.io.token_type_ids is not None:
            feeds[self.io.token_type_ids] = batch.token_type_ids
        (output,) = self.session.run([self.io.output], feeds)
        return np.asarray(output, dtype=np.float32)
