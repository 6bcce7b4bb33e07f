"""Shared fixtures: tiny random models and their exported bundles, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, build_model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> folder of a tiny random HF model (gpt2, llama with GQA, qwen2)."""
    root = tmp_path_factory.mktemp("hf")
    return {family: build_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def bundles(
    hf_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """family -> fp32 bundle exported from the tiny model (validated at export)."""
    from export.decoder import export_decoder

    root = tmp_path_factory.mktemp("bundles")
    return {family: export_decoder(str(path), root / family) for family, path in hf_models.items()}


@pytest.fixture(scope="session")
def generators(bundles: dict[str, Path]) -> dict[str, Any]:
    """family -> edge_slm.TextGenerator over the fp32 bundle."""
    import edge_slm

    return {family: edge_slm.load(path) for family, path in bundles.items()}
