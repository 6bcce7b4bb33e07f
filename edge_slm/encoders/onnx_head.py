"""Append a linear head (MatMul + Add) to an ONNX embedder graph, without the onnx package.

An ONNX file is one serialized protobuf ``ModelProto``. Protobuf defines that two
serialized messages written one after the other parse as one message in which the
second's singular sub-messages are merged into the first's and its repeated fields are
appended. So the bytes of a tiny ``ModelProto`` whose ``graph`` holds only two nodes,
two initializers and one output, written after the embedder's bytes, give a model whose
graph is the embedder's plus the head: ``logits = embedding @ weight + bias``. The
embedder's own bytes are left untouched (external-data files keep working), and the
device needs only numpy and onnxruntime, which loads and checks the result.

Only the few ONNX fields written here are encoded (field numbers from onnx.proto):

* ModelProto.graph = 7
* GraphProto: node = 1, initializer = 5, output = 12
* NodeProto: input = 1, output = 2, name = 3, op_type = 4
* TensorProto: dims = 1, data_type = 2, name = 8, raw_data = 9 (FLOAT = 1)
* ValueInfoProto: name = 1, type = 2; TypeProto.tensor_type = 1;
  TypeProto.Tensor: elem_type = 1, shape = 2; TensorShapeProto.dim = 1;
  Dimension.dim_value = 1 (a dimension with no field set is unknown)
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

HEAD_WEIGHT = "edge_slm_head.weight"
HEAD_BIAS = "edge_slm_head.bias"
HEAD_MATMUL = "edge_slm_head.matmul"
_FLOAT = 1  # TensorProto.DataType.FLOAT
_VARINT, _BYTES = 0, 2  # protobuf wire types


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(value)


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(value)) + value


def _str(field: int, value: str) -> bytes:
    return _bytes(field, value.encode("utf-8"))


def _tensor(name: str, array: npt.NDArray[np.float32]) -> bytes:
    dims = b"".join(_int(1, d) for d in array.shape)
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return dims + _int(2, _FLOAT) + _str(8, name) + _bytes(9, data)


def _node(op_type: str, inputs: list[str], output: str) -> bytes:
    body = b"".join(_str(1, name) for name in inputs)
    return body + _str(2, output) + _str(3, output) + _str(4, op_type)


def _float_output(name: str, width: int) -> bytes:
    """ValueInfoProto of a float tensor ``[unknown batch, width]``."""
    shape = _bytes(1, b"") + _bytes(1, _int(1, width))
    tensor_type = _int(1, _FLOAT) + _bytes(2, shape)
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


def head_patch(
    embedding: str, weight: npt.NDArray[np.float32], bias: npt.NDArray[np.float32], output: str
) -> bytes:
    """The ModelProto bytes that, appended to an embedder's, add the head.

    Args:
        embedding: name of the embedder graph's ``[batch, dim]`` output.
        weight: ``[labels, dim]`` (stored transposed, as MatMul wants ``[dim, labels]``).
        bias: ``[labels]``.
        output: name of the new ``[batch, labels]`` graph output.
    """
    labels = weight.shape[0]
    graph = (
        _bytes(1, _node("MatMul", [embedding, HEAD_WEIGHT], HEAD_MATMUL))
        + _bytes(1, _node("Add", [HEAD_MATMUL, HEAD_BIAS], output))
        + _bytes(5, _tensor(HEAD_WEIGHT, np.asarray(weight, np.float32).T))
        + _bytes(5, _tensor(HEAD_BIAS, np.asarray(bias, np.float32)))
        + _bytes(12, _float_output(output, labels))
    )
    return _bytes(7, graph)
