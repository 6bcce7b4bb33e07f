"""Llama: the fused decoder graph, written with ``onnx.helper`` from torch weights.

optimum's export spells attention, rotary embedding and RMS norm out in ~100 small ONNX
ops per layer (about 3,150 kernel nodes per step for SmolLM2-135M, half the time in
shape ops). This builder writes one graph of about 12 nodes per layer instead, using
onnxruntime's contrib ops (shipped in the standard CPU wheels); the inputs, outputs and
KV layout every family shares are in :mod:`edge_slm_export.fused_graph`.

* ``SimplifiedLayerNormalization`` (first RMS norm) and ``com.microsoft``
  ``SkipSimplifiedLayerNormalization`` (residual add + RMS norm in one kernel; its
  fourth output is the residual sum);
* one MatMul for q, k and v together (``[hidden, (heads + 2 kv_heads) * head_dim]``,
  plus one Add when the projections carry biases: ``attention_bias``, or Qwen2);
* ``com.microsoft`` ``GroupQueryAttention`` on the packed QKV with ``do_rotary=1``: the
  rotary embedding happens inside, from cos/sin caches stored as initializers
  (``[max_length, head_dim / 2]``, computed by the model's own rotary module, so
  rope_theta and Llama-3 style rope_scaling come out exactly as transformers has them;
  HF's half-split ``rotate_half`` layout is ``rotary_interleaved=0``);
* one MatMul for gate and up together, then ``x * sigmoid(x) * up`` (onnxruntime fuses
  ``x * sigmoid(x)`` into one kernel at load);
* the final norm, the ``logits_positions`` Gather, the lm_head.

A family close to Llama subclasses :class:`LlamaArchitecture` and overrides the piece
that differs (:meth:`~LlamaArchitecture.check_fused`, :meth:`~LlamaArchitecture.attention`,
:meth:`~LlamaArchitecture.mlp`, :meth:`~LlamaArchitecture.rotary_caches`), as
``qwen2.py`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.bundle import DecoderIO
from edge_slm_export.architectures.base import DecoderArchitecture
from edge_slm_export.errors import UnsupportedModelError
from edge_slm_export.fused_graph import (
    MS,
    FusedGraph,
    GraphBuilder,
    as_numpy,
    embedding_lookup,
    fused_decoder_io,
    write_fused_graph,
)

# rope types whose cos/sin depend only on the position (not on the sequence length)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


class LlamaArchitecture(DecoderArchitecture):
    """Llama (and SmolLM2): RMS norm, rotary grouped-query attention, SwiGLU MLP."""

    model_type = "llama"
    fused = True

    def check_fused(self, config: Any) -> None:
        """Refuse what the fused graph does not express (the rope type is checked later)."""
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(
                f"activation {config.hidden_act!r} is not supported (silu only)"
            )

    def rotary_caches(
        self, model: Any, max_length: int, head_dim: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin ``[max_length, head_dim / 2]`` from the model's own rotary module."""
        import torch

        config = model.config
        scaling = getattr(config, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in STATIC_ROPE:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported by the fused graph; supported: "
                f"{list(STATIC_ROPE)} (use --graph optimum)"
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

    def build_fused_graph(
        self, model: Any, out_path: Path, max_length: int | None = None
    ) -> FusedGraph:
        """Write the fused ONNX graph of a ``LlamaForCausalLM``-shaped model (see base)."""
        config = model.config
        self.check_fused(config)
        io = fused_decoder_io(config, int(max_length or config.max_position_embeddings))
        assert io.max_length is not None
        eps = float(config.rms_norm_eps)
        g = GraphBuilder()
        cos, sin = self.rotary_caches(model, io.max_length, io.head_dim)
        g.weight("cos_cache", cos)
        g.weight("sin_cache", sin)

        lm_head = embedding_lookup(g, model.model.embed_tokens.weight, model.lm_head.weight,
                                   "embed_tokens.weight", "embeds")  # fmt: skip

        residual = "embeds"
        mlp_out: str | None = None
        for i, layer in enumerate(model.model.layers):
            p = f"layers.{i}"
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
                    domain=MS,
                    epsilon=eps,
                )
            attn_out = self.attention(g, p, i, layer.self_attn, normed, config, io)
            ln2 = g.weight(
                f"{p}.post_attention_layernorm.weight",
                as_numpy(layer.post_attention_layernorm.weight),
            )
            normed2, _, _, residual = g.node(
                "SkipSimplifiedLayerNormalization",
                [attn_out, residual, ln2],
                [f"{p}.ln2", "", "", f"{p}.resid2"],
                f"{p}.ln2",
                domain=MS,
                epsilon=eps,
            )
            mlp_out = self.mlp(g, p, layer.mlp, normed2)
        assert mlp_out is not None
        final_w = g.weight("norm.weight", as_numpy(model.model.norm.weight))
        (final,) = g.node(
            "SkipSimplifiedLayerNormalization",
            [mlp_out, residual, final_w],
            ["final_norm"],
            "final_norm",
            domain=MS,
            epsilon=eps,
        )
        g.node("Gather", [final, "logits_positions"], ["picked"], "pick_positions", axis=1)
        g.node("MatMul", ["picked", lm_head], ["logits"], "lm_head")
        return write_fused_graph(g, io, int(config.vocab_size), out_path)

    def attention(
        self,
        g: GraphBuilder,
        p: str,
        i: int,
        attn: Any,
        normed: str,
        config: Any,
        io: DecoderIO,
    ) -> str:
        """Packed q/k/v projection (+ biases), GroupQueryAttention with rotary, o_proj.

        Returns:
            The attention block's output ``[batch, seq, hidden]`` (before the residual add).
        """
        heads, kv_heads, head_dim = config.num_attention_heads, io.num_kv_heads, io.head_dim
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
            domain=MS,
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
        return attn_out

    def mlp(self, g: GraphBuilder, p: str, mlp: Any, normed: str) -> str:
        """Packed gate/up projection, ``silu(gate) * up``, down projection."""
        if getattr(mlp.gate_proj, "bias", None) is not None:
            raise UnsupportedModelError("MLP biases are not supported by the fused graph")
        inter = mlp.gate_proj.weight.shape[0]
        gate_up_w = np.concatenate(
            [as_numpy(mlp.gate_proj.weight).T, as_numpy(mlp.up_proj.weight).T], axis=1
        )
        (gate_up,) = g.node(
            "MatMul",
            [normed, g.weight(f"{p}.gate_up_proj.weight", np.ascontiguousarray(gate_up_w))],
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
        return mlp_out


ARCHITECTURE = LlamaArchitecture()
