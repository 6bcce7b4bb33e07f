"""GPT-2: the fused decoder graph (inputs, outputs and KV layout of :mod:`edge_slm_export.fused_graph`).

GPT-2 differs from Llama in ways the contrib ops cover:

* learned absolute positions: ``wpe`` rows ``total_sequence_length - seq ..
  total_sequence_length - 1`` (a Range + Gather), added to the token embeddings;
* LayerNorm with a bias (``LayerNormalization``, then ``com.microsoft``
  ``SkipLayerNormalization``, whose ``bias`` input takes the attention / MLP output
  projection's bias, so those need no Add of their own);
* multi-head attention: ``GroupQueryAttention`` with ``kv_num_heads = num_heads`` and no
  rotary (``do_rotary=0``), on the packed ``c_attn`` output (q | k | v) plus its bias;
* the MLP's ``gelu_new`` / ``gelu_pytorch_tanh`` (tanh approximation) is ``FastGelu``
  with the ``c_fc`` bias fused in; exact ``gelu`` is ``BiasGelu``.

``Conv1D`` weights are already ``[in, out]``: they are MatMul's B as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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

_ACTIVATIONS = {"gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "gelu": "BiasGelu"}


def _check_supported(config: Any) -> None:
    act = getattr(config, "activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"GPT-2 activation {act!r} is not supported by the fused graph; supported: "
            f"{sorted(_ACTIVATIONS)} (use --graph optimum)"
        )
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(
        config, "reorder_and_upcast_attn", False
    ):
        raise UnsupportedModelError(
            "scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported by "
            "the fused graph (use --graph optimum)"
        )
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError("cross-attention is not supported by the fused graph")


class GPT2Architecture(DecoderArchitecture):
    """GPT-2: learned positions, LayerNorm with bias, multi-head attention, GELU MLP."""

    model_type = "gpt2"
    fused = True

    def build_fused_graph(
        self, model: Any, out_path: Path, max_length: int | None = None
    ) -> FusedGraph:
        """Write the fused ONNX graph of a ``GPT2LMHeadModel`` (float32) to ``out_path``."""
        config = model.config
        _check_supported(config)
        io = fused_decoder_io(config, int(max_length or config.n_positions))
        heads, head_dim = config.n_head, io.head_dim
        eps = float(config.layer_norm_epsilon)
        scale = float(head_dim**-0.5) if getattr(config, "scale_attn_weights", True) else 1.0
        act = _ACTIVATIONS[getattr(config, "activation_function", "gelu_new")]
        body = model.transformer
        g = GraphBuilder()

        lm_head = embedding_lookup(g, body.wte.weight, model.lm_head.weight, "wte.weight", "tokens")
        # positions total - seq .. total - 1 (the new tokens' places after the past)
        g.weight("one", np.asarray(1, dtype=np.int64))
        g.node("Shape", ["input_ids"], ["seq_1d"], "seq_len", start=1, end=2)
        g.node("Squeeze", ["seq_1d"], ["seq"], "seq_scalar")
        g.node("Cast", ["total_sequence_length"], ["total"], "total_i64", to=7)  # INT64
        g.node("Sub", ["total", "seq"], ["first_position"], "first_position")
        g.node("Range", ["first_position", "total", "one"], ["positions"], "positions")
        wpe = g.weight("wpe.weight", as_numpy(body.wpe.weight))
        g.node("Gather", [wpe, "positions"], ["position_embeds"], "position_embed", axis=0)
        g.node("Add", ["tokens", "position_embeds"], ["embeds"], "embeds")

        residual = "embeds"
        pending: tuple[str, str] | None = None  # (last MatMul output, its bias) to add
        for i, block in enumerate(body.h):
            p = f"h.{i}"
            ln1 = [g.weight(f"{p}.ln_1.weight", as_numpy(block.ln_1.weight)),
                   g.weight(f"{p}.ln_1.bias", as_numpy(block.ln_1.bias))]  # fmt: skip
            if pending is None:
                (normed,) = g.node(
                    "LayerNormalization", [residual, *ln1], [f"{p}.ln1"], f"{p}.ln1",
                    axis=-1, epsilon=eps,
                )  # fmt: skip
            else:
                normed, _, _, residual = g.node(
                    "SkipLayerNormalization", [pending[0], residual, *ln1, pending[1]],
                    [f"{p}.ln1", "", "", f"{p}.resid1"], f"{p}.ln1", domain=MS, epsilon=eps,
                )  # fmt: skip
            attn = block.attn
            (qkv,) = g.node(
                "MatMul", [normed, g.weight(f"{p}.c_attn.weight", as_numpy(attn.c_attn.weight))],
                [f"{p}.qkv"], f"{p}.c_attn",
            )  # fmt: skip
            (qkv,) = g.node(
                "Add", [qkv, g.weight(f"{p}.c_attn.bias", as_numpy(attn.c_attn.bias))],
                [f"{p}.qkv_b"], f"{p}.c_attn_bias",
            )  # fmt: skip
            (context, _, _) = g.node(
                "GroupQueryAttention",
                [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                 "seqlens_k", "total_sequence_length"],
                [f"{p}.attn", f"present.{i}.key", f"present.{i}.value"], f"{p}.mha", domain=MS,
                num_heads=heads, kv_num_heads=heads, scale=scale, do_rotary=0, local_window_size=-1,
            )  # fmt: skip
            (attn_out,) = g.node(
                "MatMul", [context, g.weight(f"{p}.attn.c_proj.weight", as_numpy(attn.c_proj.weight))],
                [f"{p}.o"], f"{p}.attn_c_proj",
            )  # fmt: skip
            ln2 = [g.weight(f"{p}.ln_2.weight", as_numpy(block.ln_2.weight)),
                   g.weight(f"{p}.ln_2.bias", as_numpy(block.ln_2.bias))]  # fmt: skip
            o_bias = g.weight(f"{p}.attn.c_proj.bias", as_numpy(attn.c_proj.bias))
            normed2, _, _, residual = g.node(
                "SkipLayerNormalization", [attn_out, residual, *ln2, o_bias],
                [f"{p}.ln2", "", "", f"{p}.resid2"], f"{p}.ln2", domain=MS, epsilon=eps,
            )  # fmt: skip
            mlp = block.mlp
            (hidden,) = g.node(
                "MatMul", [normed2, g.weight(f"{p}.c_fc.weight", as_numpy(mlp.c_fc.weight))],
                [f"{p}.fc"], f"{p}.c_fc",
            )  # fmt: skip
            (activated,) = g.node(
                act, [hidden, g.weight(f"{p}.c_fc.bias", as_numpy(mlp.c_fc.bias))],
                [f"{p}.act"], f"{p}.act", domain=MS,
            )  # fmt: skip
            (mlp_out,) = g.node(
                "MatMul", [activated, g.weight(f"{p}.mlp.c_proj.weight", as_numpy(mlp.c_proj.weight))],
                [f"{p}.mlp"], f"{p}.mlp_c_proj",
            )  # fmt: skip
            pending = (mlp_out, g.weight(f"{p}.mlp.c_proj.bias", as_numpy(mlp.c_proj.bias)))
        assert pending is not None
        lnf = [g.weight("ln_f.weight", as_numpy(body.ln_f.weight)),
               g.weight("ln_f.bias", as_numpy(body.ln_f.bias))]  # fmt: skip
        (final,) = g.node(
            "SkipLayerNormalization", [pending[0], residual, *lnf, pending[1]], ["final_norm"],
            "final_norm", domain=MS, epsilon=eps,
        )  # fmt: skip
        g.node("Gather", [final, "logits_positions"], ["picked"], "pick_positions", axis=1)
        g.node("MatMul", ["picked", lm_head], ["logits"], "lm_head")
        return write_fused_graph(g, io, int(config.vocab_size), out_path)


ARCHITECTURE = GPT2Architecture()
