"""One quantized copy of a tied embedding, read by both the lookup and the lm_head.

The fused graph (``export/fused.py``) stores a tied embedding once, transposed
(``E^T [hidden, vocab]``): the lm_head is ``MatMul(h, E^T)`` and the lookup
``Gather(E^T, ids, axis=1)`` + Transpose. Weight-only quantization turns the lm_head
into ``MatMulNBits`` whose ``B [vocab, hidden / block, block bytes]`` is the embedding
table itself, blocked along hidden, but the Gather still needs the fp32 table: the
file keeps both (SmolLM2-135M: 113 MB of fp32 table next to a 15 MB 4-bit copy).

:func:`share_tied_embedding` replaces the lookup by ``com.microsoft``
``GatherBlockQuantized`` over the very same ``B`` initializer (``gather_axis=0``,
``quantize_axis=2``: one row of blocks per token), then a Reshape to ``[batch, seq,
hidden]``; the fp32 table is dropped. Two small tensors cannot be shared as they are,
because the two kernels check different shapes (onnxruntime 1.31):

* scales: MatMulNBits wants ``[vocab * blocks]`` or ``[vocab, blocks]``,
  GatherBlockQuantized the rank of its data (``[vocab, blocks, 1]``): a Reshape node
  reads the lm_head's scales (one copy in the file);
* zero points: MatMulNBits packs two 4-bit zero points per byte across blocks,
  GatherBlockQuantized wants one per block here: a second, unpacked copy
  (``vocab * blocks`` bytes, 0.9 MB for SmolLM2). Symmetric blocks need none: both ops
  default to the middle code (8 for 4-bit, 128 for 8-bit; checked on onnxruntime 1.31).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_slm_quantize.graph_passes import remove_unused_initializers

_MS = "com.microsoft"


@dataclass(frozen=True)
class SharedEmbedding:
    """What :func:`share_tied_embedding` did."""

    table: str  # the fp32 initializer that was dropped
    blocks: str  # the MatMulNBits B initializer both nodes read
    bits: int
    block_size: int


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _unpacked_zero_points(zp: np.ndarray, vocab: int, blocks: int, bits: int) -> np.ndarray:
    """MatMulNBits zero points -> ``[vocab, blocks, 1]`` uint8, one per block."""
    if bits == 8:
        return zp.reshape(vocab, blocks, 1)
    packed = zp.reshape(vocab, -1)
    out = np.empty((vocab, packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2], out[:, 1::2] = packed & 0x0F, packed >> 4
    return np.ascontiguousarray(out[:, :blocks, None])


def _topological(nodes: list[onnx.NodeProto], given: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every input is produced first (stable otherwise).

    The lm_head's scales may be computed (a Cast from fp16) late in the graph, while
    the lookup that now reads them sits at its start.
    """
    produced = set(given) | {""}
    done: list[onnx.NodeProto] = []
    waiting = list(nodes)
    while waiting:  # passes in graph order; one or two suffice here
        left = []
        for node in waiting:
            if all(i in produced for i in node.input):
                done.append(node)
                produced.update(node.output)
            else:
                left.append(node)
        if len(left) == len(waiting):  # a cycle or an unknown input: keep the rest as is
            return done + left
        waiting = left
    return done


def share_tied_embedding(model: onnx.ModelProto, logits: str = "logits") -> SharedEmbedding | None:
    """Make the fused graph's embedding lookup read the lm_head's quantized blocks.

    Returns None (graph unchanged) unless the graph has the fused tied pattern
    (``Gather(E^T, ids, axis=1)`` -> ``Transpose``) and a MatMulNBits lm_head over the
    same table (``N = vocab``, ``K = hidden``).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    lm_head = next(
        (n for n in graph.node if n.op_type == "MatMulNBits" and logits in n.output), None
    )
    if lm_head is None:
        return None
    gather = next(
        (
            n
            for n in graph.node
            if n.op_type == "Gather"
            and n.input[0] in inits
            and _attrs(n).get("axis") == 1
            and len(inits[n.input[0]].dims) == 2
        ),
        None,
    )
    if gather is None:
        return None
    after = consumers.get(gather.output[0], [])
    if len(after) != 1 or after[0].op_type != "Transpose":
        return None
    transpose = after[0]
    table = gather.input[0]
    hidden, vocab = (int(d) for d in inits[table].dims)
    attrs = _attrs(lm_head)
    if attrs.get("N") != vocab or attrs.get("K") != hidden:
        return None
    bits, block = int(attrs["bits"]), int(attrs["block_size"])  # type: ignore[call-overload]
    blocks = -(-hidden // block)
    if hidden % block:
        return None  # a padded last block would leak into the looked-up rows
    b_name, s_name = lm_head.input[1], lm_head.input[2]
    zp_name = lm_head.input[3] if len(lm_head.input) > 3 and lm_head.input[3] else None
    prefix = f"{table}/shared"
    shape3 = numpy_helper.from_array(
        np.asarray([vocab, blocks, 1], dtype=np.int64), f"{prefix}/scales_shape"
    )
    out_shape = numpy_helper.from_array(
        np.asarray([0, 0, hidden], dtype=np.int64), f"{prefix}/out_shape"
    )
    new_inits = [shape3, out_shape]
    gbq_inputs = [b_name, gather.input[1], f"{prefix}/scales"]
    if zp_name is not None:
        zp = _unpacked_zero_points(numpy_helper.to_array(inits[zp_name]), vocab, blocks, bits)
        if np.any(zp != 1 << (bits - 1)):  # both ops default to 8 (4-bit) / 128 (8-bit)
            new_inits.append(numpy_helper.from_array(zp, f"{prefix}/zero_points"))
            gbq_inputs.append(f"{prefix}/zero_points")
    new_nodes = [
        helper.make_node(
            "Reshape", [s_name, shape3.name], [f"{prefix}/scales"], name=f"{prefix}/scales"
        ),
        helper.make_node(
            "GatherBlockQuantized",
            gbq_inputs,
            [f"{prefix}/rows"],  # [batch, seq, blocks, block]
            name=f"{prefix}/gather",
            domain=_MS,
            gather_axis=0,
            quantize_axis=2,
            block_size=block,
            bits=bits,
        ),
        helper.make_node(
            "Reshape",
            [f"{prefix}/rows", out_shape.name],
            [transpose.output[0]],
            name=f"{prefix}/rows_to_hidden",
        ),
    ]
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node is gather:
            nodes.extend(new_nodes)
        elif node is not transpose:
            nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(_topological(nodes, {i.name for i in graph.input} | set(inits)))
    graph.initializer.extend(new_inits)
    remove_unused_initializers(graph)
    if not any(op.domain == _MS for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS, 1))
    return SharedEmbedding(table=table, blocks=b_name, bits=bits, block_size=block)
