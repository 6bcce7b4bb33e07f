"""The runtime's generation against transformers, on tiny random GPT-2, Llama and Qwen2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_models import FAMILIES

import edge_slm
from edge_slm.text.stops import FinishReason

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "Café 東京 😀",
]
NEW_TOKENS = 24


def reference_greedy(hf_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers generate(do_sample=False) continuation of ``prompt_ids``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_token_for_token(
    family: str, generators: dict[str, Any], hf_models: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_models[family])
    model = generators[family]
    seen: list[int] = []
    for prompt in PROMPTS:
        ours = model.generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0.0)
        assert ours.prompt_token_ids == tokenizer(prompt)["input_ids"]
        expected = reference_greedy(hf_models[family], ours.prompt_token_ids, NEW_TOKENS)
        assert ours.token_ids == expected, f"{family}: {prompt!r}"
        seen.extend(expected)
        if expected[-1] in model.manifest.special_tokens.eos_token_ids:
            assert ours.finish_reason == FinishReason.STOP_TOKEN
        else:
            assert ours.finish_reason == FinishReason.LENGTH
            assert len(ours.token_ids) == NEW_TOKENS
        assert ours.text == tokenizer.decode(expected, skip_special_tokens=True)
    # A reference that stops at once or repeats one token would make this check weak.
    assert len(seen) >= 2 * NEW_TOKENS and len(set(seen)) >= 10


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_matches_transformers(
    family: str, generators: dict[str, Any], hf_models: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_models[family])
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ours = generators[family].chat(messages, max_new_tokens=12, temperature=0.0)
    assert ours.prompt_token_ids == list(prompt_ids)
    assert ours.token_ids == reference_greedy(hf_models[family], list(prompt_ids), 12)


def test_result_has_timings_and_streaming_joins_to_the_text(generators: dict[str, Any]) -> None:
    model = generators["llama"]
    result = model.generate("Once upon a time", max_new_tokens=16, temperature=0.0)
    t = result.timings
    assert t.load_s > 0 and t.prompt_s > 0 and t.decode_s > 0
    assert t.generated_tokens == len(result.token_ids)
    assert t.prompt_tokens == len(result.prompt_token_ids)
    assert t.prompt_tokens_per_s > 0 and t.decode_tokens_per_s > 0
    model.reset_cache()
    chunks = list(model.stream("Once upon a time", max_new_tokens=16, temperature=0.0))
    assert "".join(c.text for c in chunks) == result.text
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    assert chunks[-1].finish_reason == result.finish_reason
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_same_seed_same_text_and_seeds_differ(generators: dict[str, Any]) -> None:
    model = generators["qwen2"]
    kwargs = {"max_new_tokens": 20, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    first = model.generate("Once upon a time", seed=7, **kwargs)
    again = model.generate("Once upon a time", seed=7, **kwargs)
    assert first.token_ids == again.token_ids
    others = {
        tuple(model.generate("Once upon a time", seed=s, **kwargs).token_ids) for s in range(4)
    }
    assert len(others) > 1


def test_prefix_reuse_gives_the_fresh_result(
    generators: dict[str, Any], bundles: dict[str, Path]
) -> None:
    model = generators["llama"]
    system = "You are a kiosk assistant at the central station. Answer briefly. "
    with model.conversation() as conversation:
        conversation.generate(system + "Where is platform 4?", max_new_tokens=8, temperature=0.0)
        reused = conversation.generate(
            system + "Where are the toilets?", max_new_tokens=8, temperature=0.0
        )
    assert reused.timings.reused_prompt_tokens > 5
    fresh_model = edge_slm.load(bundles["llama"])
    fresh = fresh_model.generate(
        system + "Where are the toilets?", max_new_tokens=8, temperature=0.0
    )
    assert fresh.timings.reused_prompt_tokens == 0
    assert reused.token_ids == fresh.token_ids


def test_stop_string_cuts_the_text(generators: dict[str, Any]) -> None:
    model = generators["gpt2"]
    full = model.generate("Once upon a time", max_new_tokens=24, temperature=0.0)
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = model.generate("Once upon a time", max_new_tokens=24, temperature=0.0, stop=[stop])
    assert cut.finish_reason == FinishReason.STOP_STRING
    assert cut.stop == stop
    assert cut.text == full.text[: full.text.index(stop)]


def test_prompt_longer_than_the_context(generators: dict[str, Any]) -> None:
    model = generators["llama"]
    long_prompt = "Paris is the capital of France. " * 60
    with pytest.raises(edge_slm.ContextLengthError, match="context holds 128"):
        model.generate(long_prompt, max_new_tokens=4)
    result = model.generate(long_prompt, max_new_tokens=4, temperature=0.0, truncate_prompt=True)
    assert len(result.prompt_token_ids) + len(result.token_ids) <= 128


def test_max_new_tokens_is_clamped_to_the_room_left(generators: dict[str, Any]) -> None:
    model = generators["gpt2"]
    prompt = "Paris is the capital of France. " * 9
    n_prompt = len(model.encode(prompt))
    assert n_prompt < 128
    result = model.generate(prompt, max_new_tokens=500, temperature=0.0, stop_token_ids=[])
    assert len(result.token_ids) <= 128 - n_prompt


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop_token_ids": [10_000]}, "stop token id"),
        ({"logprobs": -1}, "logprobs"),
        ({"colour": "blue"}, "unknown generation option"),
    ],
)
def test_bad_options_raise_typed_errors(
    generators: dict[str, Any], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(edge_slm.InvalidArgumentError, match=match):
        generators["llama"].generate("Hello", **kwargs)


def test_logprobs_are_reported(generators: dict[str, Any]) -> None:
    result = generators["llama"].generate("Hello", max_new_tokens=5, temperature=0.0, logprobs=3)
    assert len(result.logprobs) == len(result.token_ids)
    for step in result.logprobs:
        assert len(step.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert step.top_logprobs[0].token_id == step.token_id
        assert np.isclose(step.top_logprobs[0].logprob, step.logprob)
