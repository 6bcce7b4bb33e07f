"""Block offsets folded into MatMulNBits' pre-packed weights of a prepared-session cache
entry (edge_slm/engine/block_offsets.py).

References: numpy ``x_q @ W`` (``W`` the exact de-quantized blocks, ``x_q`` the int8
activation blocks MLAS quantizes: per block ``amax / 127``, round to nearest) for a
one-node graph written by the build stage's own ``BlockWriter``; for a tiny Q4_0/Q4_1/
Q8_0 GGUF Llama (tests/tiny_gguf.py) the offset graph (the same bundle, cache off or
folding off) and the fp32 graph of the de-quantized weights. The fallbacks (folding off,
an unknown layout, a patch the probe refutes, another onnxruntime) must leave the entry
byte for byte what the cache built before folding existed.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edge_slm
from edge_slm.engine import block_offsets
from edge_slm.engine.prepared_cache import DATA_FILE, GRAPH_FILE, SessionCacheWarning
from edge_slm.engine.session import open_session

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11]
needs_layout = pytest.mark.skipif(
    block_offsets.unsupported() != "",
    reason=f"folding is off on this machine: {block_offsets.unsupported()}",
)


@pytest.fixture(scope="module")
def gguf_bundle(hf_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(fp32 fused bundle of the de-quantized weights, its exact ``gguf`` bundle)."""
    from tiny_gguf import write_tiny_gguf

    from edge_slm_export.cli import main

    root = tmp_path_factory.mktemp("offsets")
    path = write_tiny_gguf(hf_models["llama"], root / "tiny-llama.gguf")
    out = root / "fp32"
    assert main([str(path), str(out), "--graph", "fused", "--quantize", "gguf"]) == 0
    return out, out.with_name("fp32-gguf")


def _load(bundle: Path, cache: Path | bool, monkeypatch: pytest.MonkeyPatch, fold: bool) -> Any:
    with monkeypatch.context() as patch:
        patch.setenv(block_offsets.ENV, "1" if fold else "0")
        with warnings.catch_warnings():
            warnings.simplefilter("error", SessionCacheWarning)  # no warning on any path
            return edge_slm.load(bundle, cache=cache, threads=2)


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    return entry


def _digest(entry: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((entry / name).read_bytes()).hexdigest()
        for name in (GRAPH_FILE, DATA_FILE)
    }


def _offset_terms(graph: Path) -> int:
    """MatMulNBits whose output goes into an Add (the offset term) in ``graph``."""
    model = onnx.load(str(graph), load_external_data=False)
    products = {n.output[0] for n in model.graph.node if n.op_type == "MatMulNBits"}
    return sum(1 for n in model.graph.node if n.op_type == "Add" and n.input[0] in products)


def _greedy(model: Any, count: int) -> list[int]:
    steps = model.generate_tokens(PROMPT, max_new_tokens=count, temperature=0.0)
    return [step.token_id for step in steps]


@needs_layout
def test_folded_entry_matches_the_offset_graph(
    gguf_bundle: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32, bundle = gguf_bundle
    terms = _offset_terms(bundle / "model.onnx")
    assert terms == 5  # layer 0: qkv, gate_up; layer 1: qkv, gate_up, down (Q4_1 inside)
    offsets = _load(bundle, False, monkeypatch, fold=True)  # the bundle's own graph
    folded = _load(bundle, tmp_path / "c", monkeypatch, fold=True)
    assert folded.decoder.session_source.endswith(f"block offsets folded into {terms} MatMulNBits")
    entry = _entry(tmp_path / "c")
    assert _offset_terms(entry / GRAPH_FILE) == 0
    saved = onnx.load(str(entry / GRAPH_FILE), load_external_data=False)
    assert not [n for n in saved.graph.node if n.op_type in ("MatMul", "ReduceSum")]
    hit = _load(bundle, tmp_path / "c", monkeypatch, fold=True)
    assert hit.decoder.session_source == "prepared-session cache hit"

    ids = np.asarray([PROMPT + _greedy(offsets, 24)], dtype=np.int64)
    ref = offsets.decoder.all_logits(ids)
    got = folded.decoder.all_logits(ids)
    np.testing.assert_array_equal(hit.decoder.all_logits(ids), got)  # the same entry
    # both graphs quantize activations to int8; they differ only in the offset term
    # (block sums of x vs of x_q): a few percent of the logits' range here
    diff = float(np.abs(got - ref).max())
    assert diff < 0.05 * float(np.abs(ref).max())
    # ... and folding costs no accuracy against the de-quantized fp32 graph
    exact = _load(fp32, False, monkeypatch, fold=True).decoder.all_logits(ids)
    assert np.abs(got - exact).mean() <= 1.1 * np.abs(ref - exact).mean()
    # argmax equal wherever the offset graph's top-2 margin exceeds twice the difference
    top = np.sort(ref[0], axis=-1)
    clear = top[:, -1] - top[:, -2] > 2 * diff
    assert clear.mean() > 0.3
    np.testing.assert_array_equal(got[0].argmax(-1)[clear], ref[0].argmax(-1)[clear])
    assert _greedy(folded, 24) == _greedy(offsets, 24)


def _fallback_entry(
    bundle: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, fold: bool = True
) -> tuple[str, dict[str, str], np.ndarray]:
    model = _load(bundle, cache, monkeypatch, fold=fold)
    ids = np.asarray([PROMPT], dtype=np.int64)
    return model.decoder.session_source, _digest(_entry(cache)), model.decoder.all_logits(ids)


@pytest.fixture(scope="module")
def offset_entry(gguf_bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The entry built with folding off: (detail, file digests, logits)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        cache = tmp_path_factory.mktemp("offset-entry")
        return _fallback_entry(gguf_bundle[1], cache, monkeypatch, fold=False)


def _assert_offset_graph(found: tuple[str, dict[str, str], np.ndarray], offset_entry: Any) -> None:
    detail, digests, logits = found
    assert digests == offset_entry[1]  # the files as without folding, byte for byte
    np.testing.assert_array_equal(logits, offset_entry[2])
    assert "folded into" not in detail


def test_folding_off_keeps_the_offset_graph(offset_entry: Any) -> None:
    detail, _, _ = offset_entry
    assert detail.endswith(f"block offsets not folded: {block_offsets.ENV}=0")


def test_unknown_layout_keeps_the_offset_graph(
    gguf_bundle: Any, offset_entry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(block_offsets, "_COLS", 8)  # a layout this onnxruntime does not use
    found = _fallback_entry(gguf_bundle[1], tmp_path, monkeypatch)
    _assert_offset_graph(found, offset_entry)
    if not block_offsets.unsupported():
        assert found[0].endswith("block offsets not folded: unknown pre-packed layout")


@needs_layout
def test_a_wrong_patch_is_caught_by_the_probe(
    gguf_bundle: Any, offset_entry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare = block_offsets._prepare

    def twice(fold: Any, *args: Any) -> str:  # adds the offsets twice
        why = prepare(fold, *args)
        stored = np.frombuffer(fold.patched, np.float32)
        fold.patched = (stored + (stored - _stored(fold, args[-1]))).tobytes()
        return why

    monkeypatch.setattr(block_offsets, "_prepare", twice)
    found = _fallback_entry(gguf_bundle[1], tmp_path, monkeypatch)
    _assert_offset_graph(found, offset_entry)
    assert "block offsets not folded: probe mismatch at" in found[0]


def _stored(fold: Any, data: Any) -> np.ndarray:
    offset, length = fold.blob
    with open(data.path, "rb") as file:
        file.seek(offset)
        return np.frombuffer(file.read(length), np.float32)


def test_other_onnxruntime_keeps_the_offset_graph(
    gguf_bundle: Any, offset_entry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(block_offsets, "ORT_VERSIONS", ("0.0.0",))
    found = _fallback_entry(gguf_bundle[1], tmp_path, monkeypatch)
    _assert_offset_graph(found, offset_entry)
    assert "(tested: 0.0.0)" in found[0]


@needs_layout
def test_a_tampered_folded_blob_is_refused(
    gguf_bundle: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = gguf_bundle[1]
    ids = np.asarray([PROMPT], dtype=np.int64)
    good = _load(bundle, tmp_path, monkeypatch, fold=True).decoder.all_logits(ids)
    entry = _entry(tmp_path)
    saved = onnx.load(str(entry / GRAPH_FILE), load_external_data=False)
    node = next(n for n in saved.graph.node if n.op_type == "MatMulNBits")
    weight = next(t for t in saved.graph.initializer if t.name == node.input[1])
    packed = next(e.value for e in weight.external_data if e.key.startswith("prepacked"))
    codes = int(np.prod(weight.dims))  # bytes of packed codes; BlkSum at the next 64
    offset = int(packed.split("|")[1].split(";")[0]) + codes + -codes % 64
    with open(entry / DATA_FILE, "r+b") as data:
        data.seek(offset)
        value = np.frombuffer(data.read(4), np.float32) + np.float32(1.0)
        data.seek(offset)
        data.write(value.tobytes())
    monkeypatch.setenv(block_offsets.ENV, "1")
    with pytest.warns(SessionCacheWarning, match="refused and rebuilt: .*model.data has sha256"):
        again = edge_slm.load(bundle, cache=tmp_path, threads=2)
    assert again.decoder.session_source.startswith("prepared-session cache built")
    np.testing.assert_array_equal(again.decoder.all_logits(ids), good)


def _one_node_graph(path: Path, bits: int, block: int, n: int, k: int) -> np.ndarray:
    """``y = x @ W.T`` written by BlockWriter from random blocks with minimums; returns
    the exact ``W [N, K]``."""
    from edge_slm_quantize.blocks import Blocks, BlockWriter

    rng = np.random.default_rng(bits * 100 + block)
    nb = k // block
    codes = rng.integers(0, 1 << bits, size=(n, nb, block)).astype(np.uint8)
    scales = rng.uniform(0.002, 0.02, (n, nb)).astype(np.float16).astype(np.float32)
    zp = np.full((n, nb), 1 << (bits - 1), np.uint8)
    minimums = (rng.normal(0, 0.05, (n, nb))).astype(np.float16).astype(np.float32)
    blocks = Blocks(bits, codes, scales, zp, minimums, ("Q",) * n)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", n])
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    weight = numpy_helper.from_array(np.zeros((k, n), np.float32), "w")
    model = helper.make_model(
        helper.make_graph([matmul], "g", [x], [y], [weight]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    writer = BlockWriter(model, accuracy_level=4)
    writer.splice(model, writer.replace(matmul, "w", blocks))
    onnx.save(model, str(path))
    return blocks.dequantize().astype(np.float64)


def _int8_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """``x`` as MLAS quantizes activations: per block ``amax / 127``, round to nearest."""
    blocks = x.reshape(*x.shape[:-1], -1, block)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = (amax / 127).astype(np.float32)
    inverse = np.where(amax > 0, np.float32(127) / np.maximum(amax, 1e-30), 0).astype(np.float32)
    return (np.rint(blocks * inverse) * scale).reshape(x.shape).astype(np.float64)


@needs_layout
@pytest.mark.parametrize(("bits", "block"), [(4, 32), (4, 16), (8, 32)])
def test_folded_node_is_int8_activations_times_the_exact_weights(
    bits: int, block: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(block_offsets.ENV, "1")
    n, k = 40, 96  # N not a multiple of BlkSum's 16 interleaved columns
    graph = tmp_path / "one.onnx"
    weights = _one_node_graph(graph, bits, block, n, k)
    sha = hashlib.sha256(graph.read_bytes()).hexdigest()
    opened = open_session(graph, 1, False, cache=tmp_path / "c", model_sha256=sha)
    assert opened.detail.endswith("block offsets folded into 1 MatMulNBits")
    plain = open_session(graph, 1, False, cache=False).session
    rng = np.random.default_rng(7)
    for rows in (1, 6):
        x = rng.normal(0, 1, (1, rows, k)).astype(np.float32)
        ref = _int8_blocks(x, block) @ weights.T
        got = opened.session.run(None, {"x": x})[0]
        scale = float(np.abs(ref).max())
        assert np.abs(got - ref).max() < 1e-5 * scale  # fp32 rounding
        # the offset graph takes the block sums of x itself: farther from x_q @ W
        offsets = plain.run(None, {"x": x})[0]
        assert np.abs(offsets - ref).max() > 10 * np.abs(got - ref).max()
        exact = x.astype(np.float64) @ weights.T
        assert np.abs(got - exact).max() < 2 * np.abs(offsets - exact).max()


@needs_layout
def test_a_node_without_a_verified_layout_keeps_its_offset_nodes(
    gguf_bundle: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare = block_offsets._prepare
    seen: list[int] = []

    def all_but_the_first(fold: Any, *args: Any) -> str:
        seen.append(fold.nbits)
        return "refused by the test" if len(seen) == 1 else prepare(fold, *args)

    monkeypatch.setattr(block_offsets, "_prepare", all_but_the_first)
    bundle = gguf_bundle[1]
    model = _load(bundle, tmp_path, monkeypatch, fold=True)
    assert model.decoder.session_source.endswith("block offsets folded into 4 MatMulNBits")
    assert _offset_terms(_entry(tmp_path) / GRAPH_FILE) == 1
    offsets = _load(bundle, False, monkeypatch, fold=True)
    ids = np.asarray([PROMPT], dtype=np.int64)
    ref = offsets.decoder.all_logits(ids)
    assert np.abs(model.decoder.all_logits(ids) - ref).max() < 0.05 * float(np.abs(ref).max())
