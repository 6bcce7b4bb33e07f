"""A fused decoder graph for Llama and Qwen2 (GPT-2: ``fused_gpt2.py``), written with ``onnx.helper`` from torch weights.

optimum's export spells attention, rotary embedding and RMS norm out in ~100 small ONNX
ops per layer (about 3,150 kernel nodes per step for SmolLM2-135M, half the time in
shape ops). This builder writes one graph of about 12 nodes per layer instead, using
onnxruntime's contrib ops (shipped in the standard CPU wheels):

* ``SimplifiedLayerNormalization`` (first RMS norm) and ``com.microsoft``
  ``SkipSimplifiedLayerNormalization`` (residual add + RMS norm in one kernel; its
  fourth output is the residual sum);
* one MatMul for q, k and v together (``[hidden, (heads + 2 kv_heads) * head_dim]``,
  plus one Add when the model has q/k/v biases, as Qwen2 does);
* ``com.microsoft`` ``GroupQueryAttention`` on the packed QKV with ``do_rotary=1``: the
  rotary embedding happens inside, from cos/sin caches stored as initializers
  (``[max_length, head_dim / 2]``, computed by the model's own rotary module, so
  rope_theta and Llama-3 style rope_scaling come out exactly as transformers has them;
  HF's half-split ``rotate_half`` layout is ``rotary_interleaved=0``). Its past and
  present KV tensors may be the same buffer (``[batch, kv_heads, capacity, head_dim]``,
  bound twice through IOBinding): the kernel then writes the new positions in place;
* one MatMul for gate and up together, then ``x * sigmoid(x) * up`` (onnxruntime fuses
  ``x * sigmoid(x)`` into one kernel at load);
* the final norm, then ``Gather(hidden, logits_positions, axis=1)`` before the lm_head:
  decoding asks for the last position only (one row of the vocab-sized product instead
  of one per prompt token), scoring (perplexity, validation) asks for every position.
  One graph serves both; the Gather costs one tiny node.

Tied embeddings are stored once, transposed (``[hidden, vocab]``): the lm_head is
``MatMul(h, E^T)`` and the lookup is ``Gather(E^T, ids, axis=1)`` then a Transpose.

Graph inputs: ``input_ids [batch, seq]`` int64, ``seqlens_k [batch]`` int32 (total
length - 1, as GroupQueryAttention wants), ``total_sequence_length`` int32 scalar,
``logits_positions [n]`` int64, ``past_key_values.{i}.key/value``. Outputs: ``logits
[batch, n, vocab]`` and ``present.{i}.key/value``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_slm.bundle import DecoderIO
from edge_slm_export.errors import UnsupportedModelError
from edge_slm_export.graph_io import save_graph

FUSED_FAMILIES = ("llama", "qwen2", "gpt2")  # gpt2: export/fused_gpt2.py
LAYOUT = "gqa-shared"
OPSET = 17
_MS = "com.microsoft"
# rope types whose cos/sin depend only on the position (not on the sequence length)
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class FusedGraph:
    """What :func:`build_fused_decoder` wrote."""

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


def _rotary_caches(model: Any, max_length: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[max_length, head_dim / 2]`` from the model's own rotary module."""
    import torch

    config = model.config
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _STATIC_ROPE:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported by the fused graph; supported: "
            f"{list(_STATIC_ROPE)} (use --graph optimum)"
        )
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(
            "partial rotary embeddings are not supported by the fused graph"
        )
    rotary = model.model.rotary_emb
    positions = torch.arange(max_length, dtype=torch.int64)[None]  # [1, L]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)  # [1, L, head_dim], half-split layout
    cos_np, sin_np = as_numpy(cos[0]), as_numpy(sin[0])
    half = head_dim // 2
    if cos_np.shape[-1] != head_dim or not (
        np.array_equal(cos_np[:, :half], cos_np[:, half:])
        and np.array_equal(sin_np[:, :half], sin_np[:, half:])
    ):
        raise UnsupportedModelError("the rotary embedding is not in the rotate_half layout")
    return np.ascontiguousarray(cos_np[:, :half]), np.ascontiguousarray(sin_np[:, :half])


def fused_decoder_io(config: Any, max_length: int) -> DecoderIO:
    """The manifest's decoder section for a graph from :func:`build_fused_decoder`."""
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


def _check_supported(config: Any) -> None:
    if config.model_type not in FUSED_FAMILIES or config.model_type == "gpt2":
        raise UnsupportedModelError(
            f"the fused graph supports {list(FUSED_FAMILIES)}, not {config.model_type!r} "
            "(use --graph optimum)"
        )
    if getattr(config, "use_sliding_window", False):
        raise UnsupportedModelError("sliding-window attention is not supported by the fused graph")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(
            f"activation {config.hidden_act!r} is not supported (silu only)"
        )


def build_fused_decoder(model: Any, out_path: Path, max_length: int | None = None) -> FusedGraph:
    """Write the fused ONNX graph of a Llama or Qwen2 torch model to ``out_path``.

    Args:
        model: a ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` in float32.
        out_path: the ``.onnx`` file to write (external data beside it past 2 GiB).
        max_length: positions the cos/sin caches cover; None = max_position_embeddings.

    Returns:
        The path, the manifest's decoder section and the node count.

    Raises:
        UnsupportedModelError: another family, or a feature the graph does not express.
    """
    config = model.config
    if config.model_type == "gpt2":
        from edge_slm_export.fused_gpt2 import build_fused_gpt2

        return build_fused_gpt2(model, out_path, max_length)
    _check_supported(config)
    io = fused_decoder_io(config, int(max_length or config.max_position_embeddings))
    assert io.max_length is not None
    heads, kv_heads, head_dim = config.num_attention_heads, io.num_kv_heads, io.head_dim
    eps = float(config.rms_norm_eps)
    g = GraphBuilder()
    cos, sin = _rotary_caches(model, io.max_length, head_dim)
    g.weight("cos_cache", cos)
    g.weight("sin_cache", sin)

    lm_head = embedding_lookup(g, model.model.embed_tokens.weight, model.lm_head.weight,
                               "embed_tokens.weight", "embeds")  # fmt: skip

    residual = "embeds"
    mlp_out: str | None = None
    for i, layer in enumerate(model.model.layers):
        p = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        ln1 = g.weight(f"{p}.input_layernorm.weight", as_numpy(layer.input_layernorm.weight))
        if mlp_out is None:
            (normed,) = g.node(
                "SimplifiedLayerNormalization",
                [residual, ln1],
                [f"{p}.ln1"],
                f"{p}.ln1",
                axis=-1,
                epsilon=eps,
            )
        else:
            normed, _, _, residual = g.node(
                "SkipSimplifiedLayerNormalization",
                [mlp_out, residual, ln1],
                [f"{p}.ln1", "", "", f"{p}.resid1"],
                f"{p}.ln1",
                domain=_MS,
                epsilon=eps,
            )
        qkv_w = np.concatenate(
            [
                as_numpy(attn.q_proj.weight).T,
                as_numpy(attn.k_proj.weight).T,
                as_numpy(attn.v_proj.weight).T,
            ],
            axis=1,
        )  # [H, (heads + 2 kv_heads) * head_dim]
        (qkv,) = g.node(
            "MatMul",
            [normed, g.weight(f"{p}.qkv_proj.weight", np.ascontiguousarray(qkv_w))],
            [f"{p}.qkv"],
            f"{p}.qkv_proj",
        )
        if attn.q_proj.bias is not None:
            bias = np.concatenate(
                [as_numpy(attn.q_proj.bias), as_numpy(attn.k_proj.bias), as_numpy(attn.v_proj.bias)]
            )
            (qkv,) = g.node(
                "Add", [qkv, g.weight(f"{p}.qkv_proj.bias", bias)], [f"{p}.qkv_b"], f"{p}.qkv_bias"
            )
        (context, _, _) = g.node(
            "GroupQueryAttention",
            [
                qkv,
                "",
                "",
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
                "seqlens_k",
                "total_sequence_length",
                "cos_cache",
                "sin_cache",
            ],
            [f"{p}.attn", f"present.{i}.key", f"present.{i}.value"],
            f"{p}.gqa",
            domain=_MS,
            num_heads=heads,
            kv_num_heads=kv_heads,
            scale=float(head_dim**-0.5),
            do_rotary=1,
            rotary_interleaved=0,
            local_window_size=-1,
        )
        (attn_out,) = g.node(
            "MatMul",
            [
                context,
                g.weight(
                    f"{p}.o_proj.weight", np.ascontiguousarray(as_numpy(attn.o_proj.weight).T)
                ),
            ],
            [f"{p}.o"],
            f"{p}.o_proj",
        )
        if getattr(attn.o_proj, "bias", None) is not None:
            (attn_out,) = g.node(
                "Add",
                [attn_out, g.weight(f"{p}.o_proj.bias", as_numpy(attn.o_proj.bias))],
                [f"{p}.o_b"],
                f"{p}.o_bias",
            )
        ln2 = g.weight(
            f"{p}.post_attention_layernorm.weight", as_numpy(layer.post_attention_layernorm.weight)
        )
        normed2, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization",
            [attn_out, residual, ln2],
            [f"{p}.ln2", "", "", f"{p}.resid2"],
            f"{p}.ln2",
            domain=_MS,
            epsilon=eps,
        )
        if getattr(mlp.gate_proj, "bias", None) is not None:
            raise UnsupportedModelError("MLP biases are not supported by the fused graph")
        inter = mlp.gate_proj.weight.shape[0]
        gate_up_w = np.concatenate(
            [as_numpy(mlp.gate_proj.weight).T, as_numpy(mlp.up_proj.weight).T], axis=1
        )
        (gate_up,) = g.node(
            "MatMul",
            [normed2, g.weight(f"{p}.gate_up_proj.weight", np.ascontiguousarray(gate_up_w))],
            [f"{p}.gate_up"],
            f"{p}.gate_up_proj",
        )
        split = g.weight(f"{p}.split", np.asarray([inter, inter], dtype=np.int64))
        gate, up = g.node(
            "Split", [gate_up, split], [f"{p}.gate", f"{p}.up"], f"{p}.split", axis=-1
        )
        (sig,) = g.node("Sigmoid", [gate], [f"{p}.sig"], f"{p}.sigmoid")
        (silu,) = g.node("Mul", [gate, sig], [f"{p}.silu"], f"{p}.silu")
        (act,) = g.node("Mul", [silu, up], [f"{p}.act"], f"{p}.act")
        (mlp_out,) = g.node(
            "MatMul",
            [
                act,
                g.weight(
                    f"{p}.down_proj.weight", np.ascontiguousarray(as_numpy(mlp.down_proj.weight).T)
                ),
            ],
            [f"{p}.down"],
            f"{p}.down_proj",
        )
    assert mlp_out is not None
    final_w = g.weight("norm.weight", as_numpy(model.model.norm.weight))
    (final,) = g.node(
        "SkipSimplifiedLayerNormalization",
        [mlp_out, residual, final_w],
        ["final_norm"],
        "final_norm",
        domain=_MS,
        epsilon=eps,
    )
    g.node("Gather", [final, "logits_positions"], ["picked"], "pick_positions", axis=1)
    g.node("MatMul", ["picked", lm_head], ["logits"], "lm_head")
    return write_fused_graph(g, io, int(config.vocab_size), out_path)


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
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(_MS, 1)],
        producer_name="edge-slm",
    )
    proto.ir_version = 8
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_graph(proto, out_path)
    return FusedGraph(path=out_path, io=io, nodes=len(g.nodes))
