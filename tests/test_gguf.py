"""GGUF transcoding (quantize/gguf.py) end to end: a tiny Llama GGUF through export and CLI.

Every carried type's bit-exactness on its own is in tests/test_gguf_kquants.py.

A tiny Llama is written as a GGUF file here (tests/tiny_gguf.py, mixed Q4_0 / Q4_1 /
Q8_0 tensors, Q/K rows permuted as llama.cpp does), exported through transformers to
the fused graph and transcoded with ``--quantize gguf`` through the CLI. The test
rebuilds every GGUF block, byte for byte, from the bundle's MatMulNBits initializers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge_slm.bundle import read_bundle
from edge_slm.generation.decoders import open_decoder

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11]


@pytest.fixture(scope="module")
def gguf_bundles(hf_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(gguf path, fp32 fused bundle, gguf-transcoded bundle), made by ``edge-slm export``."""
    from tiny_gguf import write_tiny_gguf

    from edge_slm_export.cli import main

    root = tmp_path_factory.mktemp("gguf")
    path = write_tiny_gguf(hf_models["llama"], root / "tiny-llama.gguf")
    out = root / "fp32"
    code = main([str(path), str(out), "--graph", "fused", "--quantize", "gguf"])
    assert code == 0
    return path, out, out.with_name("fp32-gguf")


def _gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, np.asarray(t.data)) for t in reader.tensors}


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    half = values.astype(np.float16)
    assert np.array_equal(half.astype(np.float32), values), "a scale is not an fp16 value"
    return half[..., None].view(np.uint8)


def _ggml_bytes(
    kind: str, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, zero: np.ndarray
) -> np.ndarray:
    """GGUF block bytes ``[N, K/32 * block bytes]`` rebuilt from MatMulNBits codes/scales."""
    rows = codes.shape[0]
    if kind == "Q8_0":
        qs = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        blocks = np.concatenate([_fp16_bytes(scales), qs], axis=-1)
    else:
        nibbles = codes[..., :16] | (codes[..., 16:] << 4)
        # the bundle's block offset is m + z d (z = 8: centred codes; 0 where m + 8d
        # would round): the GGUF's m = offset - z d
        offset = (mins - zero.astype(np.float32) * scales).astype(np.float32)
        head = [_fp16_bytes(scales)] + ([_fp16_bytes(offset)] if kind == "Q4_1" else [])
        blocks = np.concatenate([*head, nibbles], axis=-1)
    return blocks.reshape(rows, -1)


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order from transformers' (the converter's permutation)."""
    return (
        rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def test_blocks_are_bit_identical_to_the_gguf(gguf_bundles: Any) -> None:
    from tiny_gguf import EMBEDDING_TYPE, LAYER_TYPES

    path, _, quantized = gguf_bundles
    tensors = _gguf_tensors(path)
    graph = onnx.load(str(quantized / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for name, value in list(inits.items()):  # scales / minimums stored as fp16 + Cast
        if name.endswith("_fp16"):
            inits[name.removesuffix("_fp16")] = value.astype(np.float32)
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    manifest = read_bundle(quantized)
    assert manifest.quantization.method == "gguf"
    heads, kv_heads = 4, manifest.decoder.num_kv_heads if manifest.decoder else 0
    layout = {
        "qkv_proj": ["attn_q", "attn_k", "attn_v"],
        "o_proj": ["attn_output"],
        "gate_up_proj": ["ffn_gate", "ffn_up"],
        "down_proj": ["ffn_down"],
    }
    checked = 0
    for node in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n, k, bits = attrs["N"], attrs["K"], attrs["bits"]
        assert attrs["block_size"] == 32
        packed = inits[node.input[1]]  # [N, K/32, bytes]
        codes = np.empty((n, k // 32, 32), dtype=np.uint8)
        if bits == 4:
            codes[..., 0::2], codes[..., 1::2] = packed & 0x0F, packed >> 4
        else:
            codes[:] = packed
        scales = inits[node.input[2]].reshape(n, k // 32)
        zero = np.full((n, k // 32), 8 if bits == 4 else 128, np.uint8)
        if len(node.input) > 3:
            packed_zp = inits[node.input[3]].reshape(n, -1)
            zero = np.stack([packed_zp & 0x0F, packed_zp >> 4], axis=-1).reshape(n, -1)[
                :, : k // 32
            ]
        base = node.input[1].rsplit("_Q", 1)[0]
        mins = inits.get(f"{base}_block_mins", np.zeros((k // 32, n), np.float32)).T
        if base.startswith("embed_tokens"):
            parts = [("token_embd", EMBEDDING_TYPE)]
            names = ["token_embd.weight"]
        else:
            _, i, proj, _ = base.split(".")
            parts = [(key, LAYER_TYPES[int(i)][key]) for key in layout[proj]]
            names = [f"blk.{i}.{key}.weight" for key, _ in parts]
        start = 0
        for (key, kind), name in zip(parts, names, strict=True):
            gguf_kind, raw = tensors[name]
            assert gguf_kind == kind
            rows = raw.shape[0]
            rebuilt = _ggml_bytes(
                kind,
                codes[start : start + rows],
                scales[start : start + rows],
                mins[start : start + rows],
                zero[start : start + rows],
            )
            if key in ("attn_q", "attn_k"):
                rebuilt = _permute(rebuilt, heads if key == "attn_q" else kv_heads)
            assert np.array_equal(rebuilt, raw), name
            start += rows
            checked += 1
        assert start == n
    assert checked == 1 + 7 * len(LAYER_TYPES)


def test_logits_match_the_dequantized_graph(gguf_bundles: Any, tmp_path: Path) -> None:
    """fp32-compute MatMulNBits over the GGUF blocks = the de-quantized fp32 graph."""
    from edge_slm_quantize.bundle import quantize_bundle

    _, fp32, quantized = gguf_bundles
    exact = quantize_bundle(fp32, tmp_path / "exact", "gguf", accuracy_level=1)
    ids = np.asarray([PROMPT], dtype=np.int64)
    manifest = read_bundle(fp32)
    assert manifest.decoder is not None
    reference = open_decoder(fp32 / "model.onnx", manifest.decoder).all_logits(ids)
    got = open_decoder(exact / "model.onnx", manifest.decoder).all_logits(ids)
    assert np.abs(got - reference).max() < 1e-3 * max(1.0, float(np.abs(reference).max()))
    details = read_bundle(exact).quantization.details
    assert details["max_abs_weight_diff_vs_fp32_graph"] < 1e-6
    assert details["gguf_tensor_types"] == {"Q4_0": 3, "Q4_1": 9, "Q8_0": 3}
    assert details["lm_head"] == "quantized"
    # the default (int8 activations) runs and stays close
    fast = open_decoder(quantized / "model.onnx", manifest.decoder).all_logits(ids)
    assert np.argmax(fast[0, -1]) == np.argmax(reference[0, -1])


def test_gguf_needs_a_gguf_source(fused_llama_folder_bundle: Path, tmp_path: Path) -> None:
    from edge_slm_quantize.bundle import quantize_bundle
    from edge_slm_quantize.gguf import GGUFError

    with pytest.raises(GGUFError, match="came from a folder source"):
        quantize_bundle(fused_llama_folder_bundle, tmp_path / "out", "gguf")


@pytest.fixture(scope="module")
def fused_llama_folder_bundle(
    hf_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from edge_slm_export.decoder import ExportOptions, export_decoder

    return export_decoder(
        str(hf_models["llama"]),
        tmp_path_factory.mktemp("folder") / "b",
        ExportOptions(graph="fused"),
    )


def test_changed_or_moved_gguf_is_refused(gguf_bundles: Any, tmp_path: Path) -> None:
    from edge_slm_quantize.bundle import quantize_bundle
    from edge_slm_quantize.gguf import GGUFError

    path, fp32, _ = gguf_bundles
    copy = tmp_path / "copy.gguf"
    shutil.copy(path, copy)
    with copy.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(GGUFError, match="sha256"):
        quantize_bundle(fp32, tmp_path / "out", "gguf", gguf_path=copy)
    bundle = tmp_path / "moved"
    shutil.copytree(fp32, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["provenance"]["source"] = str(tmp_path / "gone.gguf")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GGUFError, match="--gguf PATH"):
        quantize_bundle(bundle, tmp_path / "out", "gguf")
    out = quantize_bundle(bundle, tmp_path / "out", "gguf", gguf_path=path)
    assert read_bundle(out).quantization.method == "gguf"


def test_unsupported_types_and_settings_are_named() -> None:
    from edge_slm_quantize.errors import QuantizationError
    from edge_slm_quantize.gguf import UnsupportedGGUFTypeError, decode_blocks
    from edge_slm_quantize.methods import get_method

    with pytest.raises(
        UnsupportedGGUFTypeError, match=r"'w' is stored as IQ4_NL.*'Q6_K'.*gguf-small"
    ):
        decode_blocks(np.zeros((2, 144), np.uint8), "IQ4_NL", "w")
    with pytest.raises(QuantizationError, match="block_size"):
        get_method("gguf").settings(block_size=64)
    assert get_method("gguf").settings(accuracy_level=1).accuracy_level == 1


def test_packing_round_trips() -> None:
    from edge_slm_quantize.blocks import Blocks, pack_codes, pack_zero_points, unpack_codes

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(3, 3, 32)).astype(np.uint8)
    zp = rng.integers(0, 16, size=(3, 3)).astype(np.uint8)
    blocks = Blocks(4, codes, np.ones((3, 3), np.float32), zp, None, ("Q4_0",))
    assert np.array_equal(unpack_codes(pack_codes(blocks), 4), codes)
    packed = pack_zero_points(blocks).reshape(3, 2)  # 3 blocks -> 2 bytes per row
    assert np.array_equal(packed[:, 0] & 0x0F, zp[:, 0])
    assert np.array_equal(packed[:, 0] >> 4, zp[:, 1])
    assert np.array_equal(packed[:, 1] & 0x0F, zp[:, 2])


def _shares_embedding(path: Path) -> bool:
    """The lookup (GatherBlockQuantized) and the lm_head (MatMulNBits) read one B tensor."""
    graph = onnx.load(str(path / "model.onnx")).graph
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    heads = [n for n in graph.node if n.op_type == "MatMulNBits" and "logits" in n.output]
    plain = [n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"]
    return (
        len(gathers) == 1
        and len(heads) == 1
        and not plain
        and gathers[0].input[0] == heads[0].input[1]
    )


def test_tied_embedding_is_stored_once_quantized(
    gguf_bundles: Any, fused_llama_folder_bundle: Path, tmp_path: Path
) -> None:
    from edge_slm_quantize.bundle import quantize_bundle

    _, _, transcoded = gguf_bundles
    assert _shares_embedding(transcoded)
    assert "shared with the lm_head" in read_bundle(transcoded).quantization.details["embedding"]
    plain = quantize_bundle(fused_llama_folder_bundle, tmp_path / "int4", "int4-rtn")
    sizes = {}
    for method in ("int4-rtn-shared", "int4-rtn-emb8"):
        out = quantize_bundle(fused_llama_folder_bundle, tmp_path / method, method)
        assert _shares_embedding(out), method
        sizes[method] = read_bundle(out).quantization.size_after_bytes or 0
        manifest = read_bundle(out)
        assert manifest.decoder is not None
        ids = np.asarray([PROMPT], dtype=np.int64)
        logits = open_decoder(out / "model.onnx", manifest.decoder).all_logits(ids)
        assert np.isfinite(logits).all()
    plain_size = read_bundle(plain).quantization.size_after_bytes or 0
    assert sizes["int4-rtn-shared"] < sizes["int4-rtn-emb8"] < plain_size


@pytest.fixture(scope="module")
def kquant_bundles(hf_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(fp32 fused bundle, gguf bundle, gguf-small bundle) of a Q4_K_M-like tiny Llama."""
    from tiny_gguf import KQUANT_EMBEDDING_TYPE, KQUANT_LAYER_TYPES, widen_llama, write_tiny_gguf

    from edge_slm_export.cli import main

    root = tmp_path_factory.mktemp("kquant")
    wide = widen_llama(hf_models["llama"], root / "wide")
    path = write_tiny_gguf(wide, root / "wide.gguf", KQUANT_LAYER_TYPES, KQUANT_EMBEDDING_TYPE)
    out = root / "fp32"
    args = [
        str(path),
        str(out),
        "--graph",
        "fused",
        "--quantize",
        "gguf",
        "--quantize",
        "gguf-small",
    ]
    assert main(args) == 0
    return out, out.with_name("fp32-gguf"), out.with_name("fp32-gguf-small")


def test_kquant_gguf_through_transformers_is_exact(kquant_bundles: Any, tmp_path: Path) -> None:
    """Export (transformers de-quantizes the K-quants) and transcoding agree exactly: the
    graph's fp32 weights are the carried blocks' values, greedy tokens are the fp32 graph's."""
    from edge_slm_quantize.bundle import quantize_bundle

    fp32, carried, small = kquant_bundles
    details = read_bundle(carried).quantization.details
    assert details["max_abs_weight_diff_vs_fp32_graph"] == 0.0
    assert details["gguf_tensor_types"] == {
        "Q2_K": 1,
        "Q3_K": 1,
        "Q4_K": 5,
        "Q5_0": 1,
        "Q5_1": 1,
        "Q5_K": 2,
        "Q6_K": 3,  # the tied embedding / lm_head is one of them
        "Q8_0": 1,
    }
    assert details["gguf_split_projections"] == 1  # layer 0's qkv: Q4_K | Q4_K | Q6_K
    assert "shared with the lm_head" in details["embedding"]  # Q6_K: 8-bit blocks of 16
    exact = quantize_bundle(fp32, tmp_path / "exact", "gguf", accuracy_level=1)
    manifest = read_bundle(fp32)
    assert manifest.decoder is not None
    reference = open_decoder(fp32 / "model.onnx", manifest.decoder)
    ours = open_decoder(exact / "model.onnx", manifest.decoder)
    ids = np.asarray([PROMPT], dtype=np.int64)
    want, got = reference.all_logits(ids), ours.all_logits(ids)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, float(np.abs(want).max()))
    for _ in range(8):  # greedy continuation, token for token
        nxt_want = int(np.argmax(reference.all_logits(ids)[0, -1]))
        assert int(np.argmax(ours.all_logits(ids)[0, -1])) == nxt_want
        ids = np.concatenate([ids, [[nxt_want]]], axis=1)
    small_details = read_bundle(small).quantization.details
    assert small_details["gguf_tensor_types"] == {"Q2_K": 1, "Q3_K": 1, "Q4_K": 5}
    assert sum(small_details["gguf_requantized"].values()) == 8  # Q5_*, Q6_K, Q8_0
    sizes = [read_bundle(b).quantization.size_after_bytes or 0 for b in (carried, small)]
    assert 0 < sizes[1] < sizes[0]
