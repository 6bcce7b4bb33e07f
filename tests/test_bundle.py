"""The bundle format: what the runtime accepts and what it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import edge_slm
from edge_slm.bundle import FORMAT_VERSION, MANIFEST_FILE, Manifest, read_bundle


@pytest.fixture()
def bundle_copy(bundles: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundles["llama"], tmp_path / "bundle"))


def edit_manifest(folder: Path, **changes: object) -> None:
    path = folder / MANIFEST_FILE
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_manifest_round_trips(bundles: dict[str, Path]) -> None:
    manifest = read_bundle(bundles["qwen2"])
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again == manifest
    assert manifest.decoder is not None and manifest.decoder.num_kv_heads == 2
    assert manifest.validation is not None and manifest.validation.max_abs_logit_diff < 1e-3
    assert manifest.validation.greedy_tokens_match
    assert manifest.chat_format is not None
    assert set(manifest.provenance.tools) >= {"torch", "transformers", "onnxruntime", "edge-slm"}


def test_checksums_cover_every_file(bundles: dict[str, Path]) -> None:
    data = json.loads((bundles["gpt2"] / MANIFEST_FILE).read_text())
    assert set(data["checksums"]) == {"model.onnx", "tokenizer.json"}
    assert all(len(v) == 64 for v in data["checksums"].values())


def test_unknown_format_version_is_refused(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, format_version=FORMAT_VERSION + 1)
    with pytest.raises(
        edge_slm.BundleVersionError, match=r"format_version 2 is not supported.*supported: 1"
    ):
        edge_slm.load(bundle_copy)


def test_not_a_manifest_is_refused(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, format="something-else")
    with pytest.raises(edge_slm.BundleError, match="not an edge-slm manifest"):
        edge_slm.load(bundle_copy)


def test_a_changed_byte_is_refused(bundle_copy: Path) -> None:
    model = bundle_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(edge_slm.ChecksumError, match="'model.onnx' is corrupt or was modified"):
        edge_slm.load(bundle_copy)


def test_a_changed_tokenizer_is_refused(bundle_copy: Path) -> None:
    path = bundle_copy / "tokenizer.json"
    path.write_text(path.read_text().replace('"<|im_end|>"', '"<|im_stop|>"', 1))
    with pytest.raises(edge_slm.ChecksumError, match="tokenizer.json"):
        edge_slm.load(bundle_copy)


def test_missing_and_extra_files_are_refused(bundle_copy: Path, tmp_path: Path) -> None:
    (bundle_copy / "notes.txt").write_text("hello")
    with pytest.raises(edge_slm.ChecksumError, match="does not list"):
        edge_slm.load(bundle_copy)
    (bundle_copy / "notes.txt").unlink()
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(edge_slm.ChecksumError, match="missing"):
        edge_slm.load(bundle_copy)


def test_unknown_keys_and_bad_json_are_refused(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, colour="blue")
    with pytest.raises(edge_slm.BundleError, match=r"unknown keys \['colour'\]"):
        edge_slm.load(bundle_copy)
    (bundle_copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(edge_slm.BundleError, match="not valid JSON"):
        edge_slm.load(bundle_copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(edge_slm.BundleError, match="does not exist"):
        edge_slm.load(tmp_path / "nowhere")
    with pytest.raises(edge_slm.BundleError, match="has no manifest.json"):
        edge_slm.load(tmp_path)


def test_graph_disagreeing_with_the_manifest_is_refused(bundle_copy: Path) -> None:
    from edge_slm.bundle import write_manifest

    manifest, _ = __import__("edge_slm.bundle").bundle.read_manifest(bundle_copy)
    from dataclasses import replace

    assert manifest.decoder is not None
    wrong = replace(manifest, decoder=replace(manifest.decoder, num_kv_heads=4))
    write_manifest(bundle_copy, wrong)
    with pytest.raises(edge_slm.BundleError, match="disagrees with manifest"):
        edge_slm.load(bundle_copy)
    renamed = replace(manifest, decoder=replace(manifest.decoder, logits="scores"))
    write_manifest(bundle_copy, renamed)
    with pytest.raises(edge_slm.BundleError, match="lacks inputs/outputs"):
        edge_slm.load(bundle_copy)
