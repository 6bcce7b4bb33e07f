"""The sampler against its oracle, Hugging Face transformers' logits processors.

Property tests feed random rows of logits (ties, very negative values, -inf) and random
histories to edge_slm.generation.sampling and to the transformers class it mirrors, and require the
same kept set (the same -inf positions) and the same softmax probabilities within 1e-5.

Two known, documented differences are allowed for, nothing else:

* top-p with several equal logits straddling the cut-off: torch's CPU sort has no
  defined order among equal values above 16 elements, so which members of such a tie
  group are removed may differ; their number must not (vocabularies of <= 16 tokens
  must match exactly).
* the float32 oracle: ours computes in float64, so it is compared with transformers run
  on the same values in float64, always; and with transformers in float32 whenever
  transformers' own float32 and float64 results agree (they differ only when a
  cumulative probability lands within float32 rounding of the threshold).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.utils import GenerationMixin

from edge_slm.errors import InvalidArgumentError
from edge_slm.generation.sampling import (
    FILTER_ORDER,
    PROCESSOR_ORDER,
    TokenLogprob,
    apply_frequency_presence_penalty,
    apply_logit_bias,
    apply_min_p,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    apply_typical_p,
    log_softmax,
    make_logits_filter,
    make_logits_processors,
    make_sampler,
    sample_categorical,
    top_logprobs,
)

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NO_HISTORY = np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------- strategies
@st.composite
def logit_rows(draw: st.DrawFn, max_vocab: int = 300) -> np.ndarray:
    """float32 ``[vocab]`` logits with ties, very negative values and -inf; >= 1 finite."""
    vocab = draw(st.integers(2, max_vocab))
    scale = draw(st.sampled_from([0.01, 1.0, 4.0, 30.0]))
    tie_fraction = draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    negative_fraction = draw(st.sampled_from([0.0, 0.1, 0.5]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    row = rng.normal(0.0, scale, vocab)
    ties = rng.random(vocab) < tie_fraction
    row[ties] = rng.integers(-2, 3, int(ties.sum())) * scale  # a few distinct values
    negative = rng.random(vocab) < negative_fraction
    row[negative] = rng.choice([-200.0, -1e4, -1e30, -np.inf], int(negative.sum()))
    if not np.isfinite(row).any():
        row[rng.integers(vocab)] = 0.0
    return row.astype(np.float32)


@st.composite
def rows_and_history(
    draw: st.DrawFn, max_len: int = 40, alphabet: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and a history of token ids (from a small alphabet when given, for repeats)."""
    row = draw(logit_rows())
    top = row.shape[0] if alphabet is None else min(alphabet, row.shape[0])
    history = draw(st.lists(st.integers(0, top - 1), max_size=max_len))
    return row, np.asarray(history, dtype=np.int64)


# top_p / typical_p in (0, 1). Within 1e-6 of 1 the kept set hinges on the last bit of a
# float64 cumulative sum (numpy's and torch's exp differ there), so those are left out.
unit_interval_open = st.one_of(
    st.sampled_from([1e-300, 0.1, 0.25, 0.5, 0.9, 0.95, 0.99]),
    st.floats(1e-6, 1.0 - 1e-6),
)


# -------------------------------------------------------------------------- helpers
def hf_apply(
    processor: LogitsProcessor, row: np.ndarray, dtype: Any, history: np.ndarray = NO_HISTORY
) -> np.ndarray:
    """Run a transformers processor on one row in ``dtype`` (torch.float32 or float64)."""
    scores = torch.from_numpy(row.astype(np.float64)).to(dtype)[None, :]  # [1, vocab]
    input_ids = torch.from_numpy(history.astype(np.int64))[None, :]  # [1, seq]
    return processor(input_ids, scores)[0].to(torch.float64).numpy()


def kept(row: np.ndarray) -> np.ndarray:
    return ~np.isneginf(row)


def probs(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    weights = np.exp(x - x.max())
    return weights / weights.sum()


def assert_same_filtering(
    ours: np.ndarray, theirs: np.ndarray, values: np.ndarray, exact_ties: bool = True
) -> None:
    """Same kept set and softmax within 1e-5.

    With ``exact_ties=False`` kept sets may differ only inside groups of equal
    ``values`` that are cut in both (same count kept in each group); the probabilities
    are then compared as sorted lists.
    """
    ours_kept, their_kept = kept(ours), kept(theirs)
    if exact_ties:
        np.testing.assert_array_equal(ours_kept, their_kept, err_msg="kept sets differ")
        np.testing.assert_allclose(probs(ours), probs(theirs), atol=1e-5, rtol=0)
        return
    assert ours_kept.sum() == their_kept.sum(), "kept counts differ"
    for value in np.unique(values[ours_kept != their_kept]):
        group = values == value
        assert ours_kept[group].sum() == their_kept[group].sum(), (
            f"tie group {value} kept differently"
        )
        assert 0 < ours_kept[group].sum() < group.sum(), (
            f"token with logit {value} kept differently"
        )
    np.testing.assert_allclose(np.sort(probs(ours)), np.sort(probs(theirs)), atol=1e-5, rtol=0)


def check_filter_against(
    ours: np.ndarray, make: Callable[[], LogitsProcessor], row: np.ndarray, exact_ties: bool = True
) -> None:
    """``ours`` against transformers in float64 always, in float32 when it is self-consistent."""
    theirs64 = hf_apply(make(), row, torch.float64)
    assert_same_filtering(ours, theirs64, row, exact_ties)
    theirs32 = hf_apply(make(), row, torch.float32)
    if np.array_equal(kept(theirs32), kept(theirs64)):
        assert_same_filtering(ours, theirs32, row, exact_ties)
    else:
        event("transformers float32 and float64 disagree (rounding at the threshold)")


def chi_square(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    expected = expected_probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# Upper 0.001 critical values of the chi-square distribution, by degrees of freedom.
CHI2_CRITICAL_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def draw_counts(
    sampler: Callable[[np.ndarray, np.random.Generator], int], row: np.ndarray, n: int, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.bincount([sampler(row, rng) for _ in range(n)], minlength=row.shape[0])


# ---------------------------------------------------------------- filters vs oracle
@PROPERTY
@given(row=logit_rows(), temperature=st.floats(0.05, 5.0))
def test_temperature_matches_transformers(row: np.ndarray, temperature: float) -> None:
    ours = apply_temperature(row, temperature)
    theirs = hf_apply(TemperatureLogitsWarper(temperature), row, torch.float32)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(kept(ours), kept(theirs))
    finite = kept(ours)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6)
    np.testing.assert_allclose(probs(ours), probs(theirs), atol=1e-5, rtol=0)


@PROPERTY
@given(row=logit_rows(), top_k=st.integers(0, 350))
def test_top_k_matches_transformers(row: np.ndarray, top_k: int) -> None:
    ours = apply_top_k(row, top_k)
    if top_k == 0:  # transformers' generate skips top_k=0 (the warper rejects it)
        np.testing.assert_array_equal(ours, row)
        return
    check_filter_against(ours, lambda: TopKLogitsWarper(top_k), row)


@PROPERTY
@given(row=logit_rows(), top_p=unit_interval_open)
def test_top_p_matches_transformers(row: np.ndarray, top_p: float) -> None:
    ours = apply_top_p(row, top_p)
    check_filter_against(ours, lambda: TopPLogitsWarper(top_p), row, exact_ties=row.shape[0] <= 16)


@PROPERTY
@given(row=logit_rows(max_vocab=16), top_p=unit_interval_open)
def test_top_p_ties_match_transformers_exactly_on_small_vocabularies(
    row: np.ndarray, top_p: float
) -> None:
    check_filter_against(
        apply_top_p(row, top_p), lambda: TopPLogitsWarper(top_p), row, exact_ties=True
    )


def test_top_p_of_one_and_neutral_values_keep_everything() -> None:
    row = np.array([0.0, -1e4, -200.0, 3.0, -np.inf], dtype=np.float32)
    for out in (
        apply_top_p(row, 1.0),
        apply_top_k(row, 0),
        apply_min_p(row, 0.0),
        apply_typical_p(row, 1.0),
    ):
        np.testing.assert_array_equal(out, row)
        assert out is not row


@PROPERTY
@given(
    row=logit_rows(),
    min_p=st.one_of(st.sampled_from([0.0, 0.05, 0.1, 0.5, 1.0]), st.floats(0.0, 1.0)),
)
def test_min_p_matches_transformers(row: np.ndarray, min_p: float) -> None:
    check_filter_against(apply_min_p(row, min_p), lambda: MinPLogitsWarper(min_p), row)


@PROPERTY
@given(row=logit_rows(), typical_p=unit_interval_open)
def test_typical_p_matches_transformers(row: np.ndarray, typical_p: float) -> None:
    check_filter_against(
        apply_typical_p(row, typical_p), lambda: TypicalLogitsWarper(typical_p), row
    )


@st.composite
def peaked_rows(draw: st.DrawFn) -> np.ndarray:
    """LM-like float32 rows over a large vocabulary: a few strong tokens, a long tail."""
    vocab = draw(st.integers(500, 5000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    row = rng.gumbel(size=vocab) * draw(st.sampled_from([0.5, 1.5, 3.0]))
    row[rng.integers(0, vocab, draw(st.integers(1, 40)))] += draw(st.sampled_from([2.0, 6.0, 12.0]))
    return row.astype(np.float32)


@settings(PROPERTY, max_examples=40)
@given(row=peaked_rows(), top_p=unit_interval_open, typical_p=unit_interval_open)
def test_top_p_and_typical_p_match_transformers_on_large_vocabularies(
    row: np.ndarray, top_p: float, typical_p: float
) -> None:
    # Here only the likeliest / most typical tokens get sorted (see _top_p, _typical_p).
    check_filter_against(
        apply_top_p(row, top_p), lambda: TopPLogitsWarper(top_p), row, exact_ties=False
    )
    check_filter_against(
        apply_typical_p(row, typical_p), lambda: TypicalLogitsWarper(typical_p), row
    )


def test_top_k_keeps_ties_with_the_kth_value() -> None:
    row = np.array([1.0, 3.0, 2.0, 2.0, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(kept(apply_top_k(row, 2)), [False, True, True, True, False])


def test_top_p_keeps_the_top_token_when_it_alone_exceeds_top_p() -> None:
    row = np.log(np.array([0.97, 0.02, 0.01])).astype(np.float32)
    np.testing.assert_array_equal(kept(apply_top_p(row, 0.01)), [True, False, False])


# Probabilities [0.5, 0.25, 0.125, 0.125] exactly (sum of weights 2, exp exact on both
# sides), so cumulative sums land exactly on the thresholds.
DYADIC = np.log(np.array([1.0, 0.5, 0.25, 0.25]))


@pytest.mark.parametrize(
    ("apply", "make", "value", "expected_kept"),
    [
        (apply_top_p, TopPLogitsWarper, 0.75, [0, 1]),  # cumulative 0.25 <= 1 - 0.75: removed
        (apply_top_p, TopPLogitsWarper, 0.875, [0, 1, 3]),  # of the tied pair, the lower id goes
        (apply_top_p, TopPLogitsWarper, 1e-300, [0]),  # 1 - top_p == 1.0: only the forced top token
        (
            apply_typical_p,
            TypicalLogitsWarper,
            0.25,
            [1],
        ),  # most typical token's mass 0.25, not < 0.25
        (apply_typical_p, TypicalLogitsWarper, 0.75, [0, 1]),
        (apply_typical_p, TypicalLogitsWarper, 0.8, [0, 1, 2, 3]),  # the tied pair stays together
        (apply_min_p, MinPLogitsWarper, 0.5, [0, 1]),  # 0.25 is not < 0.5 * 0.5
    ],
)
def test_exact_threshold_boundaries_match_transformers(
    apply: Callable[[np.ndarray, float], np.ndarray],
    make: Callable[[float], LogitsProcessor],
    value: float,
    expected_kept: list[int],
) -> None:
    ours = apply(DYADIC, value)
    assert np.flatnonzero(kept(ours)).tolist() == expected_kept
    assert_same_filtering(ours, hf_apply(make(value), DYADIC, torch.float64), DYADIC)


# ------------------------------------------------------------- processors vs oracle
@PROPERTY
@given(
    data=rows_and_history(),
    penalty=st.one_of(st.sampled_from([0.5, 1.0, 1.2, 2.0]), st.floats(0.05, 5.0)),
)
def test_repetition_penalty_matches_transformers(
    data: tuple[np.ndarray, np.ndarray], penalty: float
) -> None:
    row, history = data
    ours = apply_repetition_penalty(history, row, penalty)
    assert ours.dtype == np.float32
    # Same float32 arithmetic as torch: bit for bit.
    np.testing.assert_array_equal(
        ours, hf_apply(RepetitionPenaltyLogitsProcessor(penalty), row, torch.float32, history)
    )
    ours64 = apply_repetition_penalty(history, row.astype(np.float64), penalty)
    np.testing.assert_array_equal(
        ours64, hf_apply(RepetitionPenaltyLogitsProcessor(penalty), row, torch.float64, history)
    )


@PROPERTY
@given(data=rows_and_history(max_len=30, alphabet=3), ngram_size=st.integers(1, 4))
def test_no_repeat_ngram_matches_transformers(
    data: tuple[np.ndarray, np.ndarray], ngram_size: int
) -> None:
    row, history = data
    ours = apply_no_repeat_ngram(history, row, ngram_size)
    theirs = hf_apply(NoRepeatNGramLogitsProcessor(ngram_size), row, torch.float32, history)
    np.testing.assert_array_equal(ours, theirs)


def test_no_repeat_ngram_bans_the_continuation_of_a_seen_bigram() -> None:
    row = np.zeros(6, dtype=np.float32)
    history = np.array([1, 2, 3, 1, 2, 4, 1], dtype=np.int64)  # next after "1": 2 seen
    np.testing.assert_array_equal(
        kept(apply_no_repeat_ngram(history, row, 2)), [True, True, False, True, True, True]
    )
    np.testing.assert_array_equal(kept(apply_no_repeat_ngram(history, row, 3)), np.ones(6, bool))
    np.testing.assert_array_equal(
        kept(apply_no_repeat_ngram(history, row, 1)), [True, False, False, False, False, True]
    )
    np.testing.assert_array_equal(apply_no_repeat_ngram(history, row, 0), row)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_once() -> None:
    row = np.array([2.0, -2.0, 2.0, 0.0], dtype=np.float32)
    out = apply_repetition_penalty(np.array([0, 0, 0, 1, 3]), row, 2.0)
    np.testing.assert_array_equal(out, [1.0, -4.0, 2.0, 0.0])


# ---------------------------------------------------------- the chain vs generate()
def hf_generate_processors(**config: Any) -> LogitsProcessorList:
    """The list transformers' generate() builds for ``config`` (decoder-only, no beams)."""
    generation_config = GenerationConfig(**config)
    return GenerationMixin._get_logits_processor(
        GenerationMixin(),
        generation_config=generation_config,
        input_ids_seq_length=1,
        encoder_input_ids=torch.zeros((1, 1), dtype=torch.long),
        logits_processor=LogitsProcessorList(),
        device="cpu",
    )


HF_NAMES = {
    "SequenceBiasLogitsProcessor": "logit_bias",
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram",
    "TemperatureLogitsWarper": "temperature",
    "TopKLogitsWarper": "top_k",
    "TopPLogitsWarper": "top_p",
    "MinPLogitsWarper": "min_p",
    "TypicalLogitsWarper": "typical_p",
}


def test_documented_order_is_the_order_of_transformers_generate() -> None:
    processors = hf_generate_processors(
        do_sample=True,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        min_p=0.1,
        typical_p=0.95,
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        sequence_bias={(3,): 1.0},
    )
    names = [HF_NAMES[type(p).__name__] for p in processors]
    ours = [name for name in (*PROCESSOR_ORDER, *FILTER_ORDER) if name in names]
    assert names == ours
    assert FILTER_ORDER == ("temperature", "top_k", "top_p", "min_p", "typical_p")
    assert (
        PROCESSOR_ORDER.index("frequency_presence_penalty")
        == PROCESSOR_ORDER.index("repetition_penalty") + 1
    )


@settings(PROPERTY, max_examples=80)
@given(
    data=rows_and_history(max_len=20, alphabet=6),
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.5]),
    top_k=st.sampled_from([0, 1, 3, 20]),
    top_p=st.sampled_from([0.3, 0.8, 0.95, 1.0]),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
    typical_p=st.sampled_from([0.5, 0.9, 1.0]),
    repetition_penalty=st.sampled_from([1.0, 1.3, 0.7]),
    ngram=st.sampled_from([0, 1, 2, 3]),
    bias=st.sampled_from([None, (0, 2.5), (1, -3.0)]),
)
def test_whole_chain_matches_transformers_generate(
    data: tuple[np.ndarray, np.ndarray],
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    typical_p: float,
    repetition_penalty: float,
    ngram: int,
    bias: tuple[int, float] | None,
) -> None:
    row32, history = data
    row = row32.astype(np.float64)  # both sides in float64: processors then agree bit for bit
    logit_bias = None if bias is None else {bias[0]: bias[1]}
    processors = make_logits_processors(
        repetition_penalty=repetition_penalty, no_repeat_ngram_size=ngram, logit_bias=logit_bias
    )
    processed = row
    for process in processors:
        processed = process(history, NO_HISTORY, processed)
    assume(np.isfinite(processed).any())  # everything banned: an error, tested below
    ours = make_logits_filter(temperature, top_k, top_p, min_p, typical_p)(processed)

    hf = hf_generate_processors(
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p or None,
        typical_p=typical_p,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=ngram,
        sequence_bias=None if bias is None else {(bias[0],): bias[1]},
    )
    theirs = hf(torch.from_numpy(history)[None, :], torch.from_numpy(row)[None, :])[0].numpy()
    exact_ties = top_p >= 1.0 or row.shape[0] <= 16
    assert_same_filtering(ours, theirs, processed, exact_ties)


# For each pair of filters that do not commute, a row on which applying the two in the
# other order keeps a different set (found by search, margins >= 1e-3 in the logits).
ORDER_CASES = [
    ([0.9, 0.5, 0.4, 0.0, 0.8, -1.1], {"temperature": 0.5, "top_p": 0.9}, [0, 1, 2, 4]),
    ([1.4, -0.0, -1.9, -0.5, 0.1, 0.4], {"temperature": 0.5, "min_p": 0.3}, [0]),
    ([-1.7, 0.3, -0.7, 0.4, 1.1, -2.5], {"temperature": 2.0, "typical_p": 0.5}, [1, 2, 3]),
    ([-2.2, -0.2, -0.7, 1.2, 0.3, -2.4], {"top_k": 4, "top_p": 0.9}, [1, 3, 4]),
    ([-0.3, 1.3, 0.1, 0.0, -1.1, 0.7], {"top_k": 3, "typical_p": 0.7}, [1, 5]),
    ([0.6, 0.4, -1.7, 1.3, -0.9, -1.6], {"top_p": 0.9, "min_p": 0.1}, [0, 1, 3, 4]),
    ([-0.0, 1.3, -0.4, -0.9, 0.3, 1.1], {"top_p": 0.9, "typical_p": 0.5}, [1, 5]),
    ([-2.1, 1.2, -1.1, -1.7, 0.1, -0.3], {"min_p": 0.3, "typical_p": 0.5}, [1]),
]
PUBLIC_FILTERS: dict[str, Callable[[np.ndarray, Any], np.ndarray]] = {
    "temperature": apply_temperature,
    "top_k": apply_top_k,
    "top_p": apply_top_p,
    "min_p": apply_min_p,
    "typical_p": apply_typical_p,
}


@pytest.mark.parametrize(("values", "params", "expected_kept"), ORDER_CASES)
def test_filter_order_is_observable_and_matches_generate(
    values: list[float], params: dict[str, Any], expected_kept: list[int]
) -> None:
    row = np.asarray(values, dtype=np.float32)
    ours = make_logits_filter(**params)(row)
    hf = hf_generate_processors(do_sample=True, **{"top_k": 0, **params})
    theirs = hf(torch.zeros((1, 0), dtype=torch.long), torch.from_numpy(row)[None, :])[0].numpy()
    assert_same_filtering(ours, theirs, row)
    assert np.flatnonzero(kept(ours)).tolist() == expected_kept
    first, second = sorted(params, key=FILTER_ORDER.index)
    swapped = PUBLIC_FILTERS[first](PUBLIC_FILTERS[second](row, params[second]), params[first])
    assert not np.array_equal(kept(swapped), kept(ours)), (
        "this case does not tell the two orders apart"
    )


# --------------------------------------------------------- OpenAI penalties, bias
def test_frequency_presence_penalty_follows_the_openai_formula() -> None:
    row = np.array([1.0, 2.0, -1.0, 0.5, -np.inf], dtype=np.float32)
    generated = np.array([1, 1, 1, 2, 4], dtype=np.int64)
    out = apply_frequency_presence_penalty(
        generated, row, frequency_penalty=0.5, presence_penalty=0.25
    )
    counts = np.array([0, 3, 1, 0, 1])
    expected = row - (counts * 0.5 + (counts > 0) * 0.25)
    np.testing.assert_allclose(out, expected.astype(np.float32), rtol=1e-7)
    assert out.dtype == np.float32
    # Negative values reward repetition.
    out = apply_frequency_presence_penalty(
        generated, row, frequency_penalty=-1.0, presence_penalty=-2.0
    )
    np.testing.assert_allclose(out, row - (counts * -1.0 + (counts > 0) * -2.0), rtol=1e-7)


def test_frequency_presence_processor_counts_generated_tokens_only() -> None:
    (process,) = make_logits_processors(frequency_penalty=1.0, presence_penalty=0.5)
    row = np.zeros(5, dtype=np.float32)
    prompt = [0, 0, 0, 3]
    generated = np.array([3, 3, 2], dtype=np.int64)
    tokens = np.array(prompt + generated.tolist(), dtype=np.int64)
    out = process(tokens, generated, row)
    np.testing.assert_allclose(out, [0.0, 0.0, -1.5, -2.5, 0.0])


def test_repetition_and_ngram_processors_use_the_whole_history() -> None:
    repetition, ngram = make_logits_processors(repetition_penalty=2.0, no_repeat_ngram_size=1)
    row = np.full(4, 2.0, dtype=np.float32)
    tokens = np.array([0, 1], dtype=np.int64)  # token 0 from the prompt, 1 generated
    generated = np.array([1], dtype=np.int64)
    np.testing.assert_array_equal(repetition(tokens, generated, row), [1.0, 1.0, 2.0, 2.0])
    np.testing.assert_array_equal(kept(ngram(tokens, generated, row)), [False, False, True, True])


def test_logit_bias_adds_to_the_named_tokens() -> None:
    row = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32)
    out = apply_logit_bias(row, {0: 5.0, 3: -np.inf, 2: -0.5})
    np.testing.assert_array_equal(out, [5.0, 1.0, 1.5, -np.inf])
    (process,) = make_logits_processors(logit_bias={1: 10.0}, vocab_size=4)
    np.testing.assert_array_equal(process(NO_HISTORY, NO_HISTORY, row), [0.0, 11.0, 2.0, 3.0])


def test_processors_are_only_the_active_ones_in_documented_order() -> None:
    assert make_logits_processors() == []
    assert make_logits_processors(logit_bias={}) == []
    processors = make_logits_processors(
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.0,
        no_repeat_ngram_size=2,
        logit_bias={0: -3.0},
    )
    assert [p.__name__ for p in processors] == [
        "bias",
        "repetition",
        "frequency_presence",
        "no_repeat_ngram",
    ]
    # The bias comes before the repetition penalty: 1 - 3 = -2, then * 2 = -4
    # (the other way round would give 1 / 2 - 3 = -2.5).
    row = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    tokens = np.array([0], dtype=np.int64)
    out = row
    for process in processors:
        out = process(tokens, tokens, out)
    assert out[0] == pytest.approx(-4.0 - 0.5)


# ------------------------------------------------------------------ sampling itself
def test_sampler_with_top_k_and_top_p_follows_the_filtered_distribution() -> None:
    p = np.array([0.35, 0.25, 0.15, 0.10, 0.08, 0.04, 0.02, 0.01])
    row = np.log(p).astype(np.float32)
    # By hand: top_k=6 keeps p[:6] (mass 0.97); top_p=0.8 then removes, from the least
    # likely up, cumulative 0.04/0.97 and 0.12/0.97 (<= 0.2) but not 0.22/0.97.
    expected = p[:4] / p[:4].sum()
    counts = draw_counts(make_sampler(temperature=1.0, top_k=6, top_p=0.8), row, 20_000, seed=7)
    assert counts[4:].sum() == 0, f"filtered-out tokens drawn: {counts}"
    assert chi_square(counts[:4], expected) < CHI2_CRITICAL_P001[3]
    # The test has power: top-k alone (tokens 0..5) would be rejected.
    assert chi_square(counts[:6] + 0.5, p[:6] / p[:6].sum()) > CHI2_CRITICAL_P001[5]


def test_sampler_with_temperature_and_min_p_follows_the_filtered_distribution() -> None:
    p = np.array([0.5, 0.3, 0.15, 0.05])
    row = np.log(p).astype(np.float32)
    # temperature 2: q ~ sqrt(p); min_p=0.5 keeps q_i >= 0.5 * q_max: tokens 0, 1, 2.
    q = np.sqrt(p)
    expected = q[:3] / q[:3].sum()
    counts = draw_counts(make_sampler(temperature=2.0, min_p=0.5), row, 20_000, seed=11)
    assert counts[3] == 0
    assert chi_square(counts[:3], expected) < CHI2_CRITICAL_P001[2]
    assert (
        chi_square(counts[:3], p[:3] / p[:3].sum()) > CHI2_CRITICAL_P001[2]
    )  # without temperature


def test_sample_categorical_never_draws_removed_tokens_and_matches_softmax() -> None:
    row = np.array([0.0, -np.inf, 1.0, -np.inf, -0.5], dtype=np.float32)
    rng = np.random.default_rng(3)
    counts = np.bincount([sample_categorical(row, rng) for _ in range(20_000)], minlength=5)
    assert counts[1] == counts[3] == 0
    keep = [0, 2, 4]
    assert chi_square(counts[keep], probs(row)[keep]) < CHI2_CRITICAL_P001[2]


class FixedUniform(np.random.Generator):
    """A generator whose ``random()`` always returns ``value`` (for the ends of [0, 1))."""

    def __init__(self, value: float) -> None:
        super().__init__(np.random.PCG64(0))
        self.value = value

    def random(self, *args: Any, **kwargs: Any) -> float:  # type: ignore[override]
        return self.value


def test_extreme_uniform_draws_never_pick_removed_tokens() -> None:
    row = np.array([-np.inf, 0.0, -np.inf, 1.0, -np.inf], dtype=np.float32)
    assert sample_categorical(row, FixedUniform(0.0)) == 1
    assert sample_categorical(row, FixedUniform(np.nextafter(1.0, 0.0))) == 3
    assert (
        sample_categorical(row, FixedUniform(0.5)) == 3
    )  # 0.5 * (1 + e) falls in token 3's interval


def test_same_seed_same_tokens_and_different_seeds_differ() -> None:
    sampler = make_sampler(temperature=0.9, top_k=40, top_p=0.95)
    row = np.random.default_rng(0).normal(size=64).astype(np.float32)

    def run(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [sampler(row, rng) for _ in range(200)]

    assert run(123) == run(123)
    assert run(123) != run(124)


def test_a_draw_uses_exactly_one_random_number() -> None:
    row = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    rng, twin = np.random.default_rng(5), np.random.default_rng(5)
    make_sampler(temperature=0.8, top_p=0.9)(row, rng)
    twin.random()
    assert rng.bit_generator.state == twin.bit_generator.state


@PROPERTY
@given(row=logit_rows())
def test_greedy_is_argmax_and_uses_no_randomness(row: np.ndarray) -> None:
    greedy = make_sampler(temperature=0.0, top_k=3, top_p=0.5, typical_p=0.2)
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    token = greedy(row, rng)
    assert token == int(torch.argmax(torch.from_numpy(row)))  # first index among ties
    assert rng.bit_generator.state == before
    assert greedy(row, None) == token
    filtered = make_logits_filter(temperature=0.0)(row)
    assert np.flatnonzero(kept(filtered)).tolist() == [token]


@PROPERTY
@given(row=logit_rows(), history=st.lists(st.integers(0, 1), max_size=10))
def test_no_function_mutates_its_input(row: np.ndarray, history: list[int]) -> None:
    original = row.copy()
    tokens = np.asarray(history, dtype=np.int64)
    apply_temperature(row, 0.5)
    apply_top_k(row, 2)
    apply_top_p(row, 0.5)
    apply_min_p(row, 0.5)
    apply_typical_p(row, 0.5)
    apply_logit_bias(row, {0: 1.0})
    apply_repetition_penalty(tokens, row, 1.5)
    apply_frequency_presence_penalty(tokens, row, 0.5, 0.5)
    apply_no_repeat_ngram(tokens, row, 1)
    make_logits_filter(0.7, 5, 0.9, 0.05, 0.9)(row)
    make_sampler(0.7, 5, 0.9, 0.05, 0.9)(row, np.random.default_rng(0))
    for process in make_logits_processors(1.3, 0.5, 0.5, 2, {1: 1.0}):
        process(tokens, tokens, row)
    np.testing.assert_array_equal(row, original)


# ------------------------------------------------------------------------ log-probs
@PROPERTY
@given(row=logit_rows())
def test_log_softmax_matches_torch(row: np.ndarray) -> None:
    ours = log_softmax(row)
    theirs = torch.log_softmax(torch.from_numpy(row.astype(np.float64)), dim=-1).numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(ours)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-9, atol=1e-9)


def test_top_logprobs_reports_the_chosen_token_and_the_best_alternatives() -> None:
    row = np.array([*np.log([0.1, 0.4, 0.2, 0.2, 0.1]), -np.inf], dtype=np.float32)
    logprob, alternatives = top_logprobs(row, 4, 3)
    assert logprob == pytest.approx(np.log(0.1), abs=1e-6)
    assert [a.token_id for a in alternatives] == [1, 2, 3]  # tie 2/3 by token id
    assert alternatives[0] == TokenLogprob(1, pytest.approx(np.log(0.4), abs=1e-6))
    assert top_logprobs(row, 1, 0) == (pytest.approx(np.log(0.4), abs=1e-6), ())
    _, everything = top_logprobs(row, 0, 100)
    assert [a.token_id for a in everything] == [1, 2, 3, 0, 4]  # the -inf token is left out


@PROPERTY
@given(row=logit_rows(), n=st.integers(0, 20))
def test_top_logprobs_are_the_n_largest(row: np.ndarray, n: int) -> None:
    logp = log_softmax(row)
    _, alternatives = top_logprobs(row, 0, n)
    order = sorted(range(row.shape[0]), key=lambda i: (-logp[i], i))
    expected = [i for i in order[:n] if np.isfinite(logp[i])]
    assert [a.token_id for a in alternatives] == expected
    assert all(isinstance(a.logprob, float) for a in alternatives)


# ----------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"temperature": -0.1},
            r"temperature must be a finite number in [0, inf) (0 means greedy), got -0.1",
        ),
        ({"temperature": float("nan")}, r"temperature must be a finite number in [0, inf)"),
        ({"temperature": float("inf")}, r"temperature must be a finite number in [0, inf)"),
        ({"top_k": -1}, r"top_k must be an integer >= 0 (0 disables it), got -1"),
        ({"top_k": 2.5}, r"top_k must be an integer >= 0 (0 disables it), got 2.5"),
        ({"top_p": 0.0}, r"top_p must be a finite number in (0, 1] (1 disables it), got 0.0"),
        ({"top_p": 1.5}, r"top_p must be a finite number in (0, 1] (1 disables it), got 1.5"),
        ({"min_p": -0.1}, r"min_p must be a finite number in [0, 1] (0 disables it), got -0.1"),
        ({"min_p": 1.1}, r"min_p must be a finite number in [0, 1] (0 disables it), got 1.1"),
        ({"typical_p": 0}, r"typical_p must be a finite number in (0, 1] (1 disables it), got 0"),
        (
            {"typical_p": 1.01},
            r"typical_p must be a finite number in (0, 1] (1 disables it), got 1.01",
        ),
    ],
)
def test_make_sampler_rejects_out_of_range_parameters(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        make_sampler(**kwargs)
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        make_logits_filter(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"repetition_penalty": 0.0},
            r"repetition_penalty must be a finite number in (0, inf) (1 disables it), got 0.0",
        ),
        ({"repetition_penalty": -1.0}, r"repetition_penalty must be a finite number in (0, inf)"),
        (
            {"frequency_penalty": 2.5},
            r"frequency_penalty must be a finite number in [-2, 2] (0 disables it), got 2.5",
        ),
        ({"frequency_penalty": -2.01}, r"frequency_penalty must be a finite number in [-2, 2]"),
        (
            {"presence_penalty": 3},
            r"presence_penalty must be a finite number in [-2, 2] (0 disables it), got 3",
        ),
        (
            {"no_repeat_ngram_size": -1},
            r"no_repeat_ngram_size must be an integer >= 0 (0 disables it), got -1",
        ),
        ({"no_repeat_ngram_size": 2.0}, r"no_repeat_ngram_size must be an integer >= 0"),
        ({"logit_bias": {-1: 1.0}}, r"logit_bias token id -1 is outside the vocabulary [0, vocab)"),
        (
            {"logit_bias": {10: 1.0}, "vocab_size": 10},
            r"logit_bias token id 10 is outside the vocabulary [0, 10)",
        ),
        (
            {"logit_bias": {3: float("nan")}},
            r"logit_bias for token id 3 must be a finite number or -inf, got nan",
        ),
        (
            {"logit_bias": {3: float("inf")}},
            r"logit_bias for token id 3 must be a finite number or -inf, got inf",
        ),
    ],
)
def test_make_logits_processors_rejects_out_of_range_parameters(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        make_logits_processors(**kwargs)


ROW = np.array([0.0, 1.0, 2.0], dtype=np.float32)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: apply_temperature(ROW, 0.0),
            "temperature must be a finite number in (0, inf) (for greedy decoding use make_sampler(temperature=0)), got 0.0",
        ),
        (lambda: apply_top_k(ROW, -2), "top_k must be an integer >= 0"),
        (lambda: apply_top_p(ROW, 0.0), "top_p must be a finite number in (0, 1]"),
        (lambda: apply_min_p(ROW, 2.0), "min_p must be a finite number in [0, 1]"),
        (lambda: apply_typical_p(ROW, 0.0), "typical_p must be a finite number in (0, 1]"),
        (
            lambda: apply_repetition_penalty(NO_HISTORY, ROW, 0.0),
            "repetition_penalty must be a finite number in (0, inf)",
        ),
        (
            lambda: apply_frequency_presence_penalty(NO_HISTORY, ROW, 2.5, 0.0),
            "frequency_penalty must be a finite number in [-2, 2]",
        ),
        (
            lambda: apply_frequency_presence_penalty(NO_HISTORY, ROW, 0.0, -2.5),
            "presence_penalty must be a finite number in [-2, 2]",
        ),
        (
            lambda: apply_no_repeat_ngram(NO_HISTORY, ROW, -1),
            "no_repeat_ngram_size must be an integer >= 0",
        ),
        (
            lambda: apply_logit_bias(ROW, {3: 1.0}),
            "logit_bias token id 3 is outside the vocabulary [0, 3)",
        ),
        (
            lambda: make_logits_processors(logit_bias={5: 1.0})[0](NO_HISTORY, NO_HISTORY, ROW),
            "logit_bias token id 5 is outside the vocabulary [0, 3)",
        ),
        (
            lambda: apply_repetition_penalty(np.array([0, 3]), ROW, 1.5),
            "tokens holds token id 3, outside the vocabulary [0, 3)",
        ),
        (
            lambda: apply_no_repeat_ngram(np.array([-1, 0]), ROW, 2),
            "tokens holds token id -1, outside the vocabulary [0, 3)",
        ),
        (
            lambda: apply_frequency_presence_penalty(np.array([7]), ROW, 0.5),
            "generated holds token id 7, outside the vocabulary [0, 3)",
        ),
        (
            lambda: apply_repetition_penalty(np.array([0.0, 1.0]), ROW, 1.5),
            "tokens must be a 1-D integer array of token ids",
        ),
        (lambda: top_logprobs(ROW, 0, -1), "n must be an integer >= 0"),
        (lambda: top_logprobs(ROW, 3, 1), "token_id 3 is outside the vocabulary [0, 3)"),
        (
            lambda: make_sampler(temperature=1.0)(ROW, None),
            "sampling with temperature > 0 needs an np.random.Generator, got NoneType",
        ),
        (
            lambda: make_sampler()(ROW.reshape(1, 3), np.random.default_rng(0)),
            "logits must be a non-empty 1-D array [vocab], got shape (1, 3)",
        ),
        (
            lambda: make_sampler()(np.array([1, 2]), np.random.default_rng(0)),
            "logits must be a floating-point array, got dtype int64",
        ),
    ],
)
def test_functions_reject_bad_arguments(call: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        call()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_nan_row_raises_instead_of_sampling_garbage(temperature: float) -> None:
    sampler = make_sampler(temperature=temperature, top_p=0.9)
    row = np.array([0.0, np.nan, 1.0, np.nan], dtype=np.float32)
    with pytest.raises(
        InvalidArgumentError,
        match=re.escape("logits contain NaN at 2 of 4 token ids (first: [1, 3])"),
    ):
        sampler(row, np.random.default_rng(0))
    with pytest.raises(
        InvalidArgumentError,
        match=re.escape("logits contain +inf at 1 of 3 token ids (first: [2])"),
    ):
        sampler(np.array([0.0, 1.0, np.inf], dtype=np.float32), np.random.default_rng(0))
    for call in (
        lambda: apply_top_p(row, 0.5),
        lambda: log_softmax(row),
        lambda: apply_repetition_penalty(NO_HISTORY, row, 1.2),
    ):
        with pytest.raises(InvalidArgumentError, match="logits contain NaN"):
            call()


def test_a_row_with_every_token_removed_raises() -> None:
    (ban,) = make_logits_processors(no_repeat_ngram_size=1)
    row = ban(np.array([0, 1, 2], dtype=np.int64), NO_HISTORY, ROW)  # a processor may remove all
    assert np.isneginf(row).all()
    for sampler in (make_sampler(temperature=0.0), make_sampler(temperature=1.0)):
        with pytest.raises(
            InvalidArgumentError, match=re.escape("every one of the 3 logits is -inf")
        ):
            sampler(row, np.random.default_rng(0))
