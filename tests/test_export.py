"""The exporter's sources (folder, hub id from a local cache) and its refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_slm_export import ExportOptions, export_decoder
from edge_slm_export.errors import ExportError, UnsupportedModelError, ValidationError
from edge_slm_export.source import source_kind


def test_source_kinds(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert source_kind(str(gguf)) == "gguf"
    assert source_kind(str(tmp_path)) == "folder"
    assert source_kind("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"
    with pytest.raises(ExportError, match="does not exist"):
        source_kind(str(tmp_path / "missing.gguf"))
    with pytest.raises(ExportError, match="not an existing path nor a hub id"):
        source_kind("./no/such/folder")


def test_hub_id_resolves_through_the_hub_cache(hf_models: dict[str, Path], tmp_path: Path) -> None:
    """A hub id goes through huggingface_hub; here from a local cache, offline."""
    cache = tmp_path / "hub"
    repo = cache / "models--edge-slm--tiny-llama"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(hf_models["llama"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path),
    }
    out = tmp_path / "bundle"
    run = subprocess.run(
        [sys.executable, "-m", "export", "edge-slm/tiny-llama", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "validating ONNX against torch" in run.stderr  # progress on stderr
    provenance = json.loads((out / "manifest.json").read_text())["provenance"]
    assert provenance["source"] == "edge-slm/tiny-llama"
    assert provenance["source_kind"] == "hub"


def test_over_tolerance_fails_and_leaves_no_bundle(
    hf_models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "b"
    with pytest.raises(ValidationError, match=r"differ from torch by .* > tolerance 1e-12"):
        export_decoder(str(hf_models["qwen2"]), out, ExportOptions(tolerance=1e-12))
    assert not out.exists() or not any(out.iterdir())


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    import torch
    from tiny_models import build_tokenizer
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    tokenizer.save_pretrained(tmp_path / "neox")
    with pytest.raises(
        UnsupportedModelError,
        match=r"'gpt_neox' is not supported.*\['gemma3_text', 'gpt2', 'llama'",
    ):
        export_decoder(str(tmp_path / "neox"), tmp_path / "out")


def test_pickle_checkpoints_are_refused_unless_allowed(
    hf_models: dict[str, Path], tmp_path: Path
) -> None:
    """A ``.bin`` checkpoint is a pickle (it runs code when loaded): safetensors only by default."""
    import torch
    from safetensors.torch import load_file

    source = tmp_path / "pickled"
    shutil.copytree(hf_models["llama"], source)
    weights = source / "model.safetensors"
    torch.save(load_file(weights), source / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ExportError, match="no safetensors weights.*--allow-pickle"):
        export_decoder(str(source), tmp_path / "refused")
    assert not (tmp_path / "refused" / "manifest.json").exists()
    allowed = export_decoder(str(source), tmp_path / "allowed", ExportOptions(allow_pickle=True))
    assert (allowed / "manifest.json").is_file()
