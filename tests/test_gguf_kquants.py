"""Every carried GGUF type is exact: the weights MatMulNBits computes with equal
``gguf.quants.dequantize`` bit for bit (quantize/gguf_types.py, quantize/gguf.py).

Each test writes a GGUF file with the ``gguf`` package's writer: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0
tensors quantized by ``gguf.quants.quantize`` from random weights; the K-quants, which
gguf-py can de-quantize but not quantize, as random block bytes with valid fp16 scales
(log-uniform over four decades and both signs, so super-block scale and minimum often
differ by many binary orders: the blocks where the centred offset would round fall back
to zero point 0). A float graph of fused-style MatMuls over the de-quantized weights is
transcoded, and an identity matrix fed through onnxruntime (fp32 compute, accuracy
level 1) returns every weight: it must equal gguf's de-quantization exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_gguf import K_LAYOUTS, random_blocks

from edge_slm_quantize.weight_only import WeightOnlySettings

K = 256  # a multiple of the K-quants' super-block
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
CARRIED = QUANTIZABLE + tuple(K_LAYOUTS)
# fused-graph weight -> GGUF tensors (a non-permuting architecture)
LAYOUT = {
    "layers.0.qkv_proj.weight": (
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.0.attn_v.weight",
    ),
    "layers.0.o_proj.weight": ("blk.0.attn_output.weight",),
    "layers.0.gate_up_proj.weight": ("blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"),
    "layers.0.down_proj.weight": ("blk.0.ffn_down.weight",),
    "lm_head.weight.T": ("output.weight",),
}


def random_tensor(kind: str, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF bytes ``[rows, bytes per row]`` of a ``kind`` tensor with K inputs."""
    import gguf

    if kind in QUANTIZABLE:
        weights = rng.standard_normal((rows, K)).astype(np.float32)
        weights *= np.float32(10) ** rng.uniform(-3, 0, size=(rows, 1)).astype(np.float32)
        return np.asarray(gguf.quants.quantize(weights, gguf.GGMLQuantizationType[kind]))
    return random_blocks(kind, rows, K, rng)


def dequantized(kind: str, raw: np.ndarray) -> np.ndarray:
    import gguf

    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]), np.float32)


def write_gguf(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> Path:
    """A GGUF file (architecture qwen2: no Q/K row permutation) holding ``tensors``."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    for name, (kind, raw) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def float_graph(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``y_w = x @ W`` for every fused weight ``W [K, N]`` (an output per weight; x is
    ``[1, m, K]`` like the fused graph's hidden states)."""
    nodes, outputs = [], []
    for i, name in enumerate(weights):
        nodes.append(helper.make_node("MatMul", ["x", name], [f"y{i}"], name=f"matmul{i}"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "fused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "m", K])],
        outputs,
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def transcode(
    tmp_path: Path, types: dict[str, str], rows: int = 48, seed: int = 0, **options: object
) -> tuple[onnx.ModelProto, dict[str, np.ndarray], object]:
    """Write a GGUF with ``types`` (GGUF tensor -> type), transcode the float graph over
    its de-quantized weights; returns (graph, fused weight -> GGUF value [K, N], result)."""
    from edge_slm_quantize.gguf import read_gguf, transcode_gguf

    rng = np.random.default_rng(seed)
    tensors = {name: (kind, random_tensor(kind, rows, rng)) for name, kind in types.items()}
    path = write_gguf(tmp_path / "t.gguf", tensors)
    weights = {}
    for fused, names in LAYOUT.items():
        if all(n in tensors for n in names):
            weights[fused] = np.concatenate([dequantized(*tensors[n]) for n in names]).T.copy()
    model = float_graph(weights)
    settings = WeightOnlySettings(bits=4, accuracy_level=1)
    result = transcode_gguf(model, read_gguf(path), settings, **options)  # type: ignore[arg-type]
    return result.model, weights, result


def graph_weights(model: onnx.ModelProto, count: int) -> list[np.ndarray]:
    """The weight ``[K, N]`` each output computes with: an identity matrix fed through."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    eye = np.eye(K, dtype=np.float32)[None]
    return [y[0] for y in session.run([f"y{i}" for i in range(count)], {"x": eye})]


@pytest.mark.parametrize("kind", CARRIED)
def test_each_type_is_bit_exact(kind: str, tmp_path: Path) -> None:
    types = {name: kind for names in LAYOUT.values() for name in names}
    model, weights, result = transcode(tmp_path, types)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMul" not in ops or result.min_terms > 0  # only offset terms stay float MatMuls
    assert result.gguf_types == {kind: len(types)}  # type: ignore[attr-defined]
    for got, want in zip(graph_weights(model, len(weights)), weights.values(), strict=True):
        assert np.array_equal(got, want), kind
    # a random product agrees too (fp32 sums in another order: close, not equal)
    x = np.random.default_rng(1).standard_normal((1, 3, K)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, w in zip(session.run(None, {"x": x}), weights.values(), strict=True):
        want = x[0] @ w
        assert np.allclose(got[0], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_offsets_fall_back_to_zero_point_zero_where_centring_would_round(tmp_path: Path) -> None:
    """Q4_K with scales and minimums orders of magnitude apart: both zero points occur."""
    model, weights, _ = transcode(tmp_path, {"blk.0.attn_output.weight": "Q4_K"}, rows=256)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    (zp,) = [v for name, v in inits.items() if name.endswith("_zp")]
    nibbles = np.concatenate([zp & 0x0F, zp >> 4])
    assert {0, 8} <= set(nibbles.tolist())
    (got,) = graph_weights(model, 1)
    assert np.array_equal(got, weights["layers.0.o_proj.weight"])


def test_q4_k_m_mixture_in_fused_projections(tmp_path: Path) -> None:
    """A Q4_K_M-like mixture: containers differ inside qkv (split + Concat), a shared
    container inside gate_up (one node), a Q6_K lm_head."""
    types = {
        "blk.0.attn_q.weight": "Q4_K",
        "blk.0.attn_k.weight": "Q4_K",
        "blk.0.attn_v.weight": "Q6_K",
        "blk.0.attn_output.weight": "Q4_K",
        "blk.0.ffn_gate.weight": "Q5_0",
        "blk.0.ffn_up.weight": "Q8_0",
        "blk.0.ffn_down.weight": "Q3_K",
        "output.weight": "Q6_K",
    }
    model, weights, result = transcode(tmp_path, types, rows=64)
    assert result.split_projections == 1  # type: ignore[attr-defined]
    assert sum(n.op_type == "Concat" for n in model.graph.node) == 1
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 6
    for got, want in zip(graph_weights(model, len(weights)), weights.values(), strict=True):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("kind", ["Q6_K", "Q4_K", "Q2_K"])
def test_scales_and_offsets_are_stored_as_their_factors(kind: str, tmp_path: Path) -> None:
    """K-quant scales ``d * sc`` (and offsets ``z d sc - dmin m``) round as fp16: the file
    holds d, dmin (fp16) and sc, m (int8), multiplied when the session loads them."""
    rows = 64
    model, weights, _ = transcode(tmp_path, {"blk.0.attn_output.weight": kind}, rows=rows)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits["layers.0.o_proj.weight_scales_inner_int8"].dtype == np.int8
    assert inits["layers.0.o_proj.weight_scales_outer_fp16"].dtype == np.float16
    if kind != "Q6_K":
        assert inits["layers.0.o_proj.weight_block_mins_inner_int8"].dtype == np.int8
    # nothing per block is stored in 4 bytes
    assert not any(v.dtype == np.float32 and v.size >= rows * K // 32 for v in inits.values())
    (got,) = graph_weights(model, 1)
    assert np.array_equal(got, weights["layers.0.o_proj.weight"])


@pytest.mark.parametrize("kind", ["IQ4_NL", "TQ2_0"])
def test_unreadable_types_are_refused_naming_tensor_and_type(kind: str, tmp_path: Path) -> None:
    import gguf

    from edge_slm_quantize.gguf import UnsupportedGGUFTypeError, read_gguf, transcode_gguf

    kind_id = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((32, K)).astype(np.float32)
    if kind == "IQ4_NL":  # gguf-py cannot quantize IQ types: valid random blocks
        raw = rng.integers(0, 256, size=(32, K // 32 * 18), dtype=np.uint8)
        raw.reshape(-1, 18)[:, 0:2] = np.float16(0.01)[None].view(np.uint8)
    else:
        raw = np.asarray(gguf.quants.quantize(weights, kind_id))
    path = write_gguf(tmp_path / "iq.gguf", {"blk.0.attn_output.weight": (kind, raw)})
    model = float_graph({"layers.0.o_proj.weight": dequantized(kind, raw).T.copy()})
    settings = WeightOnlySettings(bits=4, accuracy_level=1)
    pattern = rf"'blk\.0\.attn_output\.weight' is stored as {kind}.*gguf-small"
    with pytest.raises(UnsupportedGGUFTypeError, match=pattern):
        transcode_gguf(model, read_gguf(path), settings)
    # asked for explicitly: re-quantized to 4-bit searched blocks, and reported
    requant = WeightOnlySettings(bits=4, block_size=32, symmetric=True)
    result = transcode_gguf(model, read_gguf(path), settings, requantize=requant)
    assert result.requantized == {"blk.0.attn_output.weight": f"{kind} -> searched-sym 4-bit"}
    assert result.details()["gguf_requantized"] == {f"{kind} -> searched-sym 4-bit": 1}


def test_smaller_variant_keeps_4bit_types_and_requantizes_wider_ones(tmp_path: Path) -> None:
    types = {
        "blk.0.attn_output.weight": "Q4_K",
        "blk.0.ffn_down.weight": "Q6_K",
        "blk.0.ffn_gate.weight": "Q5_0",
        "blk.0.ffn_up.weight": "Q4_0",
    }
    requant = WeightOnlySettings(bits=4, block_size=32, symmetric=True)
    model, weights, result = transcode(tmp_path, types, rows=64, requantize=requant)
    assert result.gguf_types == {"Q4_K": 1, "Q4_0": 1}  # type: ignore[attr-defined]
    assert set(result.requantized) == {"blk.0.ffn_down.weight", "blk.0.ffn_gate.weight"}  # type: ignore[attr-defined]
    assert {n.op_type for n in model.graph.node if n.op_type == "MatMulNBits"}
    bits = {
        helper.get_attribute_value(a)
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "bits"
    }
    assert bits == {4}
    got = dict(zip(weights, graph_weights(model, len(weights)), strict=True))
    assert np.array_equal(got["layers.0.o_proj.weight"], weights["layers.0.o_proj.weight"])
    gate_up = weights["layers.0.gate_up_proj.weight"]
    assert np.array_equal(got["layers.0.gate_up_proj.weight"][:, 64:], gate_up[:, 64:])  # Q4_0
    error = np.abs(got["layers.0.down_proj.weight"] - weights["layers.0.down_proj.weight"])
    assert 0 < error.max() < 0.2 * np.abs(weights["layers.0.down_proj.weight"]).max()
