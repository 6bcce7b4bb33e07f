"""Batches, constrained choice, multi-turn prefix reuse and saved prefix caches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_models import FAMILIES

import edge_slm
from edge_slm.text.stops import FinishReason

LAYOUTS = ("optimum", "fused")


@pytest.fixture(params=LAYOUTS)
def layout_bundles(
    request: pytest.FixtureRequest, bundles: dict[str, Path], fused_bundles: dict[str, Path]
) -> dict[str, Path]:
    """The tiny bundles of one graph layout (fused exists for Llama and Qwen2 only)."""
    return bundles if request.param == "optimum" else fused_bundles


@pytest.fixture()
def layout_generators(layout_bundles: dict[str, Path]) -> dict[str, Any]:
    return {family: edge_slm.load(path) for family, path in layout_bundles.items()}


BATCH_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "Hi",
    "def fibonacci(n):",
]


# (layout, family): GPT-2 has optimum's graph only.
CASES = [("optimum", f) for f in FAMILIES] + [("fused", "llama"), ("fused", "qwen2")]


def load_case(request: pytest.FixtureRequest, layout: str, family: str) -> Any:
    fixture = "bundles" if layout == "optimum" else "fused_bundles"
    return edge_slm.load(request.getfixturevalue(fixture)[family])


@pytest.mark.parametrize(("layout", "family"), CASES)
def test_greedy_batch_equals_one_by_one(
    request: pytest.FixtureRequest, layout: str, family: str
) -> None:
    model = load_case(request, layout, family)
    batch = model.generate_batch(BATCH_PROMPTS, max_new_tokens=16, temperature=0.0)
    for prompt, row in zip(BATCH_PROMPTS, batch, strict=True):
        model.reset_cache()
        single = model.generate(prompt, max_new_tokens=16, temperature=0.0)
        assert row.token_ids == single.token_ids, prompt
        assert row.text == single.text
        assert row.finish_reason == single.finish_reason
        assert row.prompt_token_ids == single.prompt_token_ids


def test_batch_rows_stop_on_their_own(generators: dict[str, Any]) -> None:
    model = generators["llama"]
    singles = [model.generate(p, max_new_tokens=12, temperature=0.0) for p in BATCH_PROMPTS]
    stop = singles[0].text[2:5]
    batch = model.generate_batch(BATCH_PROMPTS, max_new_tokens=12, temperature=0.0, stop=[stop])
    assert batch[0].finish_reason == FinishReason.STOP_STRING
    assert batch[0].text == singles[0].text[: singles[0].text.index(stop)]
    for single, row in zip(singles[1:], batch[1:], strict=True):
        if stop not in single.text:
            assert row.text == single.text and row.finish_reason == single.finish_reason


def test_seeded_sampling_in_a_batch_equals_one_by_one(layout_generators: dict[str, Any]) -> None:
    model = layout_generators["qwen2"]
    kwargs = {"max_new_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 5}
    batch = model.generate_batch(BATCH_PROMPTS[:2], **kwargs)
    for prompt, row in zip(BATCH_PROMPTS[:2], batch, strict=True):
        assert row.token_ids == model.generate(prompt, **kwargs).token_ids


def test_bad_batches(generators: dict[str, Any]) -> None:
    with pytest.raises(edge_slm.InvalidArgumentError, match="non-empty list"):
        generators["gpt2"].generate_batch("a single string")
    with pytest.raises(edge_slm.InvalidArgumentError, match="non-empty list"):
        generators["gpt2"].generate_batch([])


def reference_option_logprob(hf_dir: Path, prompt_ids: list[int], full_ids: list[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[pos - 1, full_ids[pos]] for pos in range(len(prompt_ids), len(full_ids))))


@pytest.mark.parametrize(("layout", "family"), CASES)
def test_choose_matches_transformers_scores(
    request: pytest.FixtureRequest, layout: str, family: str, hf_models: dict[str, Path]
) -> None:
    model = load_case(request, layout, family)
    prompt = "Q: What is the capital of France? A:"
    options = [" Paris", " Berlin", " a small village by the sea", " 84"]
    result = model.choose(prompt, options)
    assert [o for o, _ in result] == options
    probs = np.array([p for _, p in result])
    assert np.isclose(probs.sum(), 1.0)
    context = model.encode(prompt)
    reference = np.array(
        [
            reference_option_logprob(hf_models[family], context, model.encode(prompt + o))
            for o in options
        ]
    )
    expected = np.exp(reference - reference.max())
    expected /= expected.sum()
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    # Length normalisation divides each score by the option's token count.
    lengths = np.array([len(model.encode(prompt + o)) - len(context) for o in options])
    normalized = np.array([p for _, p in model.choose(prompt, options, normalize=True)])
    expected_norm = np.exp(reference / lengths - (reference / lengths).max())
    np.testing.assert_allclose(normalized, expected_norm / expected_norm.sum(), atol=1e-4)


def test_choose_rejects_bad_options(generators: dict[str, Any]) -> None:
    model = generators["llama"]
    with pytest.raises(edge_slm.InvalidArgumentError, match="non-empty list"):
        model.choose("Hello", [])
    with pytest.raises(edge_slm.InvalidArgumentError, match="adds no tokens"):
        model.choose("Hello", ["", " world"])


def test_multi_turn_chat_reuses_earlier_turns(
    layout_generators: dict[str, Any], layout_bundles: dict[str, Path]
) -> None:
    model = layout_generators["qwen2"]
    messages = [
        {"role": "system", "content": "You are a kiosk assistant at the central station."},
        {"role": "user", "content": "Where is platform 4?"},
    ]
    conversation = model.conversation()
    first = conversation.chat(messages, max_new_tokens=8, temperature=0.0)
    messages += [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And the toilets?"},
    ]
    second = conversation.chat(messages, max_new_tokens=8, temperature=0.0)
    assert second.timings.reused_prompt_tokens >= len(first.prompt_token_ids) - 1
    fresh = edge_slm.load(layout_bundles["qwen2"]).chat(messages, max_new_tokens=8, temperature=0.0)
    assert fresh.timings.reused_prompt_tokens == 0
    assert second.token_ids == fresh.token_ids


def test_saved_prefix_cache_is_reused_after_a_restart(
    layout_bundles: dict[str, Path], tmp_path: Path
) -> None:
    bundles = layout_bundles
    system = "You are a kiosk assistant at the central station. Answer briefly. "
    model = edge_slm.load(bundles["llama"])
    path = model.save_prefix_cache(tmp_path / "system.npz", system)
    expected = edge_slm.load(bundles["llama"]).generate(
        system + "Where?", max_new_tokens=6, temperature=0.0
    )

    restarted = edge_slm.load(bundles["llama"])
    assert restarted.load_prefix_cache(path) == len(restarted.encode(system))
    result = restarted.generate(system + "Where?", max_new_tokens=6, temperature=0.0)
    assert result.timings.reused_prompt_tokens > 5
    assert result.token_ids == expected.token_ids

    other = edge_slm.load(bundles["qwen2"])
    with pytest.raises(edge_slm.BundleError, match="made for another model"):
        other.load_prefix_cache(path)
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(edge_slm.BundleError, match="not a valid prefix cache"):
        other.load_prefix_cache(tmp_path / "junk.npz")
