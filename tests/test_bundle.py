"""The bundle format: what the runtime accepts and what it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import edge_slm
from edge_slm.bundle import FORMAT_VERSION, MANIFEST_FILE, BundleWarning, Manifest, read_bundle


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


def test_unlisted_files_are_ignored_with_a_warning_and_missing_ones_refused(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (bundle_copy / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (bundle_copy / "README.txt").write_text("copied from a USB stick")
    opened: list[str] = []
    real_open = open

    def spy(path: object, *args: object, **kwargs: object) -> object:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", spy)
    with pytest.warns(
        BundleWarning, match=r"does not list, ignored: \['.DS_Store', 'README.txt'\]"
    ):
        model = edge_slm.load(bundle_copy, cache=False)
    monkeypatch.undo()
    assert isinstance(model, edge_slm.TextGenerator)
    assert not [p for p in opened if p.endswith((".DS_Store", "README.txt"))]  # never read
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(edge_slm.ChecksumError, match="missing"):
        edge_slm.load(bundle_copy)


@pytest.mark.parametrize(
    ("where", "name"),
    [
        ("files", "../model.onnx"),
        ("files", "/etc/passwd"),
        ("files", "sub/model.onnx"),
        ("files", "sub\\model.onnx"),
        ("files", ".."),
        ("files", "C:model.onnx"),
        ("files", "model.onnx\x00"),
        ("checksums", "../outside.bin"),
        ("checksums", "/tmp/outside.bin"),
        ("checksums", "a//b"),
        ("checksums", "manifest.json"),
    ],
)
def test_names_leading_outside_the_bundle_are_refused(
    bundle_copy: Path, where: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = json.loads((bundle_copy / MANIFEST_FILE).read_text())
    if where == "files":
        data["files"]["model"] = name
        data["checksums"][name] = data["checksums"]["model.onnx"]
    else:
        data["checksums"][name] = "0" * 64
    (bundle_copy / MANIFEST_FILE).write_text(json.dumps(data))
    opened: list[str] = []
    real_open = open

    def spy(path: object, *args: object, **kwargs: object) -> object:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(edge_slm.BundleError, match="not allowed|not listed|itself"):
        edge_slm.load(bundle_copy, cache=False)
    monkeypatch.undo()
    assert all(p.endswith(MANIFEST_FILE) for p in opened), opened  # nothing else was opened


def test_a_symlink_leading_out_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    shutil.copyfile(bundle_copy / "tokenizer.json", outside)
    (bundle_copy / "tokenizer.json").unlink()
    (bundle_copy / "tokenizer.json").symlink_to(outside)
    with pytest.raises(edge_slm.BundleError, match="leads outside the bundle"):
        edge_slm.load(bundle_copy, cache=False)
    with pytest.raises(edge_slm.BundleError, match="leads outside the bundle"):
        edge_slm.load(bundle_copy, cache=False, verify=False)


def test_external_data_must_be_listed_and_inside(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from edge_slm.bundle.files import check_external_data, external_data_files

    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    weight.data_location = TensorProto.EXTERNAL
    del weight.float_data[:]
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "8")):
        weight.external_data.add(key=key, value=value)
    const = helper.make_node("Constant", [], ["c"], value=weight)
    graph = helper.make_graph(
        [const], "g", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])]
    )
    path = tmp_path / "model.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert external_data_files(path) == ["../secret.bin"]  # found in a Constant node too
    manifest = type("M", (), {"files": {"model": "model.onnx"}})()
    with pytest.raises(edge_slm.BundleError, match="not allowed"):
        check_external_data(tmp_path, manifest, {"model.onnx": "0" * 64})  # type: ignore[arg-type]
    assert onnx  # the build stage's onnx is a dev dependency of the tests only


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
