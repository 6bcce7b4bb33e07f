"""What carrying each GGUF type exactly costs: bytes per weight and MatMulNBits decode time,
against re-quantizing the same weights to our 4-bit searched blocks (method ``gguf-small``).

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_gguf_types.py [--rounds 5] [--layers 8]

For each carried type a GGUF file with ``--layers`` square 1024 x 1024 weights is written
(``gguf.quants.quantize`` for the legacy types, random blocks for the K-quants, which
gguf-py cannot quantize), transcoded exactly and, separately, re-quantized to 4-bit
symmetric searched blocks of 32 from the de-quantized weights. Each graph runs one
decode-shaped product per weight (``x [1, 1, 1024]``, accuracy level 4, 2 threads); the
rounds interleave types and variants; printed (Markdown): bits per weight of the graph
file, the median time per step and the median of the per-round ratios exact / small.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge_slm_quantize.gguf import SUPPORTED_TYPES, read_gguf, transcode_gguf
from edge_slm_quantize.weight_only import WeightOnlySettings

SIZE = 1024
K_LAYOUTS = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2))}
K_LAYOUTS |= {"Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def _raw(kind: str, rng: np.random.Generator) -> np.ndarray:
    import gguf

    if kind not in K_LAYOUTS:
        weights = rng.standard_normal((SIZE, SIZE)).astype(np.float32) * np.float32(0.02)
        return np.asarray(gguf.quants.quantize(weights, gguf.GGMLQuantizationType[kind]))
    size, halves = K_LAYOUTS[kind]
    blocks = rng.integers(0, 256, size=(SIZE * SIZE // 256, size), dtype=np.uint8)
    for offset in halves:
        half = (np.float32(10) ** rng.uniform(-4, -3, size=blocks.shape[0])).astype(np.float16)
        blocks[:, offset : offset + 2] = half[:, None].view(np.uint8)
    return blocks.reshape(SIZE, -1)


def build(kind: str, layers: int, work: Path) -> dict[str, onnx.ModelProto]:
    """(exact, small) graphs of ``layers`` products over ``kind`` weights."""
    import gguf

    rng = np.random.default_rng(0)
    path = work / f"{kind}.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_head_count(8)
    weights = {}
    for i in range(layers):
        raw = _raw(kind, rng)
        writer.add_tensor(
            f"blk.{i}.ffn_down.weight", raw, raw_dtype=gguf.GGMLQuantizationType[kind]
        )
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
        weights[f"layers.{i}.down_proj.weight"] = np.ascontiguousarray(values.T, np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = read_gguf(path)
    settings = WeightOnlySettings(bits=4, accuracy_level=4)
    small = WeightOnlySettings(bits=4, block_size=32, symmetric=True)
    graphs = {}
    for variant, requantize in (("exact", None), ("small", small)):
        nodes = [
            helper.make_node("MatMul", ["x", name], [f"y{i}"], name=f"m{i}")
            for i, name in enumerate(weights)
        ]
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, SIZE])],
            [
                helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None)
                for i in range(layers)
            ],
            [numpy_helper.from_array(w, n) for n, w in weights.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
        graphs[variant] = transcode_gguf(model, source, settings, requantize=requantize).model
    return graphs


def step_seconds(session: ort.InferenceSession, steps: int = 50) -> float:
    x = np.random.default_rng(1).standard_normal((1, 1, SIZE)).astype(np.float32)
    session.run(None, {"x": x})
    start = time.perf_counter()
    for _ in range(steps):
        session.run(None, {"x": x})
    return (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    sessions, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in SUPPORTED_TYPES:
            for variant, model in build(kind, args.layers, Path(tmp)).items():
                path = Path(tmp) / f"{kind}-{variant}.onnx"
                onnx.save(model, str(path))
                sizes[(kind, variant)] = path.stat().st_size * 8 / (args.layers * SIZE * SIZE)
                options = ort.SessionOptions()
                options.intra_op_num_threads = 2
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                sessions[(kind, variant)] = ort.InferenceSession(
                    str(path), options, providers=["CPUExecutionProvider"]
                )
    times: dict[tuple[str, str], list[float]] = {key: [] for key in sessions}
    for _ in range(args.rounds):
        for kind in SUPPORTED_TYPES:  # a type's two variants back to back
            for variant in ("exact", "small"):
                times[(kind, variant)].append(step_seconds(sessions[(kind, variant)]))
    print(
        "| type | exact: bits/weight | exact: ms/step | small: bits/weight | small: ms/step | exact/small time |"
    )
    print("|---|---|---|---|---|---|")
    for kind in SUPPORTED_TYPES:
        exact, small = (statistics.median(times[(kind, v)]) * 1e3 for v in ("exact", "small"))
        print(
            f"| {kind} | {sizes[(kind, 'exact')]:.2f} | {exact:.2f} | "
            f"{sizes[(kind, 'small')]:.2f} | {small:.2f} | {exact / small:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
