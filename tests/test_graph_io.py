"""export/graph_io.save_graph: the graph in model.onnx, its weights in model.onnx.data."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge_slm_export.graph_io import EXTERNAL_THRESHOLD, save_graph


def _matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    big = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    small = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")
    assert len(small.raw_data) < EXTERNAL_THRESHOLD <= len(big.raw_data)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [big, small],
    )
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_go_beside_the_graph_and_the_model_is_left_as_it_was(tmp_path: Path) -> None:
    model = _matmul_model()
    before = model.SerializeToString()
    path = tmp_path / "model.onnx"
    save_graph(model, path)
    save_graph(model, path)  # again over the same files: the data file is rewritten, not appended
    assert model.SerializeToString() == before
    data = tmp_path / "model.onnx.data"
    assert data.stat().st_size == 64 * 64 * 4  # the large table only
    stored = onnx.load(str(path), load_external_data=False)
    where = {t.name: t.data_location for t in stored.graph.initializer}
    assert where == {"w": TensorProto.EXTERNAL, "b": TensorProto.DEFAULT}
    x = np.ones((1, 64), np.float32)
    w = numpy_helper.to_array(model.graph.initializer[0])
    b = numpy_helper.to_array(model.graph.initializer[1])
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-5, atol=1e-5)


def test_the_data_file_gets_the_graph_files_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        save_graph(_matmul_model(), tmp_path / "model.onnx")
    finally:
        os.umask(old)
    modes = {stat.S_IMODE((tmp_path / name).stat().st_mode) for name in os.listdir(tmp_path)}
    assert modes == {0o644}  # onnx alone writes the data file owner-only (0600)
