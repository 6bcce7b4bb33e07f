"""Tests of edge_slm.text.detokenizer on tiny tokenizers trained in the test session.

Four vocabularies, one per decoder family a small language model ships with:

- ``byte_level``: GPT-2 / SmolLM2 / Qwen2 style byte-level BPE, with a vocabulary so small
  that emoji and CJK characters are split over several tokens;
- ``llama``: Llama-2 style SentencePiece BPE (``▁`` normalizer, byte fallback, decoder
  Replace + ByteFallback + Fuse + Strip);
- ``metaspace``: SentencePiece BPE with the Metaspace pre-tokenizer and decoder, byte
  fallback;
- ``wordpiece``: BERT style WordPiece (``##`` continuations, cleanup of spaces before
  punctuation).

The reference is always ``tokenizer.decode(all_ids, skip_special_tokens=...)``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from edge_slm.errors import InvalidArgumentError
from edge_slm.text.detokenizer import MAX_PENDING_TOKENS, StreamingDetokenizer

FFFD = "\ufffd"

_CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny corpus for a tiny tokenizer!",
    "Don't stop: it's 3.14 or 42, isn't it? Yes, 1,000,000 times.",
    "A café, a naïve façade, a résumé; déjà vu in São Paulo.",
    "Numbers 0123456789 and more text about small language models.",
    "中文 text, 中文 again.",
]
# Rare characters (seen once) that the SentencePiece vocabularies leave to byte fallback.
_RARE_LINE = "中文字符 日本語 한국어 emoji 😀 👍 tab\there"
CORPUS = [*_CORPUS_LINES * 8, _RARE_LINE]

SPECIALS = {
    "byte_level": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama": ["<unk>", "<s>", "</s>"],
    "metaspace": ["<unk>", "<s>", "</s>"],
    "wordpiece": ["[UNK]", "[CLS]", "[SEP]", "[PAD]"],
}
KINDS = list(SPECIALS)

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, inner    runs\t\ttabs\n\nnew lines and trailing  ",
    "café naïve résumé façade Ærøskøbing Straße",
    "e\u0301 a\u0300 o\u0308\u0304 combining marks: n\u0303o",
    "中文字符和日本語のテキスト，한국어 텍스트",
    "emoji 😀 family 👨\u200d👩\u200d👧\u200d👦 flags 🇯🇵🇫🇷 skin 👍🏽 keycap 1\ufe0f\u20e3",
    "👩🏽\u200d🚀🏳\ufe0f\u200d🌈🇺🇳",
    "digits 0123456789, 3.14159 and 1,000,000",
    "mixed: naïve😀中文 x\u0301 42\t end ",
    "Don't stop: it's fine , isn't it ? ' quoted '",
    "a",
    " ",
    "",
]


def _bpe_with_byte_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """Adds the 256 ``<0xNN>`` tokens byte fallback needs (the trainer does not)."""
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


def _frequent_char_count() -> int:
    """How many characters of the corpus are not only in the rare line."""
    return len(set("".join(_CORPUS_LINES)))


def _train(kind: str) -> Tokenizer:
    special = SPECIALS[kind]
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=320,  # 256 bytes + 3 specials + ~60 merges: emoji and CJK split
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=special,
            show_progress=False,
        )
        tok.train_from_iterator(CORPUS, trainer)
        return tok
    if kind in ("llama", "metaspace"):
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        if kind == "llama":
            tok.normalizer = normalizers.Sequence(
                [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
            )
            tok.decoder = decoders.Sequence(
                [
                    decoders.Replace("▁", " "),
                    decoders.ByteFallback(),
                    decoders.Fuse(),
                    decoders.Strip(" ", 1, 0),
                ]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
            tok.decoder = decoders.Sequence(
                [
                    decoders.ByteFallback(),
                    decoders.Metaspace(replacement="▁", prepend_scheme="always"),
                ]
            )
        trainer = trainers.BpeTrainer(
            vocab_size=200,
            special_tokens=special,
            limit_alphabet=_frequent_char_count(),  # the rest falls back to bytes
            show_progress=False,
        )
        tok.train_from_iterator(CORPUS, trainer)
        return _bpe_with_byte_tokens(tok)
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        trainer = trainers.WordPieceTrainer(
            vocab_size=300, special_tokens=special, show_progress=False
        )
        tok.train_from_iterator(CORPUS, trainer)
        return tok
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def tokenizers_by_kind() -> dict[str, Tokenizer]:
    start = time.perf_counter()
    built = {kind: _train(kind) for kind in KINDS}
    assert time.perf_counter() - start < 2.0
    return built


def _special_id(tok: Tokenizer, kind: str, index: int) -> int:
    token_id = tok.token_to_id(SPECIALS[kind][index])
    assert token_id is not None
    return int(token_id)


def _ids_with_specials(tok: Tokenizer, kind: str, text: str) -> list[int]:
    """Encodes ``text`` with special tokens at the start, in the middle and at the end.

    The middle is a character boundary of the text: special tokens between the bytes of
    one character would make the text invalid UTF-8.
    """
    middle = len(text) // 2
    head = tok.encode(text[:middle], add_special_tokens=False).ids
    tail = tok.encode(text[middle:], add_special_tokens=False).ids
    first, second = _special_id(tok, kind, 1), _special_id(tok, kind, 2)
    return [first, *head, second, first, *tail, second]


def _stream(detok: StreamingDetokenizer, ids: Iterable[int]) -> tuple[list[str], str]:
    """Adds ``ids`` one by one; returns the pieces of add_token and what finalize gave."""
    pieces = [detok.add_token(token_id) for token_id in ids]
    return pieces, detok.finalize()


def _check_stream(tok: Tokenizer, ids: Sequence[int], skip_special_tokens: bool) -> list[str]:
    detok = StreamingDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    pieces, tail = _stream(detok, ids)
    expected = tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) + tail == expected
    assert detok.text == expected
    assert detok.tokens == list(ids)
    if FFFD not in expected:
        assert not any(FFFD in piece for piece in [*pieces, tail])
        # Valid text is complete after its last token: nothing is left for finalize.
        assert tail == ""
    return pieces


# --- the vocabularies really exercise what they are meant to -----------------------------


def test_byte_level_vocab_splits_emoji_and_cjk_inside_characters(
    tokenizers_by_kind: dict[str, Tokenizer],
) -> None:
    tok = tokenizers_by_kind["byte_level"]
    for text in ["👨\u200d👩\u200d👧\u200d👦", "🇯🇵", "中文字符", "한국어"]:
        ids = tok.encode(text).ids
        assert len(ids) > len(text)
        # At least one token ends inside a character: alone it decodes to U+FFFD.
        assert any(FFFD in tok.decode([i]) for i in ids), text


def test_sentencepiece_vocabs_fall_back_to_bytes(
    tokenizers_by_kind: dict[str, Tokenizer],
) -> None:
    for kind in ("llama", "metaspace"):
        tok = tokenizers_by_kind[kind]
        for text in ["😀", "👨\u200d👩\u200d👧", "字", "a\tb"]:
            tokens = tok.encode(text).tokens
            assert any(t.startswith("<0x") for t in tokens), (kind, text, tokens)


def test_wordpiece_vocab_has_continuations(tokenizers_by_kind: dict[str, Tokenizer]) -> None:
    tokens = tokenizers_by_kind["wordpiece"].encode("jumping résumés tokenizers").tokens
    assert any(t.startswith("##") for t in tokens)


# --- streamed pieces joined equal decode(all ids) ----------------------------------------


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("kind", KINDS)
def test_stream_equals_decode(
    tokenizers_by_kind: dict[str, Tokenizer], kind: str, text: str, skip_special_tokens: bool
) -> None:
    tok = tokenizers_by_kind[kind]
    _check_stream(tok, tok.encode(text, add_special_tokens=False).ids, skip_special_tokens)
    _check_stream(tok, _ids_with_specials(tok, kind, text), skip_special_tokens)


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_skipped_or_kept(
    tokenizers_by_kind: dict[str, Tokenizer], kind: str
) -> None:
    tok = tokenizers_by_kind[kind]
    ids = _ids_with_specials(tok, kind, "Hello world, café 😀")
    skipped = "".join(_check_stream(tok, ids, skip_special_tokens=True))
    kept = "".join(_check_stream(tok, ids, skip_special_tokens=False))
    for special in SPECIALS[kind][1:3]:
        assert special not in skipped
        assert special in kept


def test_multibyte_character_held_until_complete(
    tokenizers_by_kind: dict[str, Tokenizer],
) -> None:
    tok = tokenizers_by_kind["byte_level"]
    ids = tok.encode("a😀").ids
    detok = StreamingDetokenizer(tok)
    pieces = [detok.add_token(i) for i in ids]
    assert pieces[0] == "a"
    assert len(ids) > 2  # the emoji takes several tokens ...
    assert all(p == "" for p in pieces[1:-1])  # ... held back until its last byte
    assert pieces[-1] == "😀"


def test_text_before_incomplete_character_is_not_delayed(
    tokenizers_by_kind: dict[str, Tokenizer],
) -> None:
    """A token holding the end of one character and the start of the next releases the
    first character at once."""
    tok = tokenizers_by_kind["byte_level"]
    byte_to_char = {b: c for b, c in zip(range(256), _bytes_to_unicode(), strict=True)}
    # A token made of: the last byte of "中" (E4 B8 AD) + the first byte of "文" (E6 96 87).
    straddling = byte_to_char[0xAD] + byte_to_char[0xE6]
    tok = Tokenizer.from_str(tok.to_str())
    tok.add_tokens([straddling])  # a non-special added token, kept by decode
    ids = [tok.token_to_id(byte_to_char[0xE4]), tok.token_to_id(byte_to_char[0xB8])]
    ids += [tok.token_to_id(straddling), tok.token_to_id(byte_to_char[0x96])]
    ids += [tok.token_to_id(byte_to_char[0x87])]
    assert tok.decode(ids) == "中文"
    detok = StreamingDetokenizer(tok)
    assert [detok.add_token(i) for i in ids] == ["", "", "中", "", "文"]


def test_finalize_flushes_incomplete_character(
    tokenizers_by_kind: dict[str, Tokenizer],
) -> None:
    tok = tokenizers_by_kind["byte_level"]
    ids = tok.encode("ok 😀").ids[:-1]  # the emoji's last token never comes
    detok = StreamingDetokenizer(tok)
    pieces, tail = _stream(detok, ids)
    assert "".join(pieces) == "ok "
    assert tail == tok.decode(ids)[len("ok ") :]
    assert tail.endswith(FFFD)
    assert detok.text == tok.decode(ids)
    assert detok.finalize() == ""  # nothing left


def test_metaspace_space_after_skipped_special_token(
    tokenizers_by_kind: dict[str, Tokenizer],
) -> None:
    """A skipped special token between two words must not swallow the space, which the
    decoder drops only at the very start of the text."""
    for kind in ("llama", "metaspace"):
        tok = tokenizers_by_kind[kind]
        eos = _special_id(tok, kind, 2)
        first, second = tok.encode("Hello").ids, tok.encode("world").ids  # "▁world"
        ids = [*first, eos, eos, *second, eos, *first]
        pieces = _check_stream(tok, ids, skip_special_tokens=True)
        assert "".join(pieces) == tok.decode(ids) == "Hello world Hello"


def test_wordpiece_continuations_and_cleanup(tokenizers_by_kind: dict[str, Tokenizer]) -> None:
    tok = tokenizers_by_kind["wordpiece"]
    ids = tok.encode("jumping tokenizers , isn't it ? yes .").ids
    pieces = _check_stream(tok, ids, skip_special_tokens=True)
    assert "".join(pieces).startswith("jumping tokenizers, isn")


def test_unknown_ids_decode_to_nothing_like_decode(
    tokenizers_by_kind: dict[str, Tokenizer],
) -> None:
    for kind in KINDS:
        tok = tokenizers_by_kind[kind]
        unknown = tok.get_vocab_size() + 10
        ids = [*tok.encode("Hello").ids, unknown, *tok.encode(" world").ids]
        _check_stream(tok, ids, skip_special_tokens=True)


def test_numpy_integer_ids(tokenizers_by_kind: dict[str, Tokenizer]) -> None:
    tok = tokenizers_by_kind["byte_level"]
    ids = np.array(tok.encode("Hello 中文").ids, dtype=np.int64)
    detok = StreamingDetokenizer(tok)
    pieces, tail = _stream(detok, ids)
    assert "".join(pieces) + tail == "Hello 中文"
    assert detok.tokens == ids.tolist()
    assert all(type(t) is int for t in detok.tokens)


@pytest.mark.parametrize("bad", [-1, 2**32, 1.0, "5", None])
def test_invalid_token_id(tokenizers_by_kind: dict[str, Tokenizer], bad: Any) -> None:
    detok = StreamingDetokenizer(tokenizers_by_kind["byte_level"])
    with pytest.raises(InvalidArgumentError, match="token_id must be an integer") as info:
        detok.add_token(bad)
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)
    assert detok.tokens == []


def test_reset(tokenizers_by_kind: dict[str, Tokenizer]) -> None:
    tok = tokenizers_by_kind["byte_level"]
    detok = StreamingDetokenizer(tok)
    _stream(detok, tok.encode("first 中").ids[:-1])  # stop inside a character
    detok.reset()
    assert detok.tokens == []
    assert detok.text == ""
    ids = tok.encode("second 文").ids
    pieces, tail = _stream(detok, ids)
    assert "".join(pieces) + tail == "second 文"
    assert detok.text == "second 文"


def test_tokens_property_is_a_copy(tokenizers_by_kind: dict[str, Tokenizer]) -> None:
    detok = StreamingDetokenizer(tokenizers_by_kind["byte_level"])
    detok.add_token(5)
    detok.tokens.append(6)
    assert detok.tokens == [5]


# --- the cost per token stays small ------------------------------------------------------


class _CountingTokenizer:
    """Wraps a tokenizer and records the length of every id list given to decode."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.decoded_lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded_lengths.append(len(ids))
        text: str = self.inner.decode(ids, skip_special_tokens=skip_special_tokens)
        return text

    def id_to_token(self, token_id: int) -> str | None:
        token: str | None = self.inner.id_to_token(token_id)
        return token

    def get_added_tokens_decoder(self) -> dict[int, Any]:
        added: dict[int, Any] = self.inner.get_added_tokens_decoder()
        return added


@pytest.mark.parametrize("kind", KINDS)
def test_decode_window_stays_small_on_long_generations(
    tokenizers_by_kind: dict[str, Tokenizer], kind: str
) -> None:
    tok = tokenizers_by_kind[kind]
    ids = _ids_with_specials(tok, kind, " ".join(TEXTS) * 10)
    assert len(ids) > 1500
    counting = _CountingTokenizer(tok)
    detok = StreamingDetokenizer(counting)  # duck-typed: decode, id_to_token, ...
    pieces, tail = _stream(detok, ids)
    assert "".join(pieces) + tail == tok.decode(ids)
    assert max(counting.decoded_lengths) <= 12
    assert len(counting.decoded_lengths) <= 2 * len(ids) + 1


def test_invalid_byte_run_keeps_window_bounded(
    tokenizers_by_kind: dict[str, Tokenizer],
) -> None:
    """A degenerate model repeating the lead byte of a 3-byte character never completes
    a character; the held text is released after MAX_PENDING_TOKENS ids."""
    tok = tokenizers_by_kind["byte_level"]
    lead_byte = tok.token_to_id(_bytes_to_unicode()[0xE4])
    ids = [lead_byte] * 300
    counting = _CountingTokenizer(tok)
    detok = StreamingDetokenizer(counting)  # duck-typed: decode, id_to_token, ...
    pieces, tail = _stream(detok, ids)
    assert "".join(pieces) + tail == tok.decode(ids) == FFFD * 300
    assert max(counting.decoded_lengths) <= 2 * MAX_PENDING_TOKENS
    assert sum(len(p) for p in pieces[: 2 * MAX_PENDING_TOKENS]) > 0  # released early


# --- property tests ----------------------------------------------------------------------

_HYPOTHESIS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(list("  \t\n😀👍🏽🇯🇵中文字é\u0301\u200d\ufe0f0123456789")),
    ),
    max_size=40,
)


@_HYPOTHESIS
@given(text=_TEXT, skip_special_tokens=st.booleans(), kind=st.sampled_from(KINDS))
def test_random_text_stream_equals_decode(
    tokenizers_by_kind: dict[str, Tokenizer], text: str, skip_special_tokens: bool, kind: str
) -> None:
    tok = tokenizers_by_kind[kind]
    _check_stream(tok, tok.encode(text, add_special_tokens=False).ids, skip_special_tokens)
    _check_stream(tok, _ids_with_specials(tok, kind, text), skip_special_tokens)


@_HYPOTHESIS
@given(data=st.data(), skip_special_tokens=st.booleans())
def test_random_byte_level_ids_stream_equals_decode(
    tokenizers_by_kind: dict[str, Tokenizer], data: st.DataObject, skip_special_tokens: bool
) -> None:
    """Any id sequence, invalid UTF-8 included, streams exactly with a ByteLevel decoder."""
    tok = tokenizers_by_kind["byte_level"]
    ids = data.draw(st.lists(st.integers(0, tok.get_vocab_size() - 1), max_size=60))
    _check_stream(tok, ids, skip_special_tokens)


@_HYPOTHESIS
@given(data=st.data(), skip_special_tokens=st.booleans(), kind=st.sampled_from(KINDS[1:]))
def test_random_ids_without_byte_tokens_stream_equals_decode(
    tokenizers_by_kind: dict[str, Tokenizer],
    data: st.DataObject,
    skip_special_tokens: bool,
    kind: str,
) -> None:
    """Random ids for the SentencePiece and WordPiece vocabularies. Byte-fallback tokens
    are left out: an invalid byte run turns wholly into U+FFFD, which no stream can show
    before the run ends (documented in the module)."""
    tok = tokenizers_by_kind[kind]
    allowed = [
        i
        for token, i in sorted(tok.get_vocab().items(), key=lambda item: item[1])
        if not (token.startswith("<0x") and len(token) == 6)
    ]
    ids = data.draw(st.lists(st.sampled_from(allowed), max_size=60))
    _check_stream(tok, ids, skip_special_tokens)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, as used by the ByteLevel decoder."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]
