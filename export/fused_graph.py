"""The fused decoder graph's common parts: node/initializer collection, I/O, saving.

One graph per model family, written with ``onnx.helper`` from torch weights by the
family's module in :mod:`edge_slm_export.architectures` (``llama.py``, ``qwen2.py``,
``gpt2.py``); this module holds what they share and imports none of them. The runtime's
loop over such a graph is ``edge_slm/generation/fused_step.py``.

Every family's graph has the same contract (layout ``gqa-shared``):

* inputs: ``input_ids [batch, seq]`` int64, ``seqlens_k [batch]`` int32 (total length
  - 1, as ``com.microsoft`` ``GroupQueryAttention`` wants), ``total_sequence_length``
  int32 scalar, ``logits_positions [n]`` int64, ``past_key_values.{i}.key/value``
  ``[batch, kv_heads, capacity, head_dim]``;
* outputs: ``logits [batch, n, vocab]`` and ``present.{i}.key/value``. Past and present
  may be the same buffer (bound twice through IOBinding): GroupQueryAttention then
  writes the new positions in place;
* ``Gather(hidden, logits_positions, axis=1)`` before the lm_head: decoding asks for
  the last position only, scoring (perplexity, validation) for every position;
* a tied embedding is stored once, transposed (``[hidden, vocab]``): the lm_head is
  ``MatMul(h, E^T)`` and the lookup ``Gather(E^T, ids, axis=1)`` then a Transpose.

The building blocks the rotary families share are here too: :func:`linear`,
:func:`rms_norm_heads` (Qwen3's and Gemma 3's per-head q/k norms) and
:func:`rotary_attention` (``GroupQueryAttention`` with rotary inside and an optional
sliding window, described by an :class:`AttentionSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_slm.bundle import DecoderIO
from edge_slm_export.graph_io import save_graph

LAYOUT = "gqa-shared"
OPSET = 17
MS = "com.microsoft"


@dataclass(frozen=True)
class FusedGraph:
    """What a family's ``build_fused_graph`` wrote."""

    path: Path
    io: DecoderIO
    nodes: int


def as_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor as a contiguous float32 numpy array."""
    return np.ascontiguousarray(tensor.detach().float().cpu().numpy())


class GraphBuilder:
    """Nodes and initializers collected in order, with unique node names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(
        self,
        op: str,
        inputs: list[str],
        outputs: list[str],
        name: str,
        domain: str = "",
        **attrs: Any,
    ) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


def embedding_lookup(
    g: GraphBuilder, embedding: Any, lm_head_weight: Any, name: str, out: str
) -> str:
    """Token embeddings ``out [B, S, H]`` of ``input_ids``; returns the lm_head's B.

    A tied embedding is stored once, transposed (``{name}.T``, ``[H, V]``): it is the
    lm_head MatMul's B and the lookup is ``Gather(axis=1)`` + Transpose, the pattern
    ``quantize/shared_embedding.py`` shares with a quantized lm_head.
    """
    table = as_numpy(embedding)  # [V, H]
    if lm_head_weight.data_ptr() == embedding.data_ptr():
        t = g.weight(f"{name}.T", np.ascontiguousarray(table.T))
        g.node("Gather", [t, "input_ids"], [f"{out}_hbs"], "embed", axis=1)  # [H, B, S]
        g.node("Transpose", [f"{out}_hbs"], [out], "embed_t", perm=[1, 2, 0])  # [B, S, H]
        return t
    g.node("Gather", [g.weight(name, table), "input_ids"], [out], "embed", axis=0)
    return g.weight("lm_head.weight.T", np.ascontiguousarray(as_numpy(lm_head_weight).T))


def linear(
    g: GraphBuilder, name: str, x: str, weight: np.ndarray, bias: np.ndarray | None = None
) -> str:
    """``x @ weight (+ bias)``; ``weight`` is ``[in, out]`` (a torch Linear's weight transposed)."""
    (out,) = g.node("MatMul", [x, g.weight(f"{name}.weight", np.ascontiguousarray(weight))],
                    [f"{name}.out"], name)  # fmt: skip
    if bias is not None:
        (out,) = g.node("Add", [out, g.weight(f"{name}.bias", bias)], [f"{name}.out_b"],
                        f"{name}.bias")  # fmt: skip
    return out


def packed_qkv(attn: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """An attention module's ``q_proj``, ``k_proj`` and ``v_proj`` as one ``[hidden, q + 2 kv]``
    weight, and their biases as one vector (None without biases)."""
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = np.concatenate([as_numpy(m.weight).T for m in parts], axis=1)
    if attn.q_proj.bias is None:
        return weight, None
    return weight, np.concatenate([as_numpy(m.bias) for m in parts])


def output_projection(g: GraphBuilder, p: str, attn: Any, context: str) -> str:
    """The attention module's ``o_proj`` (and its bias, if any) applied to ``context``."""
    bias = None if getattr(attn.o_proj, "bias", None) is None else as_numpy(attn.o_proj.bias)
    return linear(g, f"{p}.o_proj", context, as_numpy(attn.o_proj.weight).T, bias)


def rms_norm_heads(
    g: GraphBuilder, name: str, x: str, weight: np.ndarray, heads: int, head_dim: int, eps: float
) -> str:
    """RMS norm over each head's ``head_dim`` slice of ``x [B, S, heads * head_dim]``."""
    split = g.weight(f"{name}.heads_shape", np.asarray([0, 0, heads, head_dim], dtype=np.int64))
    joined = g.weight(f"{name}.joined_shape", np.asarray([0, 0, heads * head_dim], dtype=np.int64))
    (per_head,) = g.node("Reshape", [x, split], [f"{name}.heads"], f"{name}.split_heads")
    (normed,) = g.node(
        "SimplifiedLayerNormalization", [per_head, g.weight(f"{name}.weight", weight)],
        [f"{name}.normed"], name, axis=-1, epsilon=eps,
    )  # fmt: skip
    (out,) = g.node("Reshape", [normed, joined], [f"{name}.out"], f"{name}.join_heads")
    return out


def local_window_size(sliding_window: int | None) -> int:
    """GroupQueryAttention's ``local_window_size`` for transformers' ``sliding_window``.

    transformers lets a query at position q see keys ``q - sliding_window < k <= q``
    (``masking_utils.sliding_window_overlay``): ``sliding_window`` keys, its own included.
    onnxruntime 1.31's CPU kernel keeps the same ``local_window_size`` keys (measured:
    prompts longer than the window match transformers to 1e-5 with the same number and
    differ with one more or one less), so the value passes through; -1 is no window.
    """
    return -1 if sliding_window is None else int(sliding_window)


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's ``GroupQueryAttention``: heads, scale, window, rotary caches."""

    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    window: int = -1  # local_window_size (see local_window_size()); -1 = global
    cos_cache: str = "cos_cache"
    sin_cache: str = "sin_cache"


def rotary_attention(
    g: GraphBuilder,
    p: str,
    i: int,
    spec: AttentionSpec,
    qkv: str,
    qk_norms: tuple[np.ndarray, np.ndarray, float] | None = None,
) -> str:
    """GroupQueryAttention with rotary inside over the packed ``qkv`` projection.

    ``qkv`` is ``[B, S, (heads + 2 kv_heads) * head_dim]`` (q | k | v). With ``qk_norms``
    (q weight, k weight, epsilon) q and k are split off and RMS-normed per head first
    (Qwen3, Gemma 3: the norm comes before the rotary embedding, as there).

    Returns:
        The attention context ``[B, S, heads * head_dim]`` (before the output projection).
    """
    inputs = [qkv, "", ""]
    if qk_norms is not None:
        q_dim, kv_dim = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        sizes = g.weight(f"{p}.qkv_sizes", np.asarray([q_dim, kv_dim, kv_dim], dtype=np.int64))
        q, k, v = g.node("Split", [qkv, sizes], [f"{p}.q", f"{p}.k", f"{p}.v"], f"{p}.qkv_split",
                         axis=-1)  # fmt: skip
        q_w, k_w, eps = qk_norms
        q = rms_norm_heads(g, f"{p}.q_norm", q, q_w, spec.heads, spec.head_dim, eps)
        k = rms_norm_heads(g, f"{p}.k_norm", k, k_w, spec.kv_heads, spec.head_dim, eps)
        inputs = [q, k, v]
    (context, _, _) = g.node(
        "GroupQueryAttention",
        [*inputs, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
         "total_sequence_length", spec.cos_cache, spec.sin_cache],
        [f"{p}.attn", f"present.{i}.key", f"present.{i}.value"], f"{p}.gqa", domain=MS,
        num_heads=spec.heads, kv_num_heads=spec.kv_heads, scale=float(spec.scale), do_rotary=1,
        rotary_interleaved=0, local_window_size=int(spec.window),
    )  # fmt: skip
    return context


def fused_decoder_io(config: Any, max_length: int) -> DecoderIO:
    """The manifest's decoder section for a graph from a family's ``build_fused_graph``."""
    heads = config.num_attention_heads
    return DecoderIO(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        position_ids=None,
        layout=LAYOUT,
        max_length=max_length,
        seqlens_k="seqlens_k",
        total_sequence_length="total_sequence_length",
        logits_positions="logits_positions",
    )


def write_fused_graph(g: GraphBuilder, io: DecoderIO, vocab: int, out_path: Path) -> FusedGraph:
    """Declare the fused graph's inputs and outputs (module docstring) and save it."""
    kv_heads, head_dim = io.num_kv_heads, io.head_dim
    kv_shape: list[Any] = ["batch", kv_heads, "capacity", head_dim]
    present_shape: list[Any] = ["batch", kv_heads, "present_capacity", head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_positions", TensorProto.INT64, ["positions"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "positions", vocab])
    ]
    for i in range(io.num_layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_shape
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", TensorProto.FLOAT, present_shape
                )
            )
    graph = helper.make_graph(g.nodes, "edge_slm_fused_decoder", inputs, outputs, g.initializers)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
        producer_name="edge-slm",
    )
    proto.ir_version = 8
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_graph(proto, out_path)
    return FusedGraph(path=out_path, io=io, nodes=len(g.nodes))
