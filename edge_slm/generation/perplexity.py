"""Perplexity of a decoder bundle over a text: the quality figure of a (quantized) bundle.

Runtime code (numpy, onnxruntime, tokenizers): the build stage records it in the
manifest when quantizing, and ``edge-slm perplexity BUNDLE TEXT`` measures it on a device.

The text is tokenized with the bundle's ``tokenizer.json``, cut to ``max_tokens`` and
split into non-overlapping windows of ``window`` tokens (at most the context length).
Within a window each token after the first is predicted from the ones before it (from
an empty cache, :meth:`~edge_slm.generation.plain_step.PlainDecoder.all_logits`); when the model
expects a BOS token it is put in front of every window, so every text token is
predicted. Perplexity is ``exp`` of the mean negative log-likelihood over all predicted
tokens. Windows are scored one at a time, so memory stays at one window's logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edge_slm.bundle import Manifest, read_manifest
from edge_slm.engine.session import LoadOptions
from edge_slm.errors import InvalidArgumentError
from edge_slm.generation.decoders import Decoder, open_decoder

DEFAULT_WINDOW = 512
DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity, how many tokens were predicted, and over how many windows."""

    perplexity: float
    tokens: int
    windows: int


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; InvalidArgumentError if it is missing, not UTF-8 or blank."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError(f"evaluation text {str(path)!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"evaluation text {str(path)!r} is not UTF-8: {exc}") from None
    if not text.strip():
        raise InvalidArgumentError(f"evaluation text {str(path)!r} is empty")
    return text


def encode_text(tokenizer: Tokenizer, text: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[int]:
    """Token ids of ``text`` without special tokens, the first ``max_tokens`` of them."""
    if max_tokens < 2:
        raise InvalidArgumentError(f"max_tokens must be >= 2, got {max_tokens}")
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False).ids
    return ids[:max_tokens]


def token_windows(
    ids: Sequence[int], window: int, bos_token_id: int | None = None
) -> list[np.ndarray]:
    """Non-overlapping windows of ``ids``, each ``[1, <= window]`` int64.

    With ``bos_token_id`` each window is BOS + ``window - 1`` text tokens. A last window
    that would predict nothing is dropped.
    """
    step = window - 1 if bos_token_id is not None else window
    if step < 1:
        raise InvalidArgumentError(f"window must be >= 2, got {window}")
    windows = []
    for start in range(0, len(ids), step):
        chunk = list(ids[start : start + step])
        if bos_token_id is not None:
            chunk = [bos_token_id, *chunk]
        if len(chunk) >= 2:
            windows.append(np.asarray([chunk], dtype=np.int64))
    return windows


def _window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Sum of -log p(token) over a window's predicted tokens.

    Args:
        logits: ``[seq, vocab]`` float32 logits of one window.
        ids: ``[seq]`` the window's token ids; position i predicts ids[i + 1].
    """
    scores = logits[:-1].astype(np.float64)  # [seq-1, vocab]
    top = scores.max(axis=-1, keepdims=True)  # [seq-1, 1]
    log_z = top[:, 0] + np.log(np.exp(scores - top).sum(axis=-1))  # [seq-1]
    target = scores[np.arange(len(scores)), ids[1:]]  # [seq-1]
    return float((log_z - target).sum())


def perplexity(
    model: Decoder,
    ids: Sequence[int],
    *,
    window: int = DEFAULT_WINDOW,
    bos_token_id: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the token ids ``ids`` in non-overlapping windows.

    Args:
        model: the decoder graph.
        ids: text token ids (no special tokens).
        window: tokens per window, BOS included (cap it at the context length).
        bos_token_id: prepended to every window when the model expects a BOS.

    Raises:
        InvalidArgumentError: too few tokens to predict anything, or a bad window.
    """
    windows = token_windows(ids, window, bos_token_id)
    if not windows:
        raise InvalidArgumentError(
            f"the evaluation text has {len(ids)} token(s); at least 2 are needed"
        )
    total_nll = 0.0
    predicted = 0
    for chunk in windows:
        logits = model.all_logits(chunk)[0]  # [seq, vocab]
        total_nll += _window_nll(logits, chunk[0])
        predicted += chunk.shape[1] - 1
    return PerplexityResult(math.exp(total_nll / predicted), predicted, len(windows))


def effective_window(manifest: Manifest, window: int) -> int:
    """``window`` capped by the bundle's context length."""
    return min(window, manifest.context_length)


def bos_for_scoring(manifest: Manifest) -> int | None:
    """The BOS id to put in front of every window, if the model's tokenizer adds one."""
    special = manifest.special_tokens
    return special.bos_token_id if special.add_bos_token else None


def bundle_perplexity(
    bundle: Path,
    text_file: Path,
    *,
    model_path: Path | None = None,
    window: int = DEFAULT_WINDOW,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    threads: int | None = None,
) -> PerplexityResult:
    """Perplexity of a decoder bundle's graph over a UTF-8 text file.

    Args:
        bundle: the bundle folder (its manifest and tokenizer are used).
        text_file: the evaluation text.
        model_path: score this graph instead of the bundle's own (e.g. a quantized
            graph not yet written into a bundle); it must have the same I/O.
        window: tokens per window (capped by the context length).
        max_tokens: tokens of the text to use at most.
        threads: onnxruntime intra-op threads (None: all CPUs).
    """
    bundle = Path(bundle)
    manifest, _ = read_manifest(bundle)
    if manifest.decoder is None:
        raise InvalidArgumentError(
            f"bundle {str(bundle)!r} is a {manifest.task} bundle, not a decoder"
        )
    tokenizer = Tokenizer.from_file(str(bundle / manifest.files["tokenizer"]))
    ids = encode_text(tokenizer, read_text(text_file), max_tokens)
    model = open_decoder(
        model_path or bundle / manifest.files["model"],
        manifest.decoder,
        LoadOptions(threads=threads),
    )
    return perplexity(
        model,
        ids,
        window=effective_window(manifest, window),
        bos_token_id=bos_for_scoring(manifest),
    )
