"""Tiny random encoders (BERT, DistilBERT, RoBERTa) built locally, for tests (no network).

Each builder writes a complete HF folder: a config, random safetensors weights and a
tokenizer trained here (WordPiece with BERT's ``[CLS] a [SEP] b [SEP]`` template for
BERT/DistilBERT; byte-level BPE with RoBERTa's ``<s> a </s></s> b </s>`` for RoBERTa).
``initializer_range=0.3`` spreads the logits so parity and agreement tests mean
something. :func:`build_sentence_transformer` adds the sentence-transformers files
(``modules.json``, ``1_Pooling/config.json``, ``2_Normalize``) around a tiny BERT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "I loved this film, the acting was wonderful and the story moving.",
    "Terrible service, the food was cold and the waiter was rude.",
    "Where is the nearest train station? How do I get to the airport?",
    "Please reset my password, I cannot log in to my account.",
    "What time does the museum open on Sunday morning?",
    "Café, naïve, über, 東京 and 😀 are words too.",
    "Small language models run on a Raspberry Pi, offline kiosks and embedded boxes.",
]
ENCODERS = ("bert", "distilbert", "roberta")
LABELS = ("negative", "neutral", "positive")
MAX_POSITIONS = 64


def build_wordpiece_tokenizer(vocab_size: int = 300) -> Any:
    """A BERT-style WordPiece tokenizer (lower-casing, [CLS]/[SEP] template, pairs)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MAX_POSITIONS,
    )


def build_bpe_tokenizer(vocab_size: int = 400) -> Any:
    """A RoBERTa-style byte-level BPE tokenizer (``<s> a </s></s> b </s>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.post_processor = processors.RobertaProcessing(
        sep=("</s>", tok.token_to_id("</s>")),
        cls=("<s>", tok.token_to_id("<s>")),
        trim_offsets=True,
        add_prefix_space=False,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        cls_token="<s>",
        sep_token="</s>",
        mask_token="<mask>",
        model_max_length=MAX_POSITIONS - 2,
    )


def _config(family: str, tokenizer: Any, **extra: Any) -> Any:
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "initializer_range": 0.3,
        "pad_token_id": tokenizer.pad_token_id,
        **extra,
    }
    if family == "bert":
        return BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=MAX_POSITIONS,
            **common,
        )
    if family == "distilbert":
        return DistilBertConfig(
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=MAX_POSITIONS,
            **common,
        )
    if family == "roberta":
        return RobertaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=MAX_POSITIONS,
            type_vocab_size=1,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **common,
        )
    raise ValueError(f"unknown encoder family {family!r}; allowed: {ENCODERS}")


def build_classifier(
    family: str,
    folder: Path,
    *,
    multi_label: bool = False,
    labels: tuple[str, ...] = LABELS,
    seed: int = 0,
) -> Path:
    """Write a tiny random ``family`` sequence classifier with ``labels`` to ``folder``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    tokenizer = build_bpe_tokenizer() if family == "roberta" else build_wordpiece_tokenizer()
    config = _config(
        family,
        tokenizer,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "MISC")


def build_token_classifier(
    family: str, folder: Path, *, labels: tuple[str, ...] = NER_LABELS, seed: int = 0
) -> Path:
    """Write a tiny random ``family`` token classifier (NER tags ``labels``) to ``folder``.

    The bias of the first label (``O``) is raised so that it wins on about 40% of the
    corpus's tokens: entities then have gaps, as in real NER, and the default
    ``ignore_labels=["O"]`` has something to drop.
    """
    import torch
    from transformers import AutoModelForTokenClassification

    tokenizer = build_bpe_tokenizer() if family == "roberta" else build_wordpiece_tokenizer()
    config = _config(
        family,
        tokenizer,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_config(config)
    model.eval()
    encoding = tokenizer(CORPUS, padding=True, return_tensors="pt")
    if family == "distilbert":
        encoding.pop("token_type_ids")
    with torch.no_grad():
        logits = model(**encoding).logits[encoding["attention_mask"].bool()]  # [tokens, labels]
        margin = logits[:, 1:].max(dim=-1).values - logits[:, 0]
        model.classifier.bias[0] += torch.quantile(margin, 0.4)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_sentence_transformer(
    folder: Path, *, pooling: str = "mean", normalize: bool = True, seed: int = 0
) -> Path:
    """Write a tiny random BERT with sentence-transformers pooling/normalize files."""
    import torch
    from transformers import BertModel

    tokenizer = build_wordpiece_tokenizer()
    torch.manual_seed(seed)
    model = BertModel(_config("bert", tokenizer), add_pooling_layer=False)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    return folder
