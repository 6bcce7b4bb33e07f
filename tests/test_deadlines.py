"""Deadlines cover the prompt (computed in chunks), scoring and batches, not only decoding."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import edge_slm
from edge_slm.generation import loop
from edge_slm.generation.fused_step import FusedDecoder
from edge_slm.text.stops import FinishReason

PROMPT = "You are a kiosk assistant at the central station. Answer briefly. Where is it?"


@pytest.fixture(params=["fused", "plain"])
def model(
    request: pytest.FixtureRequest, fused_bundles: dict[str, Path], bundles: dict[str, Path]
) -> edge_slm.TextGenerator:
    path = fused_bundles["llama"] if request.param == "fused" else bundles["llama"]
    loaded = edge_slm.load(path)
    assert isinstance(loaded, edge_slm.TextGenerator)
    return loaded


def test_a_prompt_in_chunks_gives_the_one_pass_tokens(
    model: edge_slm.TextGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = model.generate(PROMPT, max_new_tokens=10, temperature=0.0)
    monkeypatch.setattr(loop, "PREFILL_CHUNK", 5)
    chunked = model.generate(PROMPT, max_new_tokens=10, temperature=0.0)
    assert len(whole.prompt_token_ids) > 3 * 5
    assert chunked.token_ids == whole.token_ids


def test_the_deadline_stops_prompt_processing(
    model: edge_slm.TextGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "PREFILL_CHUNK", 2)
    start = time.monotonic()
    with pytest.raises(edge_slm.DeadlineError, match="while computing the prompt"):
        model.generate(PROMPT, max_new_tokens=10, deadline_s=1e-6)
    assert time.monotonic() - start < 1.0
    assert model.capacity().live_sessions == 0  # nothing left holding KV memory
    # A batch: the fused graph computes each row's prompt in chunks (the deadline stops
    # it); the plain graph computes all rows in one padded forward, then stops decoding.
    try:
        results = model.generate_batch([PROMPT, PROMPT], max_new_tokens=4, deadline_s=1e-6)
    except edge_slm.DeadlineError:
        assert isinstance(model.decoder, FusedDecoder)
    else:
        assert not isinstance(model.decoder, FusedDecoder)
        assert all(r.finish_reason == FinishReason.DEADLINE for r in results)


def test_the_deadline_bounds_scoring(model: edge_slm.TextGenerator) -> None:
    options = [f" option {i}" for i in range(30)]
    with pytest.raises(edge_slm.DeadlineError, match="after scoring"):
        model.choose(PROMPT, options, deadline_s=1e-6)
    assert len(model.choose(PROMPT, options[:3], deadline_s=60)) == 3


def test_a_deadline_during_decoding_keeps_the_tokens(model: edge_slm.TextGenerator) -> None:
    banned = {t: float("-inf") for t in model.manifest.special_tokens.eos_token_ids}
    result = model.generate(
        "Hi", max_new_tokens=100, temperature=0.0, deadline_s=1e-6, logit_bias=banned
    )
    assert result.finish_reason == FinishReason.DEADLINE
    assert len(result.token_ids) == 1  # the first token, then the deadline was seen
