"""Cold load: the tokenizer parsed while the graph hashes (read_bundle_with), and sha256_file."""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import onnx
import pytest

import edge_slm
from edge_slm.bundle import (
    Manifest,
    files,
    read_bundle,
    read_manifest,
    sha256_file,
    write_manifest,
)
from edge_slm.bundle.files import read_bundle_with
from edge_slm.bundle.hash_record import FileHashes
from edge_slm.generation.model import TextGenerator
from edge_slm_export.graph_io import save_graph

T = TypeVar("T")


@pytest.fixture()
def bundle_copy(bundles: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundles["llama"], tmp_path / "bundle"))


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    odd = tmp_path / "odd"
    data = bytes(range(256)) * (5 * 4096 + 3)  # > 4 MiB, not a whole number of pages
    odd.write_bytes(data)
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()
    assert sha256_file(odd) == hashlib.sha256(data).hexdigest()


def _trace_hashing(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(event, thread name) in order: every file hashed, and the call of ``prepare``
    (which runs inside "hash ... beside" when it overlaps a file's hash)."""
    events: list[tuple[str, str]] = []
    real, real_beside = files.sha256_file, files._sha256_beside

    def traced(path: Path) -> str:
        digest = real(path)
        events.append((f"hash {path.name}", threading.current_thread().name))
        return digest

    def traced_beside(path: Path, work: Callable[[], T]) -> tuple[str, T]:
        events.append((f"hash {path.name} beside", threading.current_thread().name))
        result = real_beside(path, work)
        events.append((f"hashed {path.name}", threading.current_thread().name))
        return result

    monkeypatch.setattr(files, "sha256_file", traced)
    monkeypatch.setattr(files, "_sha256_beside", traced_beside)
    return events


def test_prepare_runs_while_the_largest_file_hashes(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the graph's weights move to a second, larger file: that one is hashed beside
    # prepare, the graph itself afterwards
    save_graph(onnx.load(str(bundle_copy / "model.onnx")), bundle_copy / "model.onnx")
    write_manifest(bundle_copy, read_manifest(bundle_copy)[0])
    events = _trace_hashing(monkeypatch)
    main = threading.current_thread().name

    def prepare(manifest: Manifest) -> str:
        events.append(("prepare", threading.current_thread().name))
        return manifest.files["tokenizer"]

    manifest, prepared = read_bundle_with(bundle_copy, prepare)
    # the tokenizer is verified before prepare reads it, every file once
    assert events == [
        ("hash tokenizer.json", main),
        ("hash model.onnx.data beside", main),
        ("prepare", main),
        ("hashed model.onnx.data", main),
        ("hash model.onnx", main),
    ]
    assert prepared == "tokenizer.json"
    assert manifest == read_bundle(bundle_copy)


_REAL_SHA256 = hashlib.sha256


class _ThreadedDigest:
    """hashlib.sha256 that records the thread of every update."""

    def __init__(self, threads: list[str]) -> None:
        self._digest, self._threads = _REAL_SHA256(), threads

    def update(self, data: Any) -> None:
        self._threads.append(threading.current_thread().name)
        self._digest.update(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 5000])
def test_sha256_beside_hashes_the_head_on_a_worker_and_the_rest_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    monkeypatch.setattr(files, "_OVERLAP_BYTES", 1000)
    monkeypatch.setattr(files, "_HASH_CHUNK", 1500)
    threads: list[str] = []
    monkeypatch.setattr(files.hashlib, "sha256", lambda: _ThreadedDigest(threads))
    data = bytes(range(256)) * 20
    path = tmp_path / "blob"
    path.write_bytes(data[:size])
    digest, result = files._sha256_beside(path, lambda: "parsed")
    assert digest == _REAL_SHA256(data[:size]).hexdigest() and result == "parsed"
    tail_chunks = -(-max(size - 1000, 0) // 1500)
    assert threads == ["edge-slm-verify"] + [threading.current_thread().name] * tail_chunks


def test_sha256_beside_hands_on_the_error_of_work(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 5000)

    def fails() -> None:
        raise ValueError("bad tokenizer")

    with pytest.raises(ValueError, match="bad tokenizer"):
        files._sha256_beside(path, fails)
    # the worker was joined
    assert not [t for t in threading.enumerate() if t.name == "edge-slm-verify"]


def test_without_verify_nothing_is_hashed(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = _trace_hashing(monkeypatch)
    manifest, prepared = read_bundle_with(bundle_copy, lambda m: m.task, verify=False)
    assert prepared == "text-generation" and manifest.task == "text-generation"
    assert events == []


def test_with_hash_records_prepare_runs_after_the_checks(
    bundle_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # signed records (the prepared-session cache on): nothing to overlap, no thread
    def no_overlap(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no verifying thread expected")

    monkeypatch.setattr(files, "_verify_while", no_overlap)
    hashes = FileHashes(tmp_path / "records.json", b"k" * 32)
    manifest, prepared = read_bundle_with(bundle_copy, lambda m: m.task, hashes=hashes)
    assert prepared == "text-generation" and manifest.task == "text-generation"


def test_a_corrupt_graph_wins_over_an_error_of_prepare(bundle_copy: Path) -> None:
    model = bundle_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))

    def failing(manifest: Manifest) -> None:
        raise edge_slm.BundleError("prepare failed")

    with pytest.raises(edge_slm.ChecksumError, match="'model.onnx' is corrupt"):
        read_bundle_with(bundle_copy, failing)
    with pytest.raises(edge_slm.ChecksumError, match="'model.onnx' is corrupt"):
        read_bundle_with(bundle_copy, lambda m: m.task)


def test_an_error_of_prepare_is_raised_once_the_files_match(bundle_copy: Path) -> None:
    def failing(manifest: Manifest) -> None:
        raise edge_slm.BundleError("prepare failed")

    with pytest.raises(edge_slm.BundleError, match="prepare failed"):
        read_bundle_with(bundle_copy, failing)


def test_a_corrupt_tokenizer_is_never_handed_to_prepare(bundle_copy: Path) -> None:
    path = bundle_copy / "tokenizer.json"
    path.write_text(path.read_text().replace('"<|im_end|>"', '"<|im_stop|>"', 1))
    called: list[Any] = []
    with pytest.raises(edge_slm.ChecksumError, match="tokenizer.json"):
        read_bundle_with(bundle_copy, called.append)
    assert called == []


def test_load_generates_as_a_generator_that_parses_its_own_tokenizer(bundle_copy: Path) -> None:
    loaded = edge_slm.load(bundle_copy, cache=False)
    assert isinstance(loaded, TextGenerator)
    plain = TextGenerator(bundle_copy, read_bundle(bundle_copy))
    assert loaded.tokenizer.to_str() == plain.tokenizer.to_str()
    prompt = [{"role": "user", "content": "Hello there"}]
    ours = loaded.chat(prompt, max_new_tokens=8, temperature=0.0)
    theirs = plain.chat(prompt, max_new_tokens=8, temperature=0.0)
    assert ours.token_ids == theirs.token_ids and ours.text == theirs.text


def _external(tensor: Any, location: str) -> Any:
    """Mark ``tensor`` as stored in ``location`` (with an offset entry that must be ignored)."""
    from onnx import TensorProto

    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _model_with_external_data_everywhere() -> Any:
    """A ModelProto with an external-data location in every place one can sit."""
    from onnx import TensorProto, helper

    def tensor(name: str, location: str) -> Any:
        return _external(helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0]), location)

    def constant(output: str, location: str) -> Any:
        return helper.make_node("Constant", [], [output], value=tensor(output, location))

    then_graph = helper.make_graph(
        [constant("t", "then.bin")], "then", [], [helper.make_tensor_value_info("t", 1, [1])]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["e0"], ["t"])],
        "else",
        [],
        [helper.make_tensor_value_info("t", 1, [1])],
        initializer=[tensor("e0", "else.bin")],
    )
    branch = helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)
    listed = helper.make_node(
        "Custom", [], ["z"], domain="test.domain", tensors=[tensor("l", "list.bin")]
    )
    sparse = helper.make_sparse_tensor(
        tensor("s_values", "sparse.bin"),
        helper.make_tensor("s_indices", TensorProto.INT64, [1], [0]),
        [4],
    )
    graph = helper.make_graph(
        [constant("c0", "const.bin"), branch, listed],
        "main",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", 1, [1])],
        initializer=[tensor("w", "w.bin")],
        sparse_initializer=[sparse],
    )
    function = helper.make_function(
        "test.domain",
        "F",
        [],
        ["f"],
        [constant("f", "function.bin")],
        [helper.make_opsetid("", 18)],
    )
    return helper.make_model(graph, functions=[function])


def test_external_data_locations_are_found_everywhere_onnx_finds_them() -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = _model_with_external_data_everywhere()
    found = sorted(set(files._locations(memoryview(model.SerializeToString()))))
    expected = ["const.bin", "else.bin", "function.bin", "list.bin", "sparse.bin", "then.bin"]
    assert found == sorted([*expected, "w.bin"])
    # onnx's own walk (graphs, subgraphs, attributes; not sparse tensors or functions)
    by_onnx = {
        entry.value
        for t in _get_all_tensors(model)
        if uses_external_data(t)
        for entry in t.external_data
        if entry.key == "location"
    }
    assert by_onnx and by_onnx <= set(found)


def test_a_truncated_graph_is_a_value_error_at_every_cut() -> None:
    # a cut inside a field is a ValueError (external_data_files makes it a BundleError),
    # never an IndexError; a cut between two top-level fields leaves a shorter model
    data = _model_with_external_data_everywhere().SerializeToString()
    refused = 0
    for cut in range(1, len(data)):
        try:
            files._locations(memoryview(data[:cut]))
        except ValueError:
            refused += 1
    assert refused >= len(data) - 10


def test_the_vocabulary_check_counts_as_get_vocab_size_with_added_tokens(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    from dataclasses import replace

    from tokenizers import AddedToken, Tokenizer

    from edge_slm.bundle.semantics import check_vocabulary

    manifest = read_bundle(bundles["llama"])
    plain = Tokenizer.from_file(str(bundles["llama"] / "tokenizer.json"))
    grown = Tokenizer.from_str(plain.to_str())
    grown.add_tokens([AddedToken(f"<extra_{i}>") for i in range(3)])
    for tokenizer in (plain, grown):
        size = tokenizer.get_vocab_size(with_added_tokens=True)  # the reference count
        check_vocabulary(replace(manifest, vocab_size=size), tokenizer)
        with pytest.raises(edge_slm.BundleError, match=f"vocabulary \\({size} tokens\\)"):
            check_vocabulary(replace(manifest, vocab_size=size - 1), tokenizer)


def test_a_failed_graph_walk_raises_its_own_error_not_the_maps(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk's ValueError leaves with a traceback that still holds slices of the
    mapped view: the map cannot be closed then, and that must not replace the error
    (a raw BufferError was seen on a garbage graph)."""

    def walk(view: memoryview) -> list[str]:
        piece = view[:16]  # alive in this frame, which the traceback keeps
        raise ValueError(f"truncated protobuf message after {len(piece)} bytes")

    monkeypatch.setattr(files, "_locations", walk)
    with pytest.raises(edge_slm.BundleError, match="not a valid ONNX file: truncated"):
        files.external_data_files(bundle_copy / "model.onnx")
