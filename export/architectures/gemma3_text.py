"""Gemma 3 text (``Gemma3ForCausalLM``, ``model_type`` ``gemma3_text``; Gemma 3 270M and 1B,
and what a Gemma 3 GGUF loads as): the fused decoder graph.

The module is named after the ``model_type`` transformers gives the text model (the
registry's rule); ``gemma3`` is the multimodal ``Gemma3ForConditionalGeneration``, not
handled here. What differs from Llama, each expressed with the contrib ops:

* RMS norms scale by ``1 + weight`` (computed in float32 as there): the stored norm
  weights are ``1 + weight``, so ``SimplifiedLayerNormalization`` computes them as is;
* four norms per layer: input, post-attention (on the attention output before the
  residual add), pre-feed-forward, post-feed-forward (on the MLP output before the add);
  each post norm is a ``SimplifiedLayerNormalization`` whose result feeds the next
  ``SkipSimplifiedLayerNormalization`` (the residual add and the next pre-norm);
* the embedding is multiplied by ``sqrt(hidden)`` cast to the embedding's dtype, as
  transformers' ``Gemma3TextScaledWordEmbedding`` does (the tied lm_head is not);
* per-head q/k RMS norms before the rotary embedding (as Qwen3);
* ``layer_types``: ``sliding_attention`` layers attend within ``sliding_window`` and
  rotate with ``rope_local_base_freq`` (no scaling); ``full_attention`` layers are
  global and rotate with ``rope_theta`` and ``rope_scaling``: two cos/sin caches, each
  computed by the model's own rotary module (``rotary_emb_local`` / ``rotary_emb``);
* the attention scale is ``query_pre_attn_scalar ** -0.5``; ``final_logit_softcapping``
  is ``tanh(logits / cap) * cap`` after the lm_head. ``attn_logit_softcapping`` is a
  Gemma 2 field Gemma 3 keeps in its config but does not apply (transformers 4.57 never
  passes it to the attention, llama.cpp's gemma3 graph has no such cap; every release
  sets it null): the graph follows them and ignores it, where GroupQueryAttention's
  ``softcap`` would express it;
* GELU-tanh MLP (``gelu_pytorch_tanh``): ``FastGelu(gate) * up``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_slm_export.architectures.base import DecoderArchitecture
from edge_slm_export.architectures.llama import STATIC_ROPE
from edge_slm_export.errors import UnsupportedModelError
from edge_slm_export.fused_graph import (
    MS,
    AttentionSpec,
    FusedGraph,
    GraphBuilder,
    as_numpy,
    embedding_lookup,
    fused_decoder_io,
    linear,
    local_window_size,
    output_projection,
    packed_qkv,
    rotary_attention,
    write_fused_graph,
)

_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")
_LAYER_TYPES = ("sliding_attention", "full_attention")


def _check_supported(config: Any) -> None:
    act = getattr(config, "hidden_activation", "gelu_pytorch_tanh")
    if act not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"Gemma 3 activation {act!r} is not supported by the fused graph; supported: "
            f"{list(_ACTIVATIONS)} (use --graph optimum)"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            "bidirectional attention (EmbeddingGemma) is not supported by the fused decoder graph"
        )
    unknown = sorted(set(config.layer_types) - set(_LAYER_TYPES))
    if unknown:
        raise UnsupportedModelError(
            f"Gemma 3 layer types {unknown} are not supported; supported: {list(_LAYER_TYPES)}"
        )
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in STATIC_ROPE:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported by the fused graph; supported: "
            f"{list(STATIC_ROPE)} (use --graph optimum)"
        )


def _rotary_caches(rotary: Any, max_length: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[max_length, head_dim / 2]`` from one of the model's rotary modules."""
    import torch

    positions = torch.arange(max_length, dtype=torch.int64)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos_np, sin_np = as_numpy(cos[0]), as_numpy(sin[0])
    half = head_dim // 2
    if cos_np.shape[-1] != head_dim or not (
        np.array_equal(cos_np[:, :half], cos_np[:, half:])
        and np.array_equal(sin_np[:, :half], sin_np[:, half:])
    ):
        raise UnsupportedModelError("the rotary embedding is not in the rotate_half layout")
    return np.ascontiguousarray(cos_np[:, :half]), np.ascontiguousarray(sin_np[:, :half])


def _norm(g: GraphBuilder, name: str, norm: Any) -> str:
    """A Gemma RMS norm's effective weight ``1 + weight`` (float32, as transformers computes)."""
    return g.weight(name, np.ascontiguousarray(1.0 + as_numpy(norm.weight)))


class Gemma3TextArchitecture(DecoderArchitecture):
    """Gemma 3 text: sandwich norms, sliding/global layers, scaled embedding, GELU-tanh."""

    model_type = "gemma3_text"
    fused = True

    def build_fused_graph(
        self, model: Any, out_path: Path, max_length: int | None = None
    ) -> FusedGraph:
        """Write the fused ONNX graph of a ``Gemma3ForCausalLM`` (float32) to ``out_path``."""
        config = model.config
        _check_supported(config)
        io = fused_decoder_io(config, int(max_length or config.max_position_embeddings))
        assert io.max_length is not None
        body = model.model
        g = GraphBuilder()
        caches = {
            "full_attention": ("cos_global", "sin_global"),
            "sliding_attention": ("cos_local", "sin_local"),
        }
        for (cos_name, sin_name), rotary in (
            (caches["full_attention"], body.rotary_emb),
            (caches["sliding_attention"], body.rotary_emb_local),
        ):
            cos, sin = _rotary_caches(rotary, io.max_length, io.head_dim)
            g.weight(cos_name, cos)
            g.weight(sin_name, sin)

        embed = body.embed_tokens
        lm_head = embedding_lookup(g, embed.weight, model.lm_head.weight,
                                   "embed_tokens.weight", "tokens")  # fmt: skip
        scale = embed.embed_scale.to(embed.weight.dtype).float().numpy().reshape(())
        g.node("Mul", ["tokens", g.weight("embed_scale", scale)], ["embeds"], "embed_scale")

        residual = "embeds"
        pending: str | None = None  # the last layer's post-feed-forward norm output
        for i, layer in enumerate(body.layers):
            p = f"layers.{i}"
            eps = float(layer.input_layernorm.eps)
            ln_in = _norm(g, f"{p}.input_layernorm.weight", layer.input_layernorm)
            if pending is None:
                (normed,) = g.node("SimplifiedLayerNormalization", [residual, ln_in],
                                   [f"{p}.ln1"], f"{p}.ln1", axis=-1, epsilon=eps)  # fmt: skip
            else:
                normed, _, _, residual = g.node(
                    "SkipSimplifiedLayerNormalization", [pending, residual, ln_in],
                    [f"{p}.ln1", "", "", f"{p}.resid1"], f"{p}.ln1", domain=MS, epsilon=eps,
                )  # fmt: skip
            attn = layer.self_attn
            layer_type = config.layer_types[i]
            cos_name, sin_name = caches[layer_type]
            spec = AttentionSpec(
                heads=config.num_attention_heads,
                kv_heads=io.num_kv_heads,
                head_dim=io.head_dim,
                scale=float(attn.scaling),
                window=local_window_size(attn.sliding_window),
                cos_cache=cos_name,
                sin_cache=sin_name,
            )
            weight, bias = packed_qkv(attn)
            qkv = linear(g, f"{p}.qkv_proj", normed, weight, bias)
            norms = (1.0 + as_numpy(attn.q_norm.weight), 1.0 + as_numpy(attn.k_norm.weight),
                     float(attn.q_norm.eps))  # fmt: skip
            attn_out = output_projection(g, p, attn, rotary_attention(g, p, i, spec, qkv, norms))
            post_attn = _norm(g, f"{p}.post_attention_layernorm.weight",
                              layer.post_attention_layernorm)  # fmt: skip
            (attn_normed,) = g.node("SimplifiedLayerNormalization", [attn_out, post_attn],
                                    [f"{p}.post_attn"], f"{p}.post_attn", axis=-1,
                                    epsilon=eps)  # fmt: skip
            pre_ff = _norm(g, f"{p}.pre_feedforward_layernorm.weight",
                           layer.pre_feedforward_layernorm)  # fmt: skip
            normed2, _, _, residual = g.node(
                "SkipSimplifiedLayerNormalization", [attn_normed, residual, pre_ff],
                [f"{p}.ln2", "", "", f"{p}.resid2"], f"{p}.ln2", domain=MS, epsilon=eps,
            )  # fmt: skip
            mlp_out = self.mlp(g, p, layer.mlp, normed2)
            post_ff = _norm(g, f"{p}.post_feedforward_layernorm.weight",
                            layer.post_feedforward_layernorm)  # fmt: skip
            (pending,) = g.node("SimplifiedLayerNormalization", [mlp_out, post_ff],
                                [f"{p}.post_ff"], f"{p}.post_ff", axis=-1,
                                epsilon=eps)  # fmt: skip
        assert pending is not None
        final_w = _norm(g, "norm.weight", body.norm)
        (final,) = g.node(
            "SkipSimplifiedLayerNormalization", [pending, residual, final_w], ["final_norm"],
            "final_norm", domain=MS, epsilon=float(body.norm.eps),
        )  # fmt: skip
        g.node("Gather", [final, "logits_positions"], ["picked"], "pick_positions", axis=1)
        cap = getattr(config, "final_logit_softcapping", None)
        if cap is None:
            g.node("MatMul", ["picked", lm_head], ["logits"], "lm_head")
        else:  # tanh(logits / cap) * cap
            g.node("MatMul", ["picked", lm_head], ["raw_logits"], "lm_head")
            cap_w = g.weight("final_logit_softcap", np.asarray(cap, dtype=np.float32))
            g.node("Div", ["raw_logits", cap_w], ["capped_in"], "softcap_div")
            g.node("Tanh", ["capped_in"], ["capped"], "softcap_tanh")
            g.node("Mul", ["capped", cap_w], ["logits"], "softcap_mul")
        return write_fused_graph(g, io, int(config.vocab_size), out_path)

    def mlp(self, g: GraphBuilder, p: str, mlp: Any, normed: str) -> str:
        """Packed gate/up projection, ``gelu_tanh(gate) * up``, down projection."""
        inter = mlp.gate_proj.weight.shape[0]
        gate_up_w = np.concatenate(
            [as_numpy(mlp.gate_proj.weight).T, as_numpy(mlp.up_proj.weight).T], axis=1
        )
        gate_up = linear(g, f"{p}.gate_up_proj", normed, gate_up_w)
        split = g.weight(f"{p}.split", np.asarray([inter, inter], dtype=np.int64))
        gate, up = g.node("Split", [gate_up, split], [f"{p}.gate", f"{p}.up"], f"{p}.split",
                          axis=-1)  # fmt: skip
        (gelu,) = g.node("FastGelu", [gate], [f"{p}.gelu"], f"{p}.gelu", domain=MS)
        (act,) = g.node("Mul", [gelu, up], [f"{p}.act"], f"{p}.act")
        return linear(g, f"{p}.down_proj", act, as_numpy(mlp.down_proj.weight).T)


ARCHITECTURE = Gemma3TextArchitecture()
