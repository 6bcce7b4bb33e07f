"""Scoring continuations with the generative model: zero-shot choice among options."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import TYPE_CHECKING

import numpy as np

from edge_slm.errors import ContextLengthError, DeadlineError, InvalidArgumentError
from edge_slm.generation import limits
from edge_slm.generation.kv_slots import KVState
from edge_slm.text.stops import Deadline

if TYPE_CHECKING:
    from edge_slm.generation.model import TextGenerator


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 ``[..., vocab]``."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return np.asarray(x - np.log(np.exp(x).sum(axis=-1, keepdims=True)))


def choose(
    model: TextGenerator,
    prompt: str,
    options: Sequence[str],
    normalize: bool = False,
    deadline_s: float | None = None,
) -> list[tuple[str, float]]:
    """Score each option as a continuation of ``prompt``; returns (option, probability).

    See :meth:`TextGenerator.choose`. The prompt but its last token is computed once in
    a private KV state; each option then feeds that last token and its own tokens (but
    the last), whose logits predict it.
    """
    if isinstance(options, str) or not isinstance(options, Sized) or len(options) < 1:
        raise InvalidArgumentError("options must be a non-empty list of strings")
    limits.check_length("options", options, limits.MAX_CHOICES, "MAX_CHOICES")
    context = model.encode(prompt)
    if not context:
        raise InvalidArgumentError("the prompt is empty (it encodes to no tokens)")
    encoded = []
    for option in options:
        full = model.encode(prompt + option)
        if full[: len(context)] != context or len(full) == len(context):
            raise InvalidArgumentError(
                f"option {option!r} adds no tokens after the prompt, or changes the "
                "prompt's tokens; start options with a space or end the prompt with one"
            )
        if len(full) > model.manifest.context_length:
            raise ContextLengthError(f"prompt + option {option!r} exceeds the context")
        encoded.append(full)
    deadline = Deadline(deadline_s)
    backend, state = model.backend, KVState()
    backend.begin(state)
    try:
        scores: list[float] = []
        for full in encoded:
            if deadline.expired():
                raise DeadlineError(
                    f"the deadline of {deadline_s} s passed after scoring {len(scores)} of "
                    f"{len(encoded)} options"
                )
            backend.truncate(state, len(context) - 1)
            if len(context) > 1 and len(state.tokens) < len(context) - 1:
                backend.extend(state, context[:-1])
            logits = backend.extend(state, full[len(context) - 1 : -1], all_positions=True)
            targets = np.asarray(full[len(context) :])
            logp = log_softmax_rows(logits)[np.arange(len(targets)), targets]
            total = float(logp.sum())
            scores.append(total / len(targets) if normalize else total)
    finally:
        backend.finish(state)
        backend.release(state)
    values = np.asarray(scores)
    probs = np.exp(values - values.max())
    probs /= probs.sum()
    return [(option, float(p)) for option, p in zip(options, probs, strict=True)]
