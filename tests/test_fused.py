"""The fused decoder graph (export/fused_graph.py) and its loop (edge_slm/generation/fused_step.py) against transformers.

Tiny random Llama (grouped-query attention, tied embeddings) and Qwen2 (q/k/v biases,
untied lm_head): fp32 greedy output token for token, prefix reuse, scoring logits,
buffer growth, the graph's size against optimum's, and 4-bit weight-only quantization.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import edge_slm
from edge_slm.bundle import Quantization, read_bundle, write_manifest
from edge_slm.generation import kv_pool
from edge_slm.generation.fused_step import FusedDecoder
from edge_slm.generation.kv_slots import KVState

FUSED_FAMILIES = ("llama", "qwen2", "gpt2")
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "Café 東京 😀",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def torch_models(hf_models: dict[str, Path]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    return {
        family: AutoModelForCausalLM.from_pretrained(hf_models[family], dtype=torch.float32).eval()
        for family in FUSED_FAMILIES
    }


def _greedy(torch_model: Any, prompt_ids: list[int], new_tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = torch_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def test_manifest_records_the_fused_layout(fused_bundles: dict[str, Path]) -> None:
    for family, path in fused_bundles.items():
        manifest = read_bundle(path)
        assert manifest.decoder is not None
        assert manifest.decoder.layout == "gqa-shared"
        assert manifest.decoder.max_length == manifest.context_length == 128
        assert manifest.decoder.position_ids is None
        assert manifest.validation is not None and manifest.validation.greedy_tokens_match
        assert manifest.validation.max_abs_logit_diff < 1e-4, family
        assert isinstance(edge_slm.load(path).decoder, FusedDecoder)


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_greedy_matches_transformers_token_for_token(
    family: str, fused_bundles: dict[str, Path], torch_models: dict[str, Any]
) -> None:
    model = edge_slm.load(fused_bundles[family])
    seen: list[int] = []
    for prompt in PROMPTS:
        model.reset_cache()
        ours = model.generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0.0)
        expected = _greedy(torch_models[family], ours.prompt_token_ids, NEW_TOKENS)
        assert ours.token_ids == expected, f"{family}: {prompt!r}"
        seen.extend(expected)
    assert len(set(seen)) >= 10  # a degenerate reference would make the check weak


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_prefix_reuse_gives_the_fresh_result(fused_bundles: dict[str, Path], family: str) -> None:
    model = edge_slm.load(fused_bundles[family])
    system = "You are a kiosk assistant at the central station. Answer briefly. "
    with model.conversation() as conversation:
        conversation.generate(system + "Where is platform 4?", max_new_tokens=8, temperature=0.0)
        reused = conversation.generate(
            system + "Where are the toilets?", max_new_tokens=8, temperature=0.0
        )
    assert reused.timings.reused_prompt_tokens > 5
    fresh = edge_slm.load(fused_bundles[family]).generate(
        system + "Where are the toilets?", max_new_tokens=8, temperature=0.0
    )
    assert fresh.timings.reused_prompt_tokens == 0
    assert reused.token_ids == fresh.token_ids


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_scoring_logits_match_torch(
    family: str, fused_bundles: dict[str, Path], torch_models: dict[str, Any]
) -> None:
    import torch

    generator = edge_slm.load(fused_bundles[family])
    ids = np.asarray([[5, 17, 33, 90, 120, 7, 8, 41]], dtype=np.int64)
    with torch.no_grad():
        expected = torch_models[family](torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(generator.decoder.all_logits(ids), expected, atol=1e-4)
    # Prefix in the KV state, then several positions at once (the generator's option scoring).
    backend, state = generator.backend, KVState()
    backend.begin(state)
    backend.extend(state, ids[0, :3].tolist())
    logits = backend.extend(state, ids[0, 3:].tolist(), all_positions=True)
    np.testing.assert_allclose(logits, expected[0, 3:], atol=1e-4)
    assert state.tokens == ids[0].tolist()
    backend.finish(state)
    backend.release(state)


def test_buffers_grow_without_changing_the_result(
    fused_bundles: dict[str, Path], torch_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv_pool, "MIN_CAPACITY", 4)
    monkeypatch.setattr(kv_pool, "CAPACITY_STEP", 4)
    model = edge_slm.load(fused_bundles["qwen2"])
    with model.conversation() as conversation:
        result = conversation.generate("Once upon a time", max_new_tokens=30, temperature=0.0)
        pool = model.backend.pool
        length = len(conversation.cached_tokens)
        assert length <= pool.capacity < 2 * length + 4
    assert result.token_ids == _greedy(torch_models["qwen2"], result.prompt_token_ids, 30)
    assert pool.nbytes == 0  # the last conversation closed: the pool is freed


def test_fused_graph_has_far_fewer_nodes(
    fused_bundles: dict[str, Path], bundles: dict[str, Path]
) -> None:
    count = {
        name: len(onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node)
        for name, path in (("optimum", bundles["llama"]), ("fused", fused_bundles["llama"]))
    }
    layers = 2
    assert count["fused"] <= 13 * layers + 8, count
    assert count["optimum"] > 3 * count["fused"], count


def _quantized_copy(src: Path, out: Path) -> Any:
    """``src`` with its graph 4-bit quantized by quantize.weight_only (int4 defaults)."""
    from edge_slm_quantize.methods import get_method
    from edge_slm_quantize.weight_only import quantize_weights

    manifest = read_bundle(src)
    out.mkdir()
    result = quantize_weights(onnx.load(str(src / "model.onnx")), get_method("int4").defaults)
    onnx.save_model(result.model, str(out / "model.onnx"))
    shutil.copy2(src / "tokenizer.json", out / "tokenizer.json")
    write_manifest(out, replace(manifest, quantization=Quantization(method="int4", bits=4)))
    return result


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int4_weight_only_loads_and_generates_on_the_fused_graph(
    fused_bundles: dict[str, Path], bundles: dict[str, Path], tmp_path: Path, family: str
) -> None:
    result = _quantized_copy(fused_bundles[family], tmp_path / "fused-int4")
    # qkv, o, gate_up, down per layer, and the (tied) lm_head: nothing left in fp32
    assert result.census.quantized == 4 * 2 + 1
    assert result.census.float_weight == 0
    assert result.lm_head == "MatMulNBits"
    _quantized_copy(bundles[family], tmp_path / "optimum-int4")
    manifest = json.loads((tmp_path / "fused-int4" / "manifest.json").read_text())
    assert manifest["decoder"]["layout"] == "gqa-shared"

    # The same weights quantized the same way: the fused graph computes what optimum's does.
    fused, plain = edge_slm.load(tmp_path / "fused-int4"), edge_slm.load(tmp_path / "optimum-int4")
    assert isinstance(fused.decoder, FusedDecoder)
    for prompt in PROMPTS[:2]:
        ids = np.asarray([fused.encode(prompt)], dtype=np.int64)
        np.testing.assert_allclose(
            fused.decoder.all_logits(ids), plain.decoder.all_logits(ids), atol=1e-3
        )
        ours = fused.generate(prompt, max_new_tokens=12, temperature=0.0)
        assert (
            ours.token_ids == plain.generate(prompt, max_new_tokens=12, temperature=0.0).token_ids
        )


@pytest.mark.slow
def test_smollm2_fused_fp32_greedy_matches_transformers(tmp_path: Path, smollm2_gguf: Path) -> None:
    """SmolLM2-135M-Instruct (from its GGUF): fused fp32 bundle vs transformers, greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_slm_export.decoder import ExportOptions, export_decoder

    gguf = smollm2_gguf
    bundle = export_decoder(str(gguf), tmp_path / "smollm2", ExportOptions(graph="fused"))
    manifest = read_bundle(bundle)
    assert manifest.validation is not None and manifest.validation.greedy_tokens_match
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    model = edge_slm.load(bundle)
    for prompt in ["The capital of France is", "def fibonacci(n):", "Once upon a time"]:
        model.reset_cache()
        ours = model.generate(prompt, max_new_tokens=32, temperature=0.0, stop_token_ids=[])
        assert ours.prompt_token_ids == tokenizer(prompt)["input_ids"]
        assert (
            ours.token_ids == _greedy(torch_model, ours.prompt_token_ids, 32)[: len(ours.token_ids)]
        )
