"""Qwen3, Mistral, Phi-3 and Gemma 3 text in the fused graph, against transformers.

Each family's tiny random model (tests/tiny_models.py: fp32, a few layers, a vocabulary
of 400, sliding windows of 8 positions so prompts plus generation outrun them) is
exported once per module through ``export_decoder`` (which validates it against torch)
and run through the runtime (``edge_slm.load``): greedy output token for token against
``generate(do_sample=False)``, scoring logits against the full forward, and the family's
official chat template rendered as transformers' ``apply_chat_template`` renders it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from tiny_models import FAMILY_TEMPLATES, FUSED_ONLY_FAMILIES, TEMPLATES, build_model

import edge_slm
from edge_slm.bundle import read_bundle
from edge_slm.generation.kv_slots import KVState
from edge_slm.text.chat_format import ChatFormat, render_chat
from edge_slm_export.architectures import decoder_architecture
from edge_slm_export.errors import UnsupportedModelError

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Café 東京 😀"]
NEW_TOKENS = 20
WINDOW = 8  # every tiny model's sliding window
# 20 ids: longer than the window, so a wrong window changes the logits
SCORED = [5, 17, 33, 90, 120, 7, 8, 41, 9, 10, 11, 12, 13, 14, 15, 16, 200, 201, 3, 77]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Any:
    """transformers' generate on these tiny models is mostly per-step overhead, and torch's
    thread pool spinning on a shared 2-core machine made it 7x slower; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-new")
    return {family: build_model(family, root / family) for family in FUSED_ONLY_FAMILIES}


@pytest.fixture(scope="module")
def new_bundles(
    sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    from edge_slm_export.decoder import ExportOptions, export_decoder

    root = tmp_path_factory.mktemp("fused-new")
    options = ExportOptions(graph="fused")
    return {f: export_decoder(str(path), root / f, options) for f, path in sources.items()}


@pytest.fixture(scope="module")
def references(sources: dict[str, Path]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    return {
        f: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for f, path in sources.items()
    }


def _greedy(torch_model: Any, prompt_ids: list[int], new_tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = torch_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def test_the_registry_finds_the_new_families() -> None:
    for family in FUSED_ONLY_FAMILIES:
        architecture = decoder_architecture(family)
        assert architecture.fused and architecture.model_type == family


@pytest.mark.parametrize("family", FUSED_ONLY_FAMILIES)
def test_greedy_matches_transformers_token_for_token(
    family: str, new_bundles: dict[str, Path], references: dict[str, Any]
) -> None:
    manifest = read_bundle(new_bundles[family])
    assert manifest.decoder is not None and manifest.decoder.layout == "gqa-shared"
    assert manifest.validation is not None and manifest.validation.greedy_tokens_match
    assert manifest.validation.max_abs_logit_diff < 1e-4
    model = edge_slm.load(new_bundles[family])
    seen: list[int] = []
    for prompt in PROMPTS:
        model.reset_cache()
        ours = model.generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0.0)
        expected = _greedy(references[family], ours.prompt_token_ids, NEW_TOKENS)
        assert ours.token_ids == expected, f"{family}: {prompt!r}"
        assert len(ours.prompt_token_ids) + len(expected) > 2 * WINDOW  # past the window
        seen.extend(expected)
    assert len(set(seen)) >= 10  # a degenerate reference would make the check weak


@pytest.mark.parametrize("family", FUSED_ONLY_FAMILIES)
def test_scoring_logits_match_torch(
    family: str, new_bundles: dict[str, Path], references: dict[str, Any]
) -> None:
    import torch

    generator = edge_slm.load(new_bundles[family])
    ids = np.asarray([SCORED], dtype=np.int64)
    with torch.no_grad():
        expected = references[family](torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(generator.decoder.all_logits(ids), expected, atol=1e-4)
    # A prefix in the KV state, then the rest at once: the window reaches into the cache.
    backend, state = generator.backend, KVState()
    backend.begin(state)
    backend.extend(state, SCORED[:11])
    logits = backend.extend(state, SCORED[11:], all_positions=True)
    np.testing.assert_allclose(logits, expected[0, 11:], atol=1e-4)
    backend.finish(state)
    backend.release(state)


def _attention_nodes(bundle: Path) -> list[onnx.NodeProto]:
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    return [n for n in graph.node if n.op_type == "GroupQueryAttention"]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_windows_rotary_caches_and_scales_per_layer(
    new_bundles: dict[str, Path], references: dict[str, Any]
) -> None:
    expected_windows = {
        "qwen3": [-1, WINDOW],  # layers from max_window_layers (1) on slide
        "mistral": [WINDOW, WINDOW],
        "phi3": [WINDOW, WINDOW],
        "gemma3_text": [WINDOW, -1, WINDOW, -1],
    }
    for family, windows in expected_windows.items():
        nodes = _attention_nodes(new_bundles[family])
        assert [_attrs(n)["local_window_size"] for n in nodes] == windows, family
    gemma = [(_attrs(n), list(n.input)) for n in _attention_nodes(new_bundles["gemma3_text"])]
    assert [inputs[7] for _, inputs in gemma] == ["cos_local", "cos_global"] * 2
    assert all(abs(attrs["scale"] - 24**-0.5) < 1e-7 for attrs, _ in gemma)  # query_pre_attn_scalar


def test_the_window_matters_in_the_reference(references: dict[str, Any]) -> None:
    """Without its window Mistral's logits on SCORED differ: the parity above is not vacuous."""
    import torch

    model = references["mistral"]
    ids = torch.tensor([SCORED])
    with torch.no_grad():
        windowed = model(ids).logits
        model.config.sliding_window = None
        try:
            full = model(ids).logits
        finally:
            model.config.sliding_window = WINDOW
    assert float((windowed - full).abs().max()) > 1e-2


def test_gemma3_attn_softcap_is_ignored_as_transformers_ignores_it(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """attn_logit_softcapping (a Gemma 2 field, null in every Gemma 3 release) is not applied
    by transformers' Gemma 3, eager or not (nor by llama.cpp): the graph matches that."""
    import torch
    from transformers import Gemma3ForCausalLM

    from edge_slm.generation.decoders import open_decoder

    model = Gemma3ForCausalLM.from_pretrained(
        sources["gemma3_text"], dtype=torch.float32, attn_implementation="eager",
        attn_logit_softcapping=0.5,
    ).eval()  # fmt: skip
    fused = decoder_architecture("gemma3_text").build_fused_graph(model, tmp_path / "m.onnx", 32)
    ids = np.asarray([SCORED], dtype=np.int64)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(
        open_decoder(fused.path, fused.io).all_logits(ids), expected, atol=1e-4
    )


def test_phi3_long_rope_graph_stops_at_the_original_length(
    new_bundles: dict[str, Path], references: dict[str, Any], tmp_path: Path
) -> None:
    manifest = read_bundle(new_bundles["phi3"])
    assert manifest.decoder is not None and manifest.decoder.max_length == 128
    assert manifest.context_length == 128  # config says 512; the long factors start at 128
    with pytest.raises(UnsupportedModelError, match="original_max_position_embeddings 128"):
        decoder_architecture("phi3").build_fused_graph(references["phi3"], tmp_path / "m.onnx", 256)


def test_unsupported_configs_are_refused(references: dict[str, Any], tmp_path: Path) -> None:
    import copy

    gemma = copy.deepcopy(references["gemma3_text"])
    gemma.config.hidden_activation = "relu"
    with pytest.raises(UnsupportedModelError, match="activation 'relu'.*gelu_pytorch_tanh"):
        decoder_architecture("gemma3_text").build_fused_graph(gemma, tmp_path / "g.onnx", 32)
    phi3 = copy.deepcopy(references["phi3"])
    phi3.config.rope_scaling = {"rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(UnsupportedModelError, match="rope type 'dynamic'"):
        decoder_architecture("phi3").build_fused_graph(phi3, tmp_path / "p.onnx", 32)


# Alternating conversations (Gemma's and Mistral's templates refuse anything else), with
# and without a system message, contents varied as the compiler's own checks vary them.
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere "}],
    [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  and 3 + 3? "},
    ],
    [
        {"role": "system", "content": "You are a kiosk."},
        {"role": "user", "content": "héllo 🙂"},
        {"role": "assistant", "content": "Hi! {{ x }}"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "Anything else?"},
    ],
]
# Which official templates compile to fixed prefixes; the rest run through jinja2 (the
# runtime's [jinja] extra): Qwen3 rewrites assistant turns (think blocks), Mistral puts
# the system message into the last user turn, Gemma 3 into the first, and Phi-3 ends an
# unprompted render with the EOS token, which a ChatFormat has no field for.
COMPILED = {"qwen3": False, "mistral": False, "phi3": False, "gemma3_text": False}


@pytest.mark.parametrize("family", FUSED_ONLY_FAMILIES)
def test_official_chat_template_renders_as_transformers(
    family: str, new_bundles: dict[str, Path], sources: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    manifest = read_bundle(new_bundles[family])
    template = (TEMPLATES / FAMILY_TEMPLATES[family]).read_text(encoding="utf-8")
    assert manifest.chat_template == template
    assert (manifest.chat_format is not None) == COMPILED[family]
    fmt = ChatFormat.from_dict(manifest.chat_format) if manifest.chat_format else None
    tokenizer = AutoTokenizer.from_pretrained(sources[family])
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen
            )
            assert render_chat(messages, fmt, template, gen, special_tokens=special) == expected
    model = edge_slm.load(new_bundles[family])
    assert model.render_chat(CONVERSATIONS[2]) == tokenizer.apply_chat_template(
        CONVERSATIONS[2], tokenize=False, add_generation_prompt=True
    )


def _write_gguf_metadata(config: Any, arch: str, out: Path) -> Path:
    """A GGUF with ``config``'s hyper-parameters as llama.cpp's converter writes them (one
    placeholder tensor: only the metadata is read here)."""
    import gguf

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    if arch == "gemma3":
        writer.add_sliding_window(config.sliding_window)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
    writer.add_tensor("token_embd.weight", np.zeros((4, config.hidden_size), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize(("family", "arch"), [("gemma3_text", "gemma3"), ("qwen3", "qwen3")])
def test_gguf_metadata_maps_to_the_config(
    family: str, arch: str, references: dict[str, Any], tmp_path: Path
) -> None:
    """What source.py reads from a GGUF (transformers' mapping + gguf_config_overrides) is the
    config the file was written from, where it changes the model: head_dim (Qwen3-0.6B's
    is not hidden / heads), Gemma 3's rope scaling on global layers and attention scale."""
    from transformers import AutoConfig

    from edge_slm_export.gguf_config import gguf_config_overrides

    source = references[family].config
    if arch == "gemma3":  # the released layer pattern (every sixth layer global), 8 layers
        changes = {"num_hidden_layers": 8, "layer_types": None, "query_pre_attn_scalar": 32}
    else:  # head_dim 32, not hidden / heads (16), as Qwen3-0.6B has it
        changes = {"head_dim": 32}
    source = type(source)(**{**source.to_dict(), **changes})
    path = _write_gguf_metadata(source, arch, tmp_path / "m.gguf")
    config = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    assert config.model_type == family
    overrides = gguf_config_overrides(path)
    keys = ["head_dim", "num_attention_heads", "num_key_value_heads", "rope_theta"]
    if arch == "qwen3":
        assert config.head_dim != source.head_dim  # what transformers alone gets wrong
    if arch == "gemma3":
        keys += ["rope_scaling", "query_pre_attn_scalar", "sliding_window", "layer_types",
                 "rope_local_base_freq"]  # fmt: skip
        assert config.rope_scaling != source.rope_scaling  # what transformers alone gets wrong
    for key, value in overrides.items():
        setattr(config, key, value)
    assert {k: getattr(config, k) for k in keys} == {k: getattr(source, k) for k in keys}
