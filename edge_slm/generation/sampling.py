"""Token sampling in pure NumPy: logits filters, history-aware processors, samplers.

The design follows mlx-lm's ``sample_utils.py``: small pure functions composed by
:func:`make_sampler` and :func:`make_logits_processors`. No function mutates its input;
a removed token gets the logit ``-inf``. Every row of logits is a 1-D array ``[vocab]``.

Semantics match the Hugging Face transformers 4.57 classes named in each docstring,
with ``min_tokens_to_keep=1`` (what ``generate`` uses without beam search).

One decoding step, in this fixed order::

    logits ──► processors (history-aware, built by make_logits_processors)
                 1. logit_bias            (transformers: SequenceBiasLogitsProcessor, which
                                           generate applies before the others)
                 2. repetition_penalty    (RepetitionPenaltyLogitsProcessor)
                 3. frequency / presence  (OpenAI; after the repetition penalty, as in
                                           vLLM and llama.cpp)
                 4. no_repeat_ngram_size  (NoRepeatNGramLogitsProcessor)
           ──► sampler (built by make_sampler)
                 temperature == 0: greedy, argmax of the processed logits; the filters
                 are not applied (they are warpers in transformers, used only with
                 do_sample=True) and no random number is drawn.
                 otherwise the filters, in the order of transformers'
                 ``GenerationMixin._get_logits_processor``:
                 1. temperature  2. top_k  3. top_p  4. min_p  5. typical_p
                 then one draw from the softmax of what is left.

A processor is called as ``processor(tokens, generated, logits)``: ``tokens`` is the
whole history (prompt and generated tokens, int64 ``[seq]``), ``generated`` the tokens
generated so far (int64 ``[n_generated]``, a suffix of ``tokens``). The repetition
penalty and the n-gram ban look at the whole history, prompt included, as transformers
does for decoder-only models; the frequency and presence penalties count generated
tokens only, as OpenAI's API does.

Top-p and typical-p sort only the tokens that can survive (a head found with
``np.partition``, grown as needed), and every filter skips tokens already at -inf, so a
step stays cheap on large vocabularies after top-k.

Randomness is explicit: a sampler takes an ``np.random.Generator`` and draws exactly
one ``rng.random()`` per sampled token, so the same seed gives the same tokens.
Softmax, cumulative sums and the draw are computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from edge_slm.errors import InvalidArgumentError

__all__ = [
    "FILTER_ORDER",
    "PROCESSOR_ORDER",
    "LogitsFilter",
    "LogitsProcessor",
    "Sampler",
    "TokenLogprob",
    "apply_frequency_presence_penalty",
    "apply_logit_bias",
    "apply_min_p",
    "apply_no_repeat_ngram",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "apply_typical_p",
    "draw_without",
    "log_softmax",
    "make_logits_filter",
    "make_logits_processors",
    "make_sampler",
    "sample_categorical",
    "top_logprobs",
]

FloatArray = npt.NDArray[np.floating[Any]]
TokenArray = npt.NDArray[np.integer[Any]]

LogitsFilter = Callable[[FloatArray], FloatArray]
"""``logits -> logits``."""
LogitsProcessor = Callable[[TokenArray, TokenArray, FloatArray], FloatArray]
"""``(tokens, generated, logits) -> logits``; see the module docstring."""
Sampler = Callable[[FloatArray, np.random.Generator | None], int]
"""``(logits, rng) -> token id``; a greedy sampler accepts ``rng=None``."""

FILTER_ORDER = ("temperature", "top_k", "top_p", "min_p", "typical_p")
"""The order in which :func:`make_logits_filter` applies its filters."""
PROCESSOR_ORDER = (
    "logit_bias",
    "repetition_penalty",
    "frequency_presence_penalty",
    "no_repeat_ngram",
)
"""The order of the processors returned by :func:`make_logits_processors`."""

_NEG_INF = -np.inf
_FIRST_HEAD = 32  # how many tokens top-p and typical-p sort first (the head grows x4)


class TokenLogprob(NamedTuple):
    """A token id and its log-probability (natural log)."""

    token_id: int
    logprob: float


# --------------------------------------------------------------------------- validation
def _fmt(value: float) -> str:
    return f"{value:g}"


def _check_number(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    note: str = "",
) -> float:
    """``value`` as a float if it is a finite number in the interval, else raise."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    ):
        number = float(value)
        above = number > low if low_open else number >= low
        below = number < high if high_open else number <= high
        if math.isfinite(number) and above and below:
            return number
    interval = f"{'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    raise InvalidArgumentError(f"{name} must be a finite number in {interval}{note}, got {value!r}")


def _check_int(name: str, value: object, low: int, note: str = "") -> int:
    """``value`` as an int if it is an integer >= ``low``, else raise."""
    if (
        isinstance(value, (int, np.integer))
        and not isinstance(value, (bool, np.bool_))
        and value >= low
    ):
        return int(value)
    raise InvalidArgumentError(f"{name} must be an integer >= {low}{note}, got {value!r}")


def _as_logits(logits: FloatArray, *, need_finite: bool = True) -> FloatArray:
    """Check a row of logits: 1-D, floating point, no NaN, no +inf.

    With ``need_finite`` at least one logit must be finite (something can be sampled).
    """
    row = np.asarray(logits)
    if row.ndim != 1 or row.shape[0] == 0:
        raise InvalidArgumentError(
            f"logits must be a non-empty 1-D array [vocab], got shape {row.shape}"
        )
    if row.dtype.kind != "f":
        raise InvalidArgumentError(f"logits must be a floating-point array, got dtype {row.dtype}")
    top = row.max()  # NaN if any is NaN; one pass for all three checks
    if np.isnan(top):
        where = np.flatnonzero(np.isnan(row))
        raise InvalidArgumentError(
            f"logits contain NaN at {where.size} of {row.shape[0]} token ids "
            f"(first: {where[:8].tolist()}); the model produced invalid values"
        )
    if top == np.inf:
        where = np.flatnonzero(np.isposinf(row))
        raise InvalidArgumentError(
            f"logits contain +inf at {where.size} of {row.shape[0]} token ids "
            f"(first: {where[:8].tolist()}); the model produced invalid values"
        )
    if need_finite and top == -np.inf:
        raise InvalidArgumentError(
            f"every one of the {row.shape[0]} logits is -inf: all tokens were removed, nothing can be sampled"
        )
    return row


def _as_tokens(tokens: TokenArray, vocab: int, name: str) -> TokenArray:
    """Check a 1-D array of token ids against the vocabulary size."""
    ids = np.asarray(tokens)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"{name} must be a 1-D integer array of token ids, got shape {ids.shape} and dtype {ids.dtype}"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise InvalidArgumentError(
            f"{name} holds token id {bad}, outside the vocabulary [0, {vocab})"
        )
    return ids


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise InvalidArgumentError(
            f"sampling with temperature > 0 needs an np.random.Generator, got {type(rng).__name__}"
        )
    return rng


def _masked(row: FloatArray, remove: npt.NDArray[np.bool_]) -> FloatArray:
    """A copy of ``row`` with the ``remove`` positions set to -inf."""
    out = np.copy(row)
    out[remove] = _NEG_INF
    return out


def _finite(row: FloatArray) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """Ids (ascending) and float64 values of the logits that are not -inf.

    Removed tokens never change a filter's decision or a draw (their probability is 0
    and they stay at -inf), so the kernels work on these only; it also spares
    ``np.exp`` its slow path for -inf.
    """
    finite = row > _NEG_INF  # [vocab]
    if finite.all():
        return np.arange(row.shape[0]), row.astype(np.float64)
    ids = np.flatnonzero(finite)  # [n_finite]
    return ids, row[ids].astype(np.float64)


def _softmax(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Softmax of finite float64 values."""
    weights = np.exp(values - values.max())
    return weights / weights.sum()  # type: ignore[no-any-return]


def _without(
    row: FloatArray, ids: npt.NDArray[np.intp], remove: npt.NDArray[np.bool_]
) -> FloatArray:
    """A copy of ``row`` with the tokens ``ids[remove]`` set to -inf."""
    out = np.copy(row)
    out[ids[remove]] = _NEG_INF
    return out


def _smallest(keys: npt.NDArray[np.float64], count: int) -> npt.NDArray[np.intp]:
    """Positions (ascending) of the ``count`` smallest keys and of every key tied with
    the largest of them."""
    cut = np.partition(keys, count - 1)[count - 1]
    return np.flatnonzero(keys <= cut)


# ------------------------------------------------------------------ filter kernels
# The private kernels assume checked arguments; the public functions check, then call them.
def _temperature(row: FloatArray, temperature: float) -> FloatArray:
    with np.errstate(over="ignore"):
        scaled = row.astype(np.float64, copy=False) / temperature
        return scaled.astype(row.dtype, copy=False)


def _top_k(row: FloatArray, top_k: int) -> FloatArray:
    vocab = row.shape[0]
    if top_k == 0 or top_k >= vocab:
        return np.copy(row)
    kth = row[np.argpartition(row, vocab - top_k)[vocab - top_k]]  # the k-th largest value
    return _masked(row, row < kth)  # ties with the k-th value are kept, as in transformers


def _top_p(row: FloatArray, top_p: float) -> FloatArray:
    if top_p >= 1.0:
        return np.copy(row)
    ids, values = _finite(row)  # [n]
    probs = _softmax(values)
    n = values.shape[0]
    threshold = 1.0 - top_p
    # Only likely tokens can survive, so only they are sorted: a head of the most likely
    # tokens (ties with the least of them included) is grown until the rest hold less
    # than 1 - top_p of the mass; each of the rest then has a cumulative probability
    # below 1 - top_p and goes. Small or flat rows fall back to sorting everything.
    head, tail_mass = np.arange(n), 0.0
    count = _FIRST_HEAD
    while 2 * count < n:
        candidate = _smallest(-values, count)
        rest = np.ones(n, dtype=bool)
        rest[candidate] = False
        mass = float(probs[rest].sum())
        if mass <= threshold * (1.0 - 1e-9):
            head, tail_mass = candidate, mass
            break
        count *= 4
    order = head[np.argsort(values[head], kind="stable")]  # ascending; equal logits by token id
    keep_sorted = tail_mass + np.cumsum(probs[order]) > threshold
    keep_sorted[-1] = True  # min_tokens_to_keep=1: the most likely token stays
    remove = np.ones(n, dtype=bool)  # tokens outside the head go
    remove[order[keep_sorted]] = False
    return _without(row, ids, remove)


def _min_p(row: FloatArray, min_p: float) -> FloatArray:
    if min_p <= 0.0:
        return np.copy(row)
    ids, values = _finite(row)
    probs = _softmax(values)
    # probs.max() < min_p * probs.max() is false for min_p <= 1: the top token always stays.
    return _without(row, ids, probs < min_p * probs.max())


def _typical_p(row: FloatArray, typical_p: float) -> FloatArray:
    if typical_p >= 1.0:
        return np.copy(row)
    ids, values = _finite(row)  # [n]
    n = values.shape[0]
    shifted_values = values - values.max()
    weights = np.exp(shifted_values)
    logp = shifted_values - np.log(weights.sum())  # log_softmax
    probs = weights / weights.sum()
    entropy = -float(np.sum(logp * np.exp(logp)))
    typicality = np.abs(-logp - entropy)  # [n], smaller is more typical
    # Sorting by typicality (ties by token id) is only needed up to where the mass
    # reaches typical_p: a head of the most typical tokens, grown until it does, is an
    # exact prefix of the full order. Small rows sort everything.
    count = _FIRST_HEAD
    while True:
        whole = 2 * count >= n
        head = np.arange(n) if whole else _smallest(typicality, count)
        order = head[np.argsort(typicality[head], kind="stable")]  # most typical first
        last = int(np.count_nonzero(np.cumsum(probs[order]) < typical_p))
        if whole or last < order.shape[0]:
            break
        count *= 4
    last = min(last, order.shape[0] - 1)
    remove = typicality > typicality[order[last]]  # tokens tied with the last kept stay
    remove[order[0]] = False  # min_tokens_to_keep=1
    return _without(row, ids, remove)


# ------------------------------------------------------------------- public filters
def apply_temperature(logits: FloatArray, temperature: float) -> FloatArray:
    """Divide the logits by ``temperature`` (transformers' TemperatureLogitsWarper).

    Args:
        logits: ``[vocab]`` floating-point logits.
        temperature: a finite number > 0. For greedy decoding use
            ``make_sampler(temperature=0)``.

    Returns:
        A new ``[vocab]`` array of the same dtype (computed in float64; values too large
        for the dtype become +-inf).
    """
    t = _check_number(
        "temperature",
        temperature,
        0.0,
        math.inf,
        low_open=True,
        high_open=True,
        note=" (for greedy decoding use make_sampler(temperature=0))",
    )
    return _temperature(_as_logits(logits, need_finite=False), t)


def apply_top_k(logits: FloatArray, top_k: int) -> FloatArray:
    """Keep the ``top_k`` largest logits (transformers' TopKLogitsWarper).

    Tokens tied with the k-th largest logit are kept too, so more than ``top_k`` tokens
    may remain. Uses ``np.argpartition`` (no full sort).

    Args:
        logits: ``[vocab]`` floating-point logits.
        top_k: an integer >= 0; 0 (or >= vocab) keeps everything.

    Returns:
        A new ``[vocab]`` array of the same dtype, removed tokens at -inf.
    """
    k = _check_int("top_k", top_k, 0, " (0 disables it)")
    return _top_k(_as_logits(logits), k)


def apply_top_p(logits: FloatArray, top_p: float) -> FloatArray:
    """Nucleus filtering (transformers' TopPLogitsWarper).

    Sorting the probabilities in ascending order, every token whose cumulative
    probability is <= ``1 - top_p`` is removed; the most likely token always stays.
    Among equal logits at the cut-off, lower token ids are removed first (torch's
    sort order for up to 16 elements; above that torch's order among ties is
    unspecified).

    Args:
        logits: ``[vocab]`` floating-point logits.
        top_p: in (0, 1]; 1 keeps everything.

    Returns:
        A new ``[vocab]`` array of the same dtype, removed tokens at -inf.
    """
    p = _check_number("top_p", top_p, 0.0, 1.0, low_open=True, note=" (1 disables it)")
    return _top_p(_as_logits(logits), p)


def apply_min_p(logits: FloatArray, min_p: float) -> FloatArray:
    """Remove tokens less likely than ``min_p`` times the top token (MinPLogitsWarper).

    Args:
        logits: ``[vocab]`` floating-point logits.
        min_p: in [0, 1]; 0 keeps everything.

    Returns:
        A new ``[vocab]`` array of the same dtype, removed tokens at -inf.
    """
    p = _check_number("min_p", min_p, 0.0, 1.0, note=" (0 disables it)")
    return _min_p(_as_logits(logits), p)


def apply_typical_p(logits: FloatArray, typical_p: float) -> FloatArray:
    """Locally typical filtering (transformers' TypicalLogitsWarper).

    Tokens are ranked by how far their information content ``-log p`` is from the
    entropy; the most typical ones are kept until their probability mass reaches
    ``typical_p`` (tokens tied with the last one kept stay too).

    Args:
        logits: ``[vocab]`` floating-point logits.
        typical_p: in (0, 1]; 1 keeps everything.

    Returns:
        A new ``[vocab]`` array of the same dtype, removed tokens at -inf.
    """
    p = _check_number("typical_p", typical_p, 0.0, 1.0, low_open=True, note=" (1 disables it)")
    return _typical_p(_as_logits(logits), p)


# --------------------------------------------------------------- history processors
def apply_logit_bias(logits: FloatArray, logit_bias: Mapping[int, float]) -> FloatArray:
    """Add a bias to the logits of some token ids (SequenceBiasLogitsProcessor with
    one-token sequences; OpenAI's ``logit_bias``).

    Args:
        logits: ``[vocab]`` floating-point logits.
        logit_bias: token id -> bias; a bias of -inf bans the token.

    Returns:
        A new ``[vocab]`` array of the same dtype.
    """
    row = _as_logits(logits, need_finite=False)
    ids, values = _check_logit_bias(logit_bias, row.shape[0])
    return _logit_bias(row, ids, values)


def _check_logit_bias(
    logit_bias: Mapping[int, float], vocab: int | None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    if not isinstance(logit_bias, Mapping):
        raise InvalidArgumentError(
            f"logit_bias must be a mapping token id -> bias, got {type(logit_bias).__name__}"
        )
    ids: list[int] = []
    values: list[float] = []
    upper = "" if vocab is None else f", {vocab}"
    for token, bias in logit_bias.items():
        if (
            not isinstance(token, (int, np.integer))
            or isinstance(token, (bool, np.bool_))
            or token < 0
            or (vocab is not None and token >= vocab)
        ):
            raise InvalidArgumentError(
                f"logit_bias token id {token!r} is outside the vocabulary [0{upper or ', vocab'})"
            )
        if isinstance(bias, (int, float, np.integer, np.floating)) and not isinstance(
            bias, (bool, np.bool_)
        ):
            value = float(bias)
            if math.isfinite(value) or value == -math.inf:
                ids.append(int(token))
                values.append(value)
                continue
        raise InvalidArgumentError(
            f"logit_bias for token id {token} must be a finite number or -inf, got {bias!r}"
        )
    return np.asarray(ids, dtype=np.int64), np.asarray(values, dtype=np.float64)


def _logit_bias(
    row: FloatArray, ids: npt.NDArray[np.int64], values: npt.NDArray[np.float64]
) -> FloatArray:
    if ids.size and int(ids.max()) >= row.shape[0]:
        raise InvalidArgumentError(
            f"logit_bias token id {int(ids.max())} is outside the vocabulary [0, {row.shape[0]})"
        )
    out = np.copy(row)
    out[ids] += values.astype(row.dtype)
    return out


def apply_repetition_penalty(tokens: TokenArray, logits: FloatArray, penalty: float) -> FloatArray:
    """Penalize every token id that occurs in ``tokens`` (RepetitionPenaltyLogitsProcessor).

    A positive logit is divided by ``penalty``, a negative one multiplied by it, once
    per distinct token whatever its count.

    Args:
        tokens: int ``[seq]`` history; pass the prompt and the generated tokens to match
            transformers (which includes the prompt for decoder-only models).
        logits: ``[vocab]`` floating-point logits.
        penalty: a finite number > 0; 1 changes nothing, > 1 discourages repetition.

    Returns:
        A new ``[vocab]`` array of the same dtype (computed in that dtype, as torch does).
    """
    p = _check_number(
        "repetition_penalty",
        penalty,
        0.0,
        math.inf,
        low_open=True,
        high_open=True,
        note=" (1 disables it)",
    )
    row = _as_logits(logits, need_finite=False)
    return _repetition_penalty(_as_tokens(tokens, row.shape[0], "tokens"), row, p)


def _repetition_penalty(tokens: TokenArray, row: FloatArray, penalty: float) -> FloatArray:
    ids = np.unique(tokens)
    scores = row[ids]
    factor = row.dtype.type(penalty)
    out = np.copy(row)
    out[ids] = np.where(scores < 0, scores * factor, scores / factor)
    return out


def apply_frequency_presence_penalty(
    generated: TokenArray,
    logits: FloatArray,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
) -> FloatArray:
    """OpenAI's penalties: ``logit -= count * frequency_penalty + (count > 0) * presence_penalty``.

    Args:
        generated: int ``[n_generated]``, the tokens generated so far (not the prompt):
            ``count`` is how often each token id occurs in it.
        logits: ``[vocab]`` floating-point logits.
        frequency_penalty: in [-2, 2].
        presence_penalty: in [-2, 2].

    Returns:
        A new ``[vocab]`` array of the same dtype.
    """
    f = _check_number("frequency_penalty", frequency_penalty, -2.0, 2.0, note=" (0 disables it)")
    p = _check_number("presence_penalty", presence_penalty, -2.0, 2.0, note=" (0 disables it)")
    row = _as_logits(logits, need_finite=False)
    return _frequency_presence(_as_tokens(generated, row.shape[0], "generated"), row, f, p)


def _frequency_presence(
    generated: TokenArray, row: FloatArray, frequency: float, presence: float
) -> FloatArray:
    counts = np.bincount(generated, minlength=row.shape[0])  # [vocab]
    seen = np.flatnonzero(counts)
    out = np.copy(row)
    out[seen] -= (counts[seen] * frequency + presence).astype(row.dtype)
    return out


def apply_no_repeat_ngram(tokens: TokenArray, logits: FloatArray, ngram_size: int) -> FloatArray:
    """Ban every token that would repeat an n-gram of ``tokens`` (NoRepeatNGramLogitsProcessor).

    With ``n = ngram_size``, a token ``t`` is banned when the last ``n - 1`` tokens
    followed by ``t`` already occur as an n-gram in ``tokens``. ``n = 1`` bans every
    token already present.

    Args:
        tokens: int ``[seq]`` history (prompt and generated tokens, as in transformers).
        logits: ``[vocab]`` floating-point logits.
        ngram_size: an integer >= 0; 0 disables it.

    Returns:
        A new ``[vocab]`` array of the same dtype, banned tokens at -inf.
    """
    n = _check_int("no_repeat_ngram_size", ngram_size, 0, " (0 disables it)")
    row = _as_logits(logits, need_finite=False)
    return _no_repeat_ngram(_as_tokens(tokens, row.shape[0], "tokens"), row, n)


def _no_repeat_ngram(tokens: TokenArray, row: FloatArray, n: int) -> FloatArray:
    length = tokens.shape[0]
    if n == 0 or length < n:
        return np.copy(row)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, n)  # [length - n + 1, n]
    prefix = tokens[length - n + 1 :]  # [n - 1], the n-gram the next token would end
    match = np.all(windows[:, :-1] == prefix, axis=1)
    out = np.copy(row)
    out[windows[match, -1]] = _NEG_INF
    return out


# ------------------------------------------------------------------------ log-probs
def log_softmax(logits: FloatArray) -> npt.NDArray[np.float64]:
    """Log-probabilities of a row of logits.

    Args:
        logits: ``[vocab]`` floating-point logits, at least one finite.

    Returns:
        ``[vocab]`` float64 natural-log probabilities (-inf for removed tokens).
    """
    row = _as_logits(logits)
    ids, values = _finite(row)
    shifted = values - values.max()
    out = np.full(row.shape[0], _NEG_INF)
    out[ids] = shifted - np.log(np.exp(shifted).sum())
    return out


def top_logprobs(
    logits: FloatArray, token_id: int, n: int
) -> tuple[float, tuple[TokenLogprob, ...]]:
    """The log-probability of ``token_id`` and the ``n`` most likely alternatives.

    Args:
        logits: ``[vocab]`` logits of the distribution to report (for instance the
            processed logits the sampler saw).
        token_id: the token that was chosen.
        n: how many alternatives, an integer >= 0.

    Returns:
        ``(logprob of token_id, alternatives)``: at most ``n`` :class:`TokenLogprob`,
        most likely first (ties by token id), tokens with probability 0 left out.
    """
    count = _check_int("n", n, 0, " (the number of alternatives)")
    token = _check_int("token_id", token_id, 0)
    if count == 0:
        # The chosen token's log-probability alone: one log-sum-exp over the row, not the
        # whole log-softmax (4x cheaper on a 49k vocabulary; every decode step pays it).
        row = _as_logits(logits).astype(np.float64)  # [vocab]
        if token >= row.shape[0]:
            raise InvalidArgumentError(
                f"token_id {token} is outside the vocabulary [0, {row.shape[0]})"
            )
        top = row.max()
        return float(row[token] - top - np.log(np.exp(row - top).sum())), ()
    logp = log_softmax(logits)
    vocab = logp.shape[0]
    if token >= vocab:
        raise InvalidArgumentError(f"token_id {token} is outside the vocabulary [0, {vocab})")
    count = min(count, vocab)
    cut = np.partition(logp, vocab - count)[vocab - count]  # the n-th largest log-prob
    candidates = np.flatnonzero(logp >= cut)  # ascending ids, every token tied at the cut
    best = candidates[np.argsort(-logp[candidates], kind="stable")][:count]
    alternatives = tuple(TokenLogprob(int(i), float(logp[i])) for i in best if np.isfinite(logp[i]))
    return float(logp[token]), alternatives


# -------------------------------------------------------------------------- samplers
def sample_categorical(logits: FloatArray, rng: np.random.Generator) -> int:
    """Draw one token from ``softmax(logits)``, using exactly one ``rng.random()``.

    Tokens at -inf (probability 0) are never drawn.

    Args:
        logits: ``[vocab]`` floating-point logits, at least one finite.
        rng: the random generator.

    Returns:
        The token id.
    """
    return _draw(_as_logits(logits), _check_rng(rng))


def _draw(row: FloatArray, rng: np.random.Generator) -> int:
    ids, values = _finite(row)  # [n]
    weights = np.exp(values - values.max())  # [n]
    cdf = np.cumsum(weights)  # [n]
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if index >= cdf.shape[0]:  # only reachable through rounding: the last possible token
        index = int(np.flatnonzero(weights)[-1])
    return int(ids[index])


def draw_without(logits: FloatArray, token_id: int, rng: np.random.Generator) -> int:
    """Draw from ``softmax(logits)`` with ``token_id`` removed, one ``rng.random()``.

    The residual draw of speculative sampling (:mod:`edge_slm.generation.speculative`).
    At least one other token must have a finite logit.
    """
    row = np.copy(_as_logits(logits, need_finite=False))
    row[token_id] = _NEG_INF
    return _draw(_as_logits(row), _check_rng(rng))


def _check_filters(
    temperature: float, top_k: int, top_p: float, min_p: float, typical_p: float
) -> tuple[float, int, float, float, float]:
    return (
        _check_number(
            "temperature", temperature, 0.0, math.inf, high_open=True, note=" (0 means greedy)"
        ),
        _check_int("top_k", top_k, 0, " (0 disables it)"),
        _check_number("top_p", top_p, 0.0, 1.0, low_open=True, note=" (1 disables it)"),
        _check_number("min_p", min_p, 0.0, 1.0, note=" (0 disables it)"),
        _check_number("typical_p", typical_p, 0.0, 1.0, low_open=True, note=" (1 disables it)"),
    )


def make_logits_filter(
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    typical_p: float = 1.0,
) -> LogitsFilter:
    """The sampler's filter chain as one ``logits -> logits`` function.

    Filters run in :data:`FILTER_ORDER` (temperature, top_k, top_p, min_p, typical_p,
    the order of transformers' ``generate``); a filter at its neutral value is skipped.

    Args:
        temperature: >= 0; 0 keeps only the first argmax (greedy).
        top_k: >= 0; 0 disables it.
        top_p: in (0, 1]; 1 disables it.
        min_p: in [0, 1]; 0 disables it.
        typical_p: in (0, 1]; 1 disables it.

    Returns:
        A function mapping ``[vocab]`` logits to ``[vocab]`` float64 logits, shifted so
        that the largest is 0 (softmax, and therefore sampling, is unchanged by the
        shift; it keeps a small temperature from overflowing), removed tokens at -inf.

    Raises:
        InvalidArgumentError: a parameter is outside its range.
    """
    t, k, p, mp, tp = _check_filters(temperature, top_k, top_p, min_p, typical_p)
    steps: list[LogitsFilter] = []
    if t != 1.0 and t != 0.0:
        steps.append(lambda x: _temperature(x, t))
    if k != 0:
        steps.append(lambda x: _top_k(x, k))
    if p < 1.0:
        steps.append(lambda x: _top_p(x, p))
    if mp > 0.0:
        steps.append(lambda x: _min_p(x, mp))
    if tp < 1.0:
        steps.append(lambda x: _typical_p(x, tp))

    def chain(logits: FloatArray) -> FloatArray:
        x: FloatArray = _as_logits(logits).astype(np.float64)  # [vocab]
        x = x - x.max()
        if t == 0.0:
            return _masked(x, np.arange(x.shape[0]) != int(np.argmax(x)))
        for step in steps:
            x = step(x)
        return x

    return chain


def make_sampler(
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    typical_p: float = 1.0,
) -> Sampler:
    """A sampler ``(logits, rng) -> token id``.

    With ``temperature == 0`` it is greedy: the first argmax of the logits, no filter,
    no random number (``rng`` may be None). Otherwise the logits go through
    :func:`make_logits_filter`'s chain (temperature, top_k, top_p, min_p, typical_p)
    and one token is drawn from the softmax of the result with one ``rng.random()``.

    Args:
        temperature: >= 0; 0 means greedy.
        top_k: >= 0; 0 disables it.
        top_p: in (0, 1]; 1 disables it.
        min_p: in [0, 1]; 0 disables it.
        typical_p: in (0, 1]; 1 disables it.

    Returns:
        The sampler. It raises :class:`InvalidArgumentError` on a row with NaN or +inf
        logits, or with every logit at -inf.

    Raises:
        InvalidArgumentError: a parameter is outside its range.
    """
    chain = make_logits_filter(temperature, top_k, top_p, min_p, typical_p)
    if temperature == 0:

        def greedy(logits: FloatArray, rng: np.random.Generator | None = None) -> int:
            # One pass: argmax stops at the first NaN, so the checks need only the
            # chosen value; anything odd goes through _as_logits for its error.
            row = np.asarray(logits)
            if row.ndim == 1 and row.shape[0] and row.dtype.kind == "f":
                token = int(np.argmax(row))
                if -np.inf < row[token] < np.inf:
                    return token
            return int(np.argmax(_as_logits(logits)))

        return greedy

    def sample(logits: FloatArray, rng: np.random.Generator | None) -> int:
        generator = _check_rng(rng)
        return _draw(chain(logits), generator)

    return sample


def make_logits_processors(
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    no_repeat_ngram_size: int = 0,
    logit_bias: Mapping[int, float] | None = None,
    *,
    vocab_size: int | None = None,
) -> list[LogitsProcessor]:
    """The active history-aware processors, in :data:`PROCESSOR_ORDER`.

    Each is called as ``processor(tokens, generated, logits)`` with ``tokens`` the whole
    history (prompt + generated, int ``[seq]``) and ``generated`` the generated tokens
    only (int ``[n_generated]``); it returns new ``[vocab]`` logits of the same dtype.

    Order: logit_bias, repetition_penalty (on ``tokens``), frequency and presence
    penalties (on ``generated``), no_repeat_ngram (on ``tokens``).

    Args:
        repetition_penalty: > 0; 1 disables it.
        frequency_penalty: in [-2, 2]; 0 disables it.
        presence_penalty: in [-2, 2]; 0 disables it.
        no_repeat_ngram_size: >= 0; 0 disables it.
        logit_bias: token id -> bias added to its logit (-inf bans it); None or empty
            disables it.
        vocab_size: when given, ``logit_bias`` ids are checked against it now; they are
            always checked against the logits' size when applied.

    Returns:
        The processors at a non-neutral setting (an empty list if none).

    Raises:
        InvalidArgumentError: a parameter is outside its range.
    """
    rep = _check_number(
        "repetition_penalty",
        repetition_penalty,
        0.0,
        math.inf,
        low_open=True,
        high_open=True,
        note=" (1 disables it)",
    )
    freq = _check_number("frequency_penalty", frequency_penalty, -2.0, 2.0, note=" (0 disables it)")
    pres = _check_number("presence_penalty", presence_penalty, -2.0, 2.0, note=" (0 disables it)")
    ngram = _check_int("no_repeat_ngram_size", no_repeat_ngram_size, 0, " (0 disables it)")
    if vocab_size is not None:
        vocab_size = _check_int("vocab_size", vocab_size, 1)
    bias_ids, bias_values = _check_logit_bias(logit_bias or {}, vocab_size)

    processors: list[LogitsProcessor] = []
    if bias_ids.size:

        def bias(tokens: TokenArray, generated: TokenArray, logits: FloatArray) -> FloatArray:
            return _logit_bias(_as_logits(logits, need_finite=False), bias_ids, bias_values)

        processors.append(bias)
    if rep != 1.0:

        def repetition(tokens: TokenArray, generated: TokenArray, logits: FloatArray) -> FloatArray:
            row = _as_logits(logits, need_finite=False)
            return _repetition_penalty(_as_tokens(tokens, row.shape[0], "tokens"), row, rep)

        processors.append(repetition)
    if freq != 0.0 or pres != 0.0:

        def frequency_presence(
            tokens: TokenArray, generated: TokenArray, logits: FloatArray
        ) -> FloatArray:
            row = _as_logits(logits, need_finite=False)
            return _frequency_presence(
                _as_tokens(generated, row.shape[0], "generated"), row, freq, pres
            )

        processors.append(frequency_presence)
    if ngram > 0:

        def no_repeat_ngram(
            tokens: TokenArray, generated: TokenArray, logits: FloatArray
        ) -> FloatArray:
            row = _as_logits(logits, need_finite=False)
            return _no_repeat_ngram(_as_tokens(tokens, row.shape[0], "tokens"), row, ngram)

        processors.append(no_repeat_ngram)
    return processors
