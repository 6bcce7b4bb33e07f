"""Append sentence-transformers pooling, L2 normalisation and a linear head to a graph.

Why in the graph and not in the runtime's NumPy: a bundle then has one output
contract (``sentence_embedding [batch, dim]`` or ``logits [batch, labels]``) whatever
the source's pooling was; the runtime has no per-model code path that could drift from
the exporter; the ``[batch, seq, hidden]`` token states never cross into Python; the
SetFit head (a MatMul + Add after pooling) can only live in a graph anyway, and the
quantizer sees the whole computation. The ops are plain ONNX (Cast, Unsqueeze, Mul,
ReduceSum, Div, Gather, ReduceL2, Max, MatMul, Add), available on every CPU build.

The math follows sentence-transformers exactly:
* mean: ``sum(h * mask) / max(sum(mask), 1e-9)`` over the sequence axis;
* cls: ``h[:, 0]``;
* normalize: ``x / max(||x||_2, 1e-12)`` (torch's ``F.normalize``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Pooling = Literal["mean", "cls"]


@dataclass(frozen=True)
class LinearHead:
    """A linear classifier over a pooled embedding: ``logits = x @ weight.T + bias``.

    Attributes:
        weight: ``[labels, dim]`` float matrix.
        bias: ``[labels]`` float vector.
        labels: class names, in row order.
    """

    weight: np.ndarray
    bias: np.ndarray
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        rows = len(self.labels)
        if self.weight.ndim != 2 or self.weight.shape[0] != rows or self.bias.shape != (rows,):
            raise ValueError(
                f"head shapes do not match {rows} labels: weight {self.weight.shape}, "
                f"bias {self.bias.shape}"
            )


EMBEDDING_OUTPUT = "sentence_embedding"
LOGITS_OUTPUT = "logits"


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def add_pooling(
    model: onnx.ModelProto,
    hidden: str,
    attention_mask: str,
    pooling: Pooling,
    normalize: bool,
    head: LinearHead | None = None,
) -> str:
    """Replace the graph's outputs by pooled (and optionally normalised, classified) ones.

    Args:
        model: an encoder graph with output ``hidden`` [batch, seq, dim] and input
            ``attention_mask`` [batch, seq] (int64).
        pooling: "mean" or "cls".
        normalize: L2-normalise the pooled vector.
        head: optional linear classifier applied after pooling/normalisation (a
            SetFit head).

    Returns:
        The name of the new single output: ``sentence_embedding`` or ``logits``.
    """
    graph = model.graph
    dim = next((o.type.tensor_type.shape.dim[2] for o in graph.output if o.name == hidden), None)
    if dim is None:
        raise ValueError(f"graph has no output {hidden!r}")
    nodes = []
    if pooling == "mean":
        axis1 = _const(graph, "pool/axis1", np.array([1], dtype=np.int64))
        axis2 = _const(graph, "pool/axis2", np.array([2], dtype=np.int64))
        eps = _const(graph, "pool/eps", np.array(1e-9, dtype=np.float32))
        nodes += [
            helper.make_node("Cast", [attention_mask], ["pool/mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["pool/mask_f", axis2], ["pool/mask3"]),  # [b, s, 1]
            helper.make_node("Mul", [hidden, "pool/mask3"], ["pool/masked"]),  # [b, s, d]
            helper.make_node("ReduceSum", ["pool/masked", axis1], ["pool/sum"], keepdims=0),
            helper.make_node("ReduceSum", ["pool/mask3", axis1], ["pool/count"], keepdims=0),
            helper.make_node("Max", ["pool/count", eps], ["pool/count_clamped"]),  # [b, 1]
            helper.make_node("Div", ["pool/sum", "pool/count_clamped"], ["pool/pooled"]),
        ]
    elif pooling == "cls":
        zero = _const(graph, "pool/zero", np.array(0, dtype=np.int64))
        nodes.append(helper.make_node("Gather", [hidden, zero], ["pool/pooled"], axis=1))
    else:
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    current = "pool/pooled"  # [b, d]
    if normalize:
        axis_last = _const(graph, "norm/axis", np.array([1], dtype=np.int64))
        tiny = _const(graph, "norm/eps", np.array(1e-12, dtype=np.float32))
        nodes += [
            helper.make_node("ReduceL2", [current, axis_last], ["norm/l2"], keepdims=1),
            helper.make_node("Max", ["norm/l2", tiny], ["norm/l2_clamped"]),
            helper.make_node("Div", [current, "norm/l2_clamped"], ["norm/normalized"]),
        ]
        current = "norm/normalized"
    output = EMBEDDING_OUTPUT
    out_dim: int | str = dim.dim_value if dim.HasField("dim_value") else dim.dim_param
    if head is not None:
        weight, bias = head.weight, head.bias
        w = _const(graph, "head/weight", np.ascontiguousarray(weight.T, dtype=np.float32))
        b = _const(graph, "head/bias", np.asarray(bias, dtype=np.float32))
        nodes += [
            helper.make_node("MatMul", [current, w], ["head/matmul"]),
            helper.make_node("Add", ["head/matmul", b], [LOGITS_OUTPUT]),
        ]
        output, out_dim = LOGITS_OUTPUT, int(weight.shape[0])
    else:
        nodes.append(helper.make_node("Identity", [current], [output]))
    graph.node.extend(nodes)
    batch = graph.output[0].type.tensor_type.shape.dim[0]
    batch_dim: int | str = batch.dim_value if batch.HasField("dim_value") else batch.dim_param
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch_dim, out_dim])
    )
    prune(graph)
    return output


def prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers no graph output depends on (e.g. a BERT pooler)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
