"""Tiny random Hugging Face models built locally, for tests and examples (no network).

Each builder writes a complete HF folder (config, safetensors, tokenizer with a chat
template) from a config and a byte-level BPE tokenizer trained here on a small corpus.
``initializer_range=0.3`` keeps greedy decoding from collapsing into one repeated
token, so token-for-token parity tests are meaningful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Q: What is 12 times 7? A: 84. Café, naïve, über, 東京, 😀 are words too.",
    "Small language models run on a Raspberry Pi, offline kiosks and embedded boxes.",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FAMILIES = ("gpt2", "llama", "qwen2")
# Fused graph only (no optimum bundle is built for them): tests/test_architectures_new.py.
# Sliding windows (8 positions) shorter than a prompt plus its generation, so they matter.
FUSED_ONLY_FAMILIES = ("qwen3", "mistral", "phi3", "gemma3_text")
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
# Each family's official chat template (tests/fixtures/chat_templates/), carried by its tiny model.
FAMILY_TEMPLATES = {
    "qwen3": "qwen3.jinja",
    "mistral": "mistral_7b_instruct_v0_3.jinja",
    "phi3": "phi3_mini_4k_instruct.jinja",
    "gemma3_text": "gemma3_it.jinja",
}


def build_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny random ``family`` model (FAMILIES or FUSED_ONLY_FAMILIES) to ``folder``."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    common: dict[str, Any] = {
        "vocab_size": vocab,
        "initializer_range": 0.3,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    if family == "gpt2":
        model: Any = GPT2LMHeadModel(
            GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
        )
    elif family == "llama":  # grouped-query attention: 4 heads share 2 KV heads
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                tie_word_embeddings=True,
                **common,
            )
        )
    elif family == "qwen2":
        model = Qwen2ForCausalLM(
            Qwen2Config(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                tie_word_embeddings=False,
                **common,
            )
        )
    elif family in FUSED_ONLY_FAMILIES:
        model = _fused_only_model(family, common)
        _randomize_norms(model)
        tokenizer.chat_template = (TEMPLATES / FAMILY_TEMPLATES[family]).read_text(encoding="utf-8")
    else:
        raise ValueError(f"unknown family {family!r}; allowed: {FAMILIES + FUSED_ONLY_FAMILIES}")
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _randomize_norms(model: Any) -> None:
    """Random RMS norm weights (they start at 1, or 0 in Gemma's ``1 + weight``), so a graph
    that mixed the norms up, or dropped one, could not match transformers."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)


def _fused_only_model(family: str, common: dict[str, Any]) -> Any:
    """A tiny random model of a family only the fused graph exports (torch seeded by caller)."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    shape: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    if family == "qwen3":  # layer 1 of 2 slides (layers from max_window_layers on)
        config = Qwen3Config(
            num_hidden_layers=2, head_dim=16, tie_word_embeddings=True, use_sliding_window=True,
            sliding_window=8, max_window_layers=1, **shape, **common,
        )  # fmt: skip
        return Qwen3ForCausalLM(config)
    if family == "mistral":  # head_dim 32 != hidden / heads, as Mistral-Nemo has it
        config = MistralConfig(
            num_hidden_layers=2, head_dim=32, sliding_window=8, tie_word_embeddings=False,
            **shape, **common,
        )  # fmt: skip
        return MistralForCausalLM(config)
    if family == "phi3":  # long-rope scaling (the short factors below 128 positions), a
        # partial rotary embedding as Phi-4-mini has, a sliding window as Phi-3-mini-4k has
        # (head_dim 64, 48 of them rotated: GroupQueryAttention wants half a multiple of 8)
        half_rotary = 64 * 3 // 4 // 2
        shape = {**shape, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
                 "max_position_embeddings": 512}  # fmt: skip
        config = Phi3Config(
            num_hidden_layers=2, original_max_position_embeddings=128, partial_rotary_factor=0.75,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.25 * j for j in range(half_rotary)],
                "long_factor": [2.0 + 0.5 * j for j in range(half_rotary)],
            },
            sliding_window=8, tie_word_embeddings=False, **shape, **common,
        )  # fmt: skip
        return Phi3ForCausalLM(config)
    # gemma3_text: sliding and global layers (own rotary bases, linear scaling on global),
    # head_dim 32 != hidden / heads, query_pre_attn_scalar != head_dim, a final logit soft
    # cap (the attention soft cap needs eager attention in transformers: its own test).
    # Gemma's own initializer range: at 0.3 the sqrt(hidden)-scaled tied embedding swamps
    # every layer and greedy output repeats the last prompt token.
    common = {**common, "initializer_range": 0.02}
    config = Gemma3TextConfig(
        num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, final_logit_softcapping=30.0,
        tie_word_embeddings=True, **shape, **common,
    )  # fmt: skip
    return Gemma3ForCausalLM(config)
