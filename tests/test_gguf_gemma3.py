"""Gemma 3 270M from its Q4_K_M GGUF end to end (``pytest -m slow``; minutes).

The real file mixes Q5_0 (81 tensors, every input of 640), Q4_K (27), Q6_K (9) and Q8_0
(10, the tied 262,144 x 640 embedding among them). Exported through transformers (which
de-quantizes it) the fp32 graph must answer as transformers does; transcoded with
``gguf`` every weight must equal the fp32 graph's (the GGUF's own values) exactly, and
with fp32 compute (accuracy level 1) the runtime's greedy output must be the fp32
graph's. Fetch the file first: ``python examples/fetch_assets.py --only gemma3``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import edge_slm
from edge_slm.bundle import read_bundle

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def gemma3_gguf() -> Path:
    default = Path(__file__).parents[1] / ".cache" / "assets"
    path = Path(os.environ.get("EDGE_SLM_ASSETS", default)) / "gemma-3-270m-q4_k_m.gguf"
    assert path.is_file(), f"{path} is missing: run `python examples/fetch_assets.py --only gemma3`"
    return path


@pytest.fixture(scope="module")
def fp32(gemma3_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fused fp32 bundle (export validates its logits against transformers)."""
    from edge_slm_export.decoder import ExportOptions, export_decoder

    return export_decoder(
        str(gemma3_gguf), tmp_path_factory.mktemp("gemma3") / "fp32", ExportOptions(graph="fused")
    )


@pytest.fixture(scope="module")
def exact(fp32: Path) -> Path:
    """Every block carried, fp32 compute: the GGUF's weights and math."""
    from edge_slm_quantize.bundle import quantize_bundle

    return quantize_bundle(fp32, fp32.with_name("gguf-exact"), "gguf", accuracy_level=1)


def test_fp32_graph_answers_as_transformers(gemma3_gguf: Path, fp32: Path) -> None:
    """Greedy tokens of transformers' model (the GGUF de-quantized) on our prompt ids.

    (The bundle's tokenizer was converted from the GGUF by transformers at export;
    converting it again here would take minutes.)"""
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = gemma3_gguf.parent, gemma3_gguf.name
    model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    runtime = edge_slm.load(fp32)
    for prompt in PROMPTS:
        ours = runtime.generate(prompt, max_new_tokens=24, temperature=0.0)
        ids = torch.tensor([ours.prompt_token_ids])
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
            )
        assert ours.token_ids == out[0, ids.shape[1] :].tolist(), prompt


def test_every_weight_is_carried_exactly(exact: Path) -> None:
    details = read_bundle(exact).quantization.details
    assert details["gguf_tensor_types"] == {"Q4_K": 27, "Q5_0": 81, "Q6_K": 9, "Q8_0": 10}
    assert details["max_abs_weight_diff_vs_fp32_graph"] == 0.0
    assert details["gguf_requantized"] == {}
    assert "shared with the lm_head" in details["embedding"]  # the Q8_0 table, once


def test_exact_bundle_answers_as_the_fp32_graph(fp32: Path, exact: Path) -> None:
    reference, ours = edge_slm.load(fp32), edge_slm.load(exact)
    for prompt in PROMPTS:
        want = reference.generate(prompt, max_new_tokens=32, temperature=0.0)
        got = ours.generate(prompt, max_new_tokens=32, temperature=0.0)
        assert got.token_ids == want.token_ids, prompt


def test_smaller_variant(fp32: Path, exact: Path) -> None:
    """gguf-small: Q4_K carried, the wider types in 4 bits; about 2/3 of the exact file
    (218.6 vs 341.0 MB measured), and its next-token choice still follows the fp32 graph."""
    import numpy as np

    from edge_slm.generation.decoders import open_decoder
    from edge_slm_quantize.bundle import graph_size, quantize_bundle

    small = quantize_bundle(fp32, fp32.with_name("gguf-small"), "gguf-small")
    details = read_bundle(small).quantization.details
    assert details["gguf_tensor_types"] == {"Q4_K": 27}
    assert sum(details["gguf_requantized"].values()) == 81 + 9 + 10
    assert graph_size(small / "model.onnx") < 0.7 * graph_size(exact / "model.onnx")
    manifest = read_bundle(fp32)
    assert manifest.decoder is not None
    reference = open_decoder(fp32 / "model.onnx", manifest.decoder)
    ours = open_decoder(small / "model.onnx", manifest.decoder)
    runtime = edge_slm.load(fp32)
    for prompt in PROMPTS:
        ids = np.asarray([runtime.generate(prompt, max_new_tokens=1).prompt_token_ids])
        want = int(np.argmax(reference.all_logits(ids)[0, -1]))
        top5 = np.argsort(ours.all_logits(ids)[0, -1])[-5:]
        assert want in top5, prompt
