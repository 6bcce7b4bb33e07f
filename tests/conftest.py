"""Shared fixtures: tiny random models and their exported bundles, built once per session."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, build_model


@pytest.fixture(autouse=True, scope="session")
def _children_get_ctrl_c() -> Any:
    """The Ctrl-C tests send SIGINT to child processes. A suite started in the
    background by a non-interactive shell (``cmd &``, ``nohup ... &``) inherits SIGINT
    ignored, and so would every child: Python keeps an ignored SIGINT ignored. With
    Python's own handler here, children start with the default and Ctrl-C works."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session", autouse=True)
def _session_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Keep the prepared-session cache (edge_slm.engine.prepared_cache) out of the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGE_SLM_CACHE_DIR", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> folder of a tiny random HF model (gpt2, llama with GQA, qwen2)."""
    root = tmp_path_factory.mktemp("hf")
    return {family: build_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def bundles(
    hf_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """family -> fp32 bundle of optimum's graph (validated against torch at export)."""
    from edge_slm_export.decoder import ExportOptions, export_decoder

    root = tmp_path_factory.mktemp("bundles")
    options = ExportOptions(graph="optimum")
    return {f: export_decoder(str(path), root / f, options) for f, path in hf_models.items()}


@pytest.fixture(scope="session")
def fused_bundles(
    hf_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """family -> fp32 fused bundle (the default graph of every family that builds one)."""
    from edge_slm_export.architectures import decoder_architecture, supported
    from edge_slm_export.decoder import ExportOptions, export_decoder

    root = tmp_path_factory.mktemp("fused")
    options = ExportOptions(graph="fused")
    # the families with an optimum bundle too (tests/test_architectures_new.py has the rest)
    fused = [f for f in supported("decoder") if decoder_architecture(f).fused and f in hf_models]
    return {f: export_decoder(str(hf_models[f]), root / f, options) for f in fused}


@pytest.fixture(scope="session")
def generators(bundles: dict[str, Path]) -> dict[str, Any]:
    """family -> edge_slm.TextGenerator over the fp32 bundle."""
    import edge_slm

    return {family: edge_slm.load(path) for family, path in bundles.items()}


@pytest.fixture(scope="session")
def encoder_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT classifier ("clf") and a mean-pooled, normalized embedder ("emb")."""
    from tiny_encoders import build_classifier, build_sentence_transformer

    from edge_slm_export.encoder import export_encoder

    root = tmp_path_factory.mktemp("encoders")
    clf = build_classifier("bert", root / "clf-src", seed=1)
    emb = build_sentence_transformer(root / "emb-src", pooling="mean", normalize=True)
    return {
        "clf": export_encoder(str(clf), root / "clf"),
        "emb": export_encoder(str(emb), root / "emb"),
    }


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2 GGUF (slow tests): ``$EDGE_SLM_ASSETS`` or ``.cache/assets``.

    A missing file fails the test: a real-model check that skipped would read as passed.
    """
    default = Path(__file__).parents[1] / ".cache" / "assets"
    path = Path(os.environ.get("EDGE_SLM_ASSETS", default)) / SMOLLM2_GGUF
    assert path.is_file(), f"{path} is missing: run `python examples/fetch_assets.py` first"
    return path


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf: Path) -> tuple[Any, Any]:
    """(transformers model, tokenizer) of SmolLM2 loaded from the GGUF in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval(), tokenizer
