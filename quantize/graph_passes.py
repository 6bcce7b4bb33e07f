"""Graph passes that put a decoder's weights where the MatMulNBits quantizer finds them.

onnxruntime's weight-only quantizer replaces ``MatMul(x, W)`` when ``W`` is an
initializer, and nothing else. Two export patterns hide weights from it:

* GPT-2's Conv1D layers export as ``Gemm(x, W, b)``. :func:`rewrite_gemms` turns each
  one into ``MatMul(x, W)`` followed by ``Add(·, b)`` (``W`` transposed once, offline,
  when ``transB=1``).
* A tied lm_head exports as ``MatMul(h, Transpose(embedding))``. onnxruntime folds the
  transpose when it loads the graph, so the fp32 embedding ends up in memory twice, and
  the quantizer, which sees no initializer, leaves the lm_head in fp32.
  :func:`fold_weight_transposes` stores the transposed weight as an initializer of its
  own, which the quantizer then replaces with its 4/8-bit copy; the embedding lookup
  (``Gather``) keeps the original fp32 table.

The passes work on the top-level graph of an ``onnx.ModelProto`` in place; they change
no output beyond float rounding (MatMul + Add instead of one Gemm).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

_STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class GemmRewrite:
    """What :func:`rewrite_gemms` did: how many Gemms became MatMul(+Add), which stayed."""

    rewritten: int
    kept: tuple[
        str, ...
    ]  # names of Gemm nodes left alone (alpha/beta != 1, transA, non-constant B)


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph nested in its nodes' attributes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_graphs(sub)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name some node (in any subgraph) or a graph output reads."""
    used = {o.name for o in graph.output}
    for sub in _all_graphs(graph):
        used.update(o.name for o in sub.output)
        for node in sub.node:
            used.update(node.input)
    return used


def remove_unused_initializers(graph: onnx.GraphProto) -> int:
    """Drop initializers nothing reads; returns how many were dropped."""
    used = _used_names(graph)
    keep = [t for t in graph.initializer if t.name in used]
    dropped = len(graph.initializer) - len(keep)
    if dropped:
        graph.ClearField("initializer")
        graph.initializer.extend(keep)
    return dropped


class _Names:
    """Fresh tensor names that collide with nothing already in the graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.taken = {t.name for t in graph.initializer} | {i.name for i in graph.input}
        for node in graph.node:
            self.taken.update(node.output)

    def fresh(self, base: str) -> str:
        name, n = base, 0
        while name in self.taken:
            n += 1
            name = f"{base}_{n}"
        self.taken.add(name)
        return name


def _initializer_behind(
    name: str,
    producers: dict[str, onnx.NodeProto],
    initializers: dict[str, onnx.TensorProto],
) -> str | None:
    """The initializer ``name`` is, directly or through Identity nodes; None if it is not one.

    optimum's de-duplication of equal initializers leaves ``Identity`` nodes between a
    shared tensor and its users, so weights may sit one Identity away.
    """
    for _ in range(16):  # Identity chains are short; the bound guards against cycles
        if name in initializers:
            return name
        node = producers.get(name)
        if node is None or node.op_type != "Identity" or node.domain not in _STANDARD_DOMAINS:
            return None
        name = node.input[0]
    return None


def rewrite_gemms(model: onnx.ModelProto) -> GemmRewrite:
    """Rewrite ``Gemm(A, B, C)`` with a constant ``B`` as ``MatMul(A, B')`` + ``Add(·, C)``.

    Only Gemms with ``alpha == beta == 1`` and ``transA == 0`` are rewritten; ``B'`` is
    ``B`` or, for ``transB=1``, a new initializer holding ``B.T``. ``Add`` broadcasts
    ``C`` as Gemm does. A Gemm without ``C`` becomes a lone MatMul.

    Returns:
        How many Gemms were rewritten and the names of those kept.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    names = _Names(graph)
    nodes: list[onnx.NodeProto] = []
    kept: list[str] = []
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Gemm" or node.domain not in _STANDARD_DOMAINS:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = _initializer_behind(node.input[1], producers, initializers)
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if weight is None or not plain or attrs.get("transA", 0):
            kept.append(node.name)
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            transposed = numpy_helper.to_array(initializers[weight]).T  # [K, N]
            tensor = numpy_helper.from_array(
                np.ascontiguousarray(transposed), names.fresh(f"{weight}_transposed")
            )
            graph.initializer.append(tensor)
            initializers[tensor.name] = tensor
            weight = tensor.name
        has_bias = len(node.input) > 2 and node.input[2] != ""
        out = node.output[0]
        product = names.fresh(f"{out}_matmul") if has_bias else out
        nodes.append(
            helper.make_node(
                "MatMul", [node.input[0], weight], [product], name=f"{node.name}_MatMul"
            )
        )
        if has_bias:
            nodes.append(
                helper.make_node("Add", [product, node.input[2]], [out], name=f"{node.name}_Add")
            )
        rewritten += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    remove_unused_initializers(graph)
    return GemmRewrite(rewritten=rewritten, kept=tuple(kept))


def fold_weight_transposes(model: onnx.ModelProto) -> tuple[str, ...]:
    """Replace ``Transpose(initializer)`` feeding a MatMul's weight input by an initializer.

    The new initializer takes the Transpose's output name, so its readers are unchanged;
    the source initializer stays for its other readers (the embedding Gather of a tied
    lm_head).

    Returns:
        The names of the initializers whose transposes were folded (for the report).
    """
    graph = model.graph
    nodes = list(graph.node)
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in nodes for out in node.output}
    producer_index = {out: i for i, node in enumerate(nodes) for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    weight_inputs = {
        n.input[1] for n in nodes if n.op_type == "MatMul" and n.domain in _STANDARD_DOMAINS
    }
    folded: list[str] = []
    drop: set[int] = set()
    for name in sorted(weight_inputs):
        node = producers.get(name)
        if node is None or node.op_type != "Transpose" or node.domain not in _STANDARD_DOMAINS:
            continue
        if name in graph_outputs:
            continue
        source = _initializer_behind(node.input[0], producers, initializers)
        if source is None:
            continue
        perm = next(
            (list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None
        )
        array = np.transpose(numpy_helper.to_array(initializers[source]), perm)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        drop.add(producer_index[name])
        folded.append(source)
    if drop:
        graph.ClearField("node")
        graph.node.extend(n for i, n in enumerate(nodes) if i not in drop)
        remove_unused_initializers(graph)
    return tuple(folded)
