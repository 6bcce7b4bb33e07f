"""Real-model checks of the fused graph and GGUF transcoding on SmolLM2-135M (``pytest -m slow``).

The fused fp32 bundle must answer exactly as transformers does (greedy, token for
token); the ``gguf`` bundle must carry the GGUF's Q4_1 / Q8_0 blocks unchanged, and
with fp32 compute (accuracy_level 1) give the fp32 graph's logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_slm
from edge_slm.bundle import read_bundle
from edge_slm.generation.decoders import open_decoder
from edge_slm.generation.fused_step import FusedDecoder

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colours."},
    ],
]


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    from edge_slm_export.decoder import ExportOptions, export_decoder

    return export_decoder(
        str(smollm2_gguf),
        tmp_path_factory.mktemp("smollm2") / "fused",
        ExportOptions(graph="fused"),
    )


@pytest.fixture(scope="module")
def transcoded(fused: Path) -> Path:
    from edge_slm_quantize.bundle import quantize_bundle

    return quantize_bundle(fused, fused.with_name("gguf"), "gguf")


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_fused_greedy_matches_transformers(
    fused: Path, smollm2_reference: tuple[Any, Any], messages: list[dict[str, str]]
) -> None:
    import torch

    model, tokenizer = smollm2_reference
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False
        )
    runtime = edge_slm.load(fused)
    assert isinstance(runtime.decoder, FusedDecoder)
    ours = runtime.chat(messages, max_new_tokens=40, temperature=0.0)
    assert ours.prompt_token_ids == ids[0].tolist()
    assert ours.token_ids == out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def exact(fused: Path) -> Path:
    """The gguf transcoding with fp32 compute (accuracy_level 1): the GGUF's math exactly."""
    from edge_slm_quantize.bundle import quantize_bundle

    return quantize_bundle(fused, fused.with_name("gguf-exact"), "gguf", accuracy_level=1)


def test_transcoded_blocks_and_logits(fused: Path, transcoded: Path, exact: Path) -> None:
    from edge_slm_quantize.bundle import graph_size

    details = read_bundle(transcoded).quantization.details
    assert details["gguf_tensor_types"] == {"Q4_1": 210, "Q8_0": 1}
    assert details["max_abs_weight_diff_vs_fp32_graph"] < 1e-6
    assert "shared with the lm_head" in details["embedding"]
    assert graph_size(transcoded / "model.onnx") < 105e6  # the graph and its model.onnx.data
    manifest = read_bundle(fused)
    assert manifest.decoder is not None
    ids = np.asarray([list(range(100, 164))], dtype=np.int64)
    reference = open_decoder(fused / "model.onnx", manifest.decoder).all_logits(ids)
    got = open_decoder(exact / "model.onnx", manifest.decoder).all_logits(ids)
    assert np.abs(got - reference).max() < 1e-3


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_exact_transcoding_answers_as_fp32(
    fused: Path, exact: Path, messages: list[dict[str, str]]
) -> None:
    """Same weights, fp32 math: the same greedy tokens as the fp32 graph.

    (With int8 activations, the default accuracy_level 4, SmolLM2's first answer token
    to the France question sits within 0.3 logits of two others and may flip.)
    """
    want = edge_slm.load(fused).chat(messages, max_new_tokens=30, temperature=0.0)
    got = edge_slm.load(exact).chat(messages, max_new_tokens=30, temperature=0.0)
    assert got.token_ids == want.token_ids
