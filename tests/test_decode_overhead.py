"""Per-token work only when asked: no log-probability unless ``logprobs`` is set, and the
one-pass greedy sampler agrees with argmax and still refuses invalid logits."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from edge_slm.errors import InvalidArgumentError
from edge_slm.generation.sampling import log_softmax, make_sampler


def test_logprob_computed_only_when_asked(generators: dict[str, Any]) -> None:
    model = generators["llama"]
    plain = model.generate("Hello there", max_new_tokens=6, temperature=0.0)
    steps = list(
        model.generate_tokens(model.encode("Hello there"), max_new_tokens=6, temperature=0.0)
    )
    assert all(math.isnan(s.logprob) and s.top_logprobs == () for s in steps)
    asked = list(
        model.generate_tokens(
            model.encode("Hello there"), max_new_tokens=6, temperature=0.0, logprobs=0
        )
    )
    # the same tokens; each log-probability is the argmax's, from the full log-softmax
    assert [s.token_id for s in asked] == [s.token_id for s in steps] == plain.token_ids
    assert all(s.logprob <= 0 and s.top_logprobs == () for s in asked)
    two = model.generate("Hello there", max_new_tokens=6, temperature=0.0, logprobs=2)
    np.testing.assert_allclose(
        [s.logprob for s in asked], [s.logprob for s in two.logprobs], rtol=1e-9
    )
    np.testing.assert_allclose(
        [s.logprob for s in two.logprobs], [s.top_logprobs[0].logprob for s in two.logprobs]
    )


def test_logprobs_out_of_range_is_a_typed_error(generators: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError, match="logprobs"):
        generators["llama"].generate("Hi", max_new_tokens=2, logprobs=-1)


def test_greedy_one_pass_equals_argmax_and_refuses_bad_rows() -> None:
    greedy = make_sampler(temperature=0.0)
    rng = np.random.default_rng(3)
    for _ in range(50):
        row = rng.standard_normal(1000).astype(np.float32)
        row[rng.integers(0, 1000, 5)] = -np.inf
        assert greedy(row, None) == int(np.argmax(row)) == int(np.argmax(log_softmax(row)))
    tied = np.zeros(8, dtype=np.float32)
    assert greedy(tied, None) == 0  # the first of equal maxima
    for bad, message in ((np.nan, "NaN"), (np.inf, r"\+inf")):
        row = np.zeros(8, dtype=np.float32)
        row[5] = bad
        with pytest.raises(InvalidArgumentError, match=message):
            greedy(row, None)
    with pytest.raises(InvalidArgumentError, match="-inf"):
        greedy(np.full(4, -np.inf, dtype=np.float32), None)
    with pytest.raises(InvalidArgumentError, match="1-D"):
        greedy(np.zeros((2, 3), dtype=np.float32), None)
