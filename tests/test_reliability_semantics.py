"""The manifest's meaning against the graph and the tokenizer (edge_slm/bundle/semantics.py):
each mismatch a BundleError naming it, at load, before any generation."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import edge_slm
from edge_slm.bundle import read_manifest, write_manifest


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _rewrite(folder: Path, **changes: Any) -> None:
    manifest, _ = read_manifest(folder)
    write_manifest(folder, replace(manifest, **changes))


def _decoder(folder: Path, **changes: Any) -> None:
    manifest, _ = read_manifest(folder)
    assert manifest.decoder is not None
    write_manifest(folder, replace(manifest, decoder=replace(manifest.decoder, **changes)))


def _load_fails(folder: Path, match: str) -> None:
    with pytest.raises(edge_slm.BundleError, match=match):
        edge_slm.load(folder, cache=False)


@pytest.fixture()
def plain(bundles: dict[str, Path], tmp_path: Path) -> Path:
    return _copy(bundles["llama"], tmp_path / "plain")


@pytest.fixture()
def fused(fused_bundles: dict[str, Path], tmp_path: Path) -> Path:
    return _copy(fused_bundles["llama"], tmp_path / "fused")


def test_vocab_size_must_match_the_logits(plain: Path) -> None:
    manifest, _ = read_manifest(plain)
    _rewrite(plain, vocab_size=manifest.vocab_size + 7)
    _load_fails(plain, rf"logits width {manifest.vocab_size} != manifest vocab_size")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(plain: Path) -> None:
    from tokenizers import Tokenizer

    manifest, _ = read_manifest(plain)
    tok = Tokenizer.from_file(str(plain / "tokenizer.json"))
    missing = manifest.vocab_size - tok.get_vocab_size(with_added_tokens=True) + 3
    tok.add_tokens([f"<extra_{i}>" for i in range(max(missing, 3))])
    tok.save(str(plain / "tokenizer.json"))
    write_manifest(plain, manifest)
    _load_fails(plain, "tokenizer vocabulary .* larger than the manifest's vocab_size")


def test_swapped_kv_names_are_refused(plain: Path) -> None:
    manifest, _ = read_manifest(plain)
    assert manifest.decoder is not None
    io = manifest.decoder
    _decoder(plain, present_key=io.present_value, present_value=io.present_key)
    _load_fails(plain, "swapped key/value")


def test_fewer_layers_than_the_graph_are_refused(plain: Path) -> None:
    manifest, _ = read_manifest(plain)
    assert manifest.decoder is not None
    _decoder(plain, num_layers=manifest.decoder.num_layers - 1)
    _load_fails(plain, "more layers than decoder.num_layers|does not describe")


def test_context_longer_than_the_fused_graph_covers_is_refused(fused: Path) -> None:
    manifest, _ = read_manifest(fused)
    assert manifest.decoder is not None and manifest.decoder.max_length is not None
    _rewrite(fused, context_length=manifest.decoder.max_length + 1)
    _load_fails(fused, "larger than the graph's max_length")
    _rewrite(fused, context_length=manifest.context_length)
    _decoder(fused, max_length=manifest.decoder.max_length * 2)
    _load_fails(fused, r"max_length .* larger than the graph's 'cos_cache'")


def test_a_task_that_does_not_fit_the_graph(plain: Path) -> None:
    data = json.loads((plain / "manifest.json").read_text())
    data["task"] = "feature-extraction"
    data["encoder"] = {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "output": "logits"}  # fmt: skip
    (plain / "manifest.json").write_text(json.dumps(data))
    _load_fails(plain, "differ from the manifest's encoder section|needs an output")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_encoders import build_classifier

    from edge_slm_export.encoder import export_encoder

    root = tmp_path_factory.mktemp("sem-enc")
    source = build_classifier("bert", root / "src", seed=3)
    return Path(export_encoder(str(source), root / "bundle"))


def test_label_count_must_match_the_classifier_output(classifier: Path, tmp_path: Path) -> None:
    folder = _copy(classifier, tmp_path / "cls")
    manifest, _ = read_manifest(folder)
    assert manifest.labels
    _rewrite(folder, labels=[*manifest.labels, "extra"])
    _load_fails(folder, rf"has {len(manifest.labels)} classes but the manifest lists")


def test_an_unreadable_tokenizer_is_a_bundle_error(plain: Path) -> None:
    (plain / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    manifest, _ = read_manifest(plain)
    write_manifest(plain, manifest)
    _load_fails(plain, "tokenizer 'tokenizer.json' cannot be read")


def test_encoder_inputs_with_lone_surrogates_are_typed_errors(classifier: Path) -> None:
    model = edge_slm.load(classifier, cache=False)
    assert isinstance(model, edge_slm.TextClassifier)
    with pytest.raises(edge_slm.InvalidArgumentError, match="lone surrogate"):
        model.classify("bad \ud800 text")
    with pytest.raises(edge_slm.InvalidArgumentError, match="second text"):
        list(model.classify([("fine", "\udfff")]))
