"""Prompt-lookup (n-gram) speculative decoding: draft from the text, verify in one forward.

A kiosk answer often quotes its context (an FAQ passage, a product sheet): once the
answer has produced the first tokens of a phrase from the prompt, the next ones are
likely those that followed it there. :func:`propose` finds the latest earlier
occurrence of the last ``ngram`` tokens of the history (prompt and generated tokens;
shorter n-grams down to two tokens when the longest does not occur) and drafts up to
``draft_tokens`` of the tokens that followed it (as transformers'
``prompt_lookup_num_tokens`` and vLLM's n-gram proposer do). :class:`DraftLength`
adapts how many to draft: two more after a forward that kept every draft, one fewer
after one that did not (transformers' "heuristic" schedule for assisted decoding).

The decode loop (:func:`edge_slm.generation.loop.generate_step`) then runs the pending
token and the drafts as one forward that returns the logits of every position, samples
each position in turn with the ordinary sampler, processors, constraint, stop and limit
checks, keeps the drafts up to the first one the sampler did not choose, and cuts the
KV cache back to what it kept.

* **Greedy**: a draft is kept exactly when it is the argmax, so the tokens are those of
  plain decoding (up to the float rounding of a several-token forward against a
  one-token one, which the tests check stays below any argmax flip on their models).
* **Sampling**: :class:`DraftAcceptor` applies the speculative-sampling rule (Leviathan
  et al. 2023; Chen et al. 2023) with the draft as a point mass: keep draft ``d`` with
  probability ``p(d)``, else draw from ``p`` with ``d`` removed. Every token still
  follows the sampler's distribution ``p`` exactly, but the random numbers are used
  differently, so a seed gives other tokens than plain decoding does.

Each kept draft saves a forward; each rejected one costs a position of a wider
forward. It pays on extractive answers and is off by default
(``GenerationOptions.speculative``); docs/performance.md has the measurements.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_slm.errors import InvalidArgumentError
from edge_slm.generation.sampling import FloatArray, LogitsFilter, draw_without, make_logits_filter

METHODS = ("prompt-lookup",)
"""The speculative methods ``GenerationOptions.speculative`` accepts (None: off)."""
MAX_DRAFT_TOKENS = 16
"""The most tokens one forward may verify (wider forwards cost more than they save)."""
MAX_NGRAM = 8


def check_options(method: object, draft_tokens: object, ngram: object) -> None:
    """Validate the speculative options; raises :class:`InvalidArgumentError` naming them."""
    if method is not None and method not in METHODS:
        raise InvalidArgumentError(
            f"speculative must be None (off) or one of {list(METHODS)}, got {method!r}"
        )
    for name, value, high in (
        ("speculative_tokens", draft_tokens, MAX_DRAFT_TOKENS),
        ("speculative_ngram", ngram, MAX_NGRAM),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise InvalidArgumentError(f"{name} must be an integer in [1, {high}], got {value!r}")


def propose(history: Sequence[int], ngram: int, draft_tokens: int) -> list[int]:
    """Up to ``draft_tokens`` tokens that followed the latest earlier occurrence of the
    last ``ngram`` tokens of ``history`` (or of a shorter suffix, down to two tokens;
    one only when ``ngram`` is 1).

    Returns an empty list when no suffix occurs earlier or ``draft_tokens`` is 0.
    """
    tokens = np.asarray(history, dtype=np.int64)  # [length]
    length = tokens.shape[0]
    if draft_tokens < 1:
        return []
    shortest = min(ngram, 2)  # one-token matches draft poorly: only when asked for
    for size in range(min(ngram, length - 1), shortest - 1, -1):
        tail = tokens[length - size :]  # [size]
        # windows starting at 0 .. length - size - 1: every occurrence but the tail itself
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], size)
        found = np.flatnonzero((windows == tail).all(axis=1))
        if found.size:
            start = int(found[-1]) + size
            return [int(t) for t in tokens[start : start + draft_tokens]]
    return []


class DraftLength:
    """How many tokens to draft next: grows by 2 (up to ``limit``) while every draft is
    kept, shrinks by 1 (down to 1) when one is rejected."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current = limit

    def update(self, drafted: int, kept: int) -> None:
        """Record one verifying forward: ``kept`` of ``drafted`` drafts were kept."""
        if kept == drafted:
            self.current = min(self.limit, self.current + 2)
        else:
            self.current = max(1, self.current - 1)


class DraftAcceptor:
    """The speculative-sampling rule for a point-mass draft, on the sampler's own filters.

    Args:
        temperature, top_k, top_p, min_p, typical_p: the call's resolved sampling
            options (temperature > 0), which define the distribution ``p``.
    """

    def __init__(
        self, temperature: float, top_k: int, top_p: float, min_p: float, typical_p: float
    ) -> None:
        self._filter: LogitsFilter = make_logits_filter(temperature, top_k, top_p, min_p, typical_p)

    def __call__(self, logits: FloatArray, draft: int, rng: np.random.Generator) -> int:
        """``draft`` with probability ``p(draft)``, else a draw from ``p`` without it.

        ``logits`` are the processed logits the sampler would see ``[vocab]``. The result
        is distributed exactly as ``p`` (with probability ``p(d)`` the draft, and with
        ``1 - p(d)`` a token ``t != d`` with probability ``p(t) / (1 - p(d))``).
        """
        x = self._filter(logits)  # [vocab] float64, top logit 0, removed tokens -inf
        finite = x > -np.inf
        weights = np.exp(x[finite])
        p_draft = float(np.exp(x[draft]) / weights.sum()) if finite[draft] else 0.0
        if rng.random() < p_draft:
            return draft
        return draw_without(x, draft, rng)
