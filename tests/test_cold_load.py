"""Load: the tokenizer parsed while onnxruntime builds the session (build_beside), the
graph walks, and sha256_file."""

from __future__ import annotations

import hashlib
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

import edge_slm
from edge_slm.bundle import files, read_bundle, read_manifest, sha256_file, write_manifest
from edge_slm.engine import overlap
from edge_slm.engine.overlap import build_beside
from edge_slm.engine.session import LoadOptions
from edge_slm.generation import model as model_module
from edge_slm.generation.model import TextGenerator


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


def _main_thread_in(frame_names: set[str]) -> bool:
    """Whether the main thread is now inside a function of one of these names."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        if frame.f_code.co_name in frame_names:
            return True
        frame = frame.f_back
    return False


def test_the_tokenizer_parses_while_onnxruntime_builds_the_session(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, bool]] = []
    real = model_module.load_tokenizer

    def watched(path: Path) -> Any:
        # onnxruntime's Python wrapper is inside its initialize_session call now
        seen.append(
            (threading.current_thread().name, _main_thread_in({"_create_inference_session"}))
        )
        return real(path)

    monkeypatch.setattr(model_module, "load_tokenizer", watched)
    monkeypatch.setattr(overlap, "usable_cpus", lambda: 2)
    loaded = edge_slm.load(bundle_copy, cache=False)
    assert seen == [("edge-slm-beside-session", True)]
    assert isinstance(loaded, TextGenerator) and loaded.decoder.session is not None
    assert sys.getprofile() is None  # the hook is gone


def test_with_one_usable_cpu_the_tokenizer_parses_first_on_the_loading_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order: list[tuple[str, str]] = []

    def step(name: str) -> Callable[[], str]:
        return lambda: order.append((name, threading.current_thread().name)) or name

    monkeypatch.setattr(overlap, "usable_cpus", lambda: 1)
    assert build_beside(step("build"), step("work")) == ("build", "work")
    main = threading.current_thread().name
    assert order == [("work", main), ("build", main)]


def test_load_generates_as_a_generator_loaded_in_the_serial_order(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = edge_slm.load(bundle_copy, cache=False)
    assert isinstance(loaded, TextGenerator)
    manifest = read_bundle(bundle_copy)
    monkeypatch.setattr(overlap, "usable_cpus", lambda: 1)  # tokenizer first, one thread
    plain = TextGenerator(bundle_copy, manifest, LoadOptions(prepared_cache=False))
    assert loaded.tokenizer.to_str() == plain.tokenizer.to_str()
    prompt = [{"role": "user", "content": "Hello there"}]
    ours = loaded.chat(prompt, max_new_tokens=8, temperature=0.0)
    theirs = plain.chat(prompt, max_new_tokens=8, temperature=0.0)
    assert ours.token_ids == theirs.token_ids and ours.text == theirs.text


def _fails(message: str) -> Callable[[], Any]:
    def fail() -> Any:
        raise edge_slm.BundleError(message)

    return fail


def test_build_beside_returns_both_results_and_runs_work_once_build_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # no onnxruntime call in build: work starts when build has returned
    monkeypatch.setattr(overlap, "usable_cpus", lambda: 2)
    order: list[str] = []
    built, done = build_beside(
        lambda: order.append("build") or "session", lambda: order.append("work") or 7
    )
    assert (built, done, order) == ("session", 7, ["build", "work"])


def test_build_beside_raises_the_error_of_work_first() -> None:
    with pytest.raises(edge_slm.BundleError, match="tokenizer"):
        build_beside(_fails("graph"), _fails("tokenizer"))
    with pytest.raises(edge_slm.BundleError, match="tokenizer"):
        build_beside(lambda: "session", _fails("tokenizer"))
    with pytest.raises(edge_slm.BundleError, match="graph"):
        build_beside(_fails("graph"), lambda: 7)
    assert not [t for t in threading.enumerate() if t.name == "edge-slm-beside-session"]


def test_under_a_profiler_build_beside_runs_work_then_build_and_keeps_the_profiler() -> None:
    calls: list[str] = []

    def profiler(frame: Any, event: str, arg: Any) -> None:
        calls.append(event)

    order: list[tuple[str, str]] = []

    def step(name: str) -> Callable[[], str]:
        return lambda: order.append((name, threading.current_thread().name)) or name

    sys.setprofile(profiler)
    try:
        built, done = build_beside(step("build"), step("work"))
        kept = sys.getprofile()
    finally:
        sys.setprofile(None)
    main = threading.current_thread().name
    assert (built, done, order) == ("build", "work", [("work", main), ("build", main)])
    assert kept is profiler and calls


def test_a_bad_tokenizer_is_reported_before_a_graph_onnxruntime_refuses(bundle_copy: Path) -> None:
    (bundle_copy / "tokenizer.json").write_text("{not json")
    # a graph the walks accept and onnxruntime refuses (an operator it does not know)
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph, ir_version=8), str(bundle_copy / "model.onnx"))
    (bundle_copy / "model.onnx.data").unlink(missing_ok=True)
    write_manifest(bundle_copy, read_manifest(bundle_copy)[0])
    with pytest.raises(edge_slm.BundleError, match="tokenizer 'tokenizer.json' cannot be read"):
        edge_slm.load(bundle_copy, cache=False)


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
