"""A tiny Llama written as a GGUF file with quantized tensors (no network).

The weights and tokenizer come from the tiny random Llama of :mod:`tiny_models`; each
2-D weight is quantized with ``gguf.quants`` (the reference llama.cpp formats) and Q/K
rows are permuted the way llama.cpp's converter does, so transformers (which
un-permutes them when it loads a GGUF) sees the original layout back.

gguf-py de-quantizes the K-quants but cannot quantize them: a K-quant tensor is written
as random block bytes with valid fp16 scales (:func:`random_blocks`), so the model is
whatever those blocks de-quantize to (transformers reads it the same way). K-quants need
inputs in multiples of 256: :func:`widen_llama` makes a Llama wide enough
(:data:`KQUANT_LAYER_TYPES`, a Q4_K_M-like mixture).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# GGUF tensor suffix -> type per layer; layer 1 mixes Q4_0 and Q4_1 inside the fused
# projections (q/k/v and gate/up) to exercise per-column zero points.
LAYER_TYPES: tuple[dict[str, str], ...] = (
    {
        "attn_q": "Q4_1",
        "attn_k": "Q4_1",
        "attn_v": "Q4_1",
        "attn_output": "Q4_0",
        "ffn_gate": "Q4_1",
        "ffn_up": "Q4_1",
        "ffn_down": "Q8_0",
    },
    {
        "attn_q": "Q4_1",
        "attn_k": "Q4_0",
        "attn_v": "Q4_1",
        "attn_output": "Q8_0",
        "ffn_gate": "Q4_0",
        "ffn_up": "Q4_1",
        "ffn_down": "Q4_1",
    },
)
EMBEDDING_TYPE = "Q8_0"
# A Q4_K_M-like mixture for the wide Llama: Q4_K with a Q6_K attn_v (one fused qkv over
# two containers), Q5_0/Q5_1 and Q5_K, Q6_K down projections.
KQUANT_LAYER_TYPES: tuple[dict[str, str], ...] = (
    {
        "attn_q": "Q4_K",
        "attn_k": "Q4_K",
        "attn_v": "Q6_K",
        "attn_output": "Q4_K",
        "ffn_gate": "Q5_0",
        "ffn_up": "Q5_1",
        "ffn_down": "Q6_K",
    },
    {
        "attn_q": "Q5_K",
        "attn_k": "Q5_K",
        "attn_v": "Q8_0",
        "attn_output": "Q3_K",
        "ffn_gate": "Q4_K",
        "ffn_up": "Q4_K",
        "ffn_down": "Q2_K",
    },
)
KQUANT_EMBEDDING_TYPE = "Q6_K"
# K-quant type -> (bytes per 256-weight super-block, byte offsets of its fp16 scales)
K_LAYOUTS = {
    "Q2_K": (84, (80, 82)),
    "Q3_K": (110, (108,)),
    "Q4_K": (144, (0, 2)),
    "Q5_K": (176, (0, 2)),
    "Q6_K": (210, (208,)),
}
_HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf`` row permutation of Q/K (rotary half-split -> pairs)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def random_blocks(
    kind: str,
    rows: int,
    k: int,
    rng: np.random.Generator,
    decades: tuple[float, float] = (-4.0, 0.0),
    signed: bool = True,
) -> np.ndarray:
    """Raw bytes ``[rows, bytes per row]`` of a K-quant tensor with ``k`` inputs: random
    codes and sub-block scales, fp16 super-block scales ``10**U(decades)`` (both signs
    unless not ``signed``)."""
    size, halves = K_LAYOUTS[kind]
    blocks = rng.integers(0, 256, size=(rows * k // 256, size), dtype=np.uint8)
    for offset in halves:
        magnitude = np.float32(10) ** rng.uniform(*decades, size=blocks.shape[0])
        sign = rng.choice(np.asarray([-1, 1], np.float32), size=blocks.shape[0]) if signed else 1
        half = (magnitude * sign).astype(np.float16)
        blocks[:, offset : offset + 2] = half[:, None].view(np.uint8)
    return blocks.reshape(rows, -1)


def widen_llama(hf_dir: Path, out: Path, hidden: int = 256, intermediate: int = 512) -> Path:
    """The tiny Llama's config and tokenizer with K-quant-friendly widths, random weights."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    config.hidden_size, config.intermediate_size = hidden, intermediate
    config.head_dim = hidden // config.num_attention_heads
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / name).is_file():
            shutil.copy(hf_dir / name, out / name)
    return out


def write_tiny_gguf(
    hf_dir: Path,
    out: Path,
    layer_types: Any = LAYER_TYPES,
    embedding_type: str = EMBEDDING_TYPE,
) -> Path:
    """Write the tiny Llama in ``hf_dir`` (from ``tiny_models.build_model``) as a GGUF file."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in tok.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(int(config.bos_token_id))
    writer.add_eos_token_id(int(config.eos_token_id))
    writer.add_pad_token_id(int(config.pad_token_id))
    writer.add_add_bos_token(False)

    rng = np.random.default_rng(0)

    def add(name: str, array: np.ndarray, qtype: str | None) -> None:
        if qtype is None:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
            return
        kind = gguf.GGMLQuantizationType[qtype]
        if qtype in K_LAYOUTS:  # weights of the size of a 0.3-initialised layer
            raw = random_blocks(qtype, array.shape[0], array.shape[1], rng, (-3.5, -2.5), False)
        else:
            raw = gguf.quants.quantize(array, kind)
        writer.add_tensor(name, raw, raw_dtype=kind)

    def weight(t: Any) -> np.ndarray:
        return np.ascontiguousarray(t.detach().float().numpy())

    add("token_embd.weight", weight(model.model.embed_tokens.weight), embedding_type)
    add("output_norm.weight", weight(model.model.norm.weight), None)
    for i, layer in enumerate(model.model.layers):
        add(f"blk.{i}.attn_norm.weight", weight(layer.input_layernorm.weight), None)
        add(f"blk.{i}.ffn_norm.weight", weight(layer.post_attention_layernorm.weight), None)
        for key, hf_name in _HF_NAMES.items():
            module = layer.get_submodule(hf_name)
            array = weight(module.weight)  # [out, in]
            if key == "attn_q":
                array = _permute(array, heads)
            elif key == "attn_k":
                array = _permute(array, kv_heads)
            add(f"blk.{i}.{key}.weight", np.ascontiguousarray(array), layer_types[i][key])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
