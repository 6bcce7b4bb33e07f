"""Streaming detokenizer: token ids in, final text out, one token at a time.

Decoding ids one by one and concatenating ``decode([id])`` is wrong for every real
tokenizer: byte-level BPE (GPT-2, SmolLM2, Qwen2) splits a multi-byte UTF-8 character over
several tokens, SentencePiece vocabularies fall back to ``<0xE4>``-style byte tokens and
drop the space of the first piece, WordPiece glues ``##`` continuations to the previous
word. Re-decoding the whole sequence after every token is right but costs O(n^2) over a
long generation.

:class:`StreamingDetokenizer` follows the offset scheme of HF text-generation-inference's
``decode_token``: it decodes a short *window* of recent ids, made of a few already emitted
*context* ids (so that the decoder sees the same left neighbour as in a full decode) and
the *pending* ids whose text is not yet out, and emits the part of the window's text that
is new. Text ending in U+FFFD (an incomplete character) is held back until the next
bytes arrive. The window slides forward whenever all of its text is out, so each step
decodes a handful of ids whatever the length of the generation.

The pieces joined equal ``tokenizer.decode(all_ids, skip_special_tokens=...)`` for every
decoder in which appending ids only appends text (ByteLevel, Metaspace, WordPiece,
ByteFallback + Fuse + Strip, BPE suffix, CTC). Two cases cannot be streamed exactly and
are documented rather than hidden: a decoder that rewrites earlier text when later ids
arrive, and byte sequences that are not valid UTF-8 under a ByteFallback decoder (it turns
a whole run of byte tokens into U+FFFD once any of them is invalid, after the valid start
of the run was already shown).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

from edge_slm.errors import InvalidArgumentError

if TYPE_CHECKING:
    import tokenizers

__all__ = ["MAX_PENDING_TOKENS", "StreamingDetokenizer"]

_REPLACEMENT = "\ufffd"
_MAX_TOKEN_ID = 2**32 - 1  # tokenizers stores ids as u32

# Pending ids after which held-back text is released even if it still ends in U+FFFD.
# A valid UTF-8 character has at most 4 bytes, so valid text resolves within a few ids;
# only a model emitting invalid byte sequences (or 32 ids in a row that each end inside a
# character) reaches this bound. It keeps the decoded window, hence the cost per token,
# bounded.
MAX_PENDING_TOKENS = 32


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces that are final when returned.

    Example::

        detok = StreamingDetokenizer(tokenizer)
        for token_id in generated_ids:
            print(detok.add_token(token_id), end="", flush=True)
        print(detok.finalize())

    Args:
        tokenizer: Any ``tokenizers.Tokenizer`` (byte-level BPE, SentencePiece-style
            Metaspace/byte-fallback, WordPiece, ...). Only ``decode``, ``id_to_token`` and
            ``get_added_tokens_decoder`` are used.
        skip_special_tokens: Drop special tokens from the text, as
            ``tokenizer.decode(..., skip_special_tokens=True)`` does.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = bool(skip_special_tokens)
        # decode() skips a token when its *string* is the content of a special added
        # token; the same test here lets skipped ids stay out of the window entirely, so
        # a skipped id can never become the window's first id and change how the decoder
        # treats the start of the window (e.g. Metaspace dropping a leading space).
        self._special_contents: frozenset[str] = frozenset(
            added.content
            for added in tokenizer.get_added_tokens_decoder().values()
            if added.special
        )
        self._tokens: list[int] = []
        self._window: list[int] = []  # context ids, then pending ids
        self._context_len = 0  # self._window[:self._context_len] is all emitted
        self._window_emitted = 0  # characters of decode(self._window) already emitted
        self._pieces: list[str] = []
        self._text_cache: str | None = ""  # "".join(self._pieces), None when stale

    def reset(self) -> None:
        """Forgets every token and all text, ready for a new sequence."""
        self._tokens = []
        self._window = []
        self._context_len = 0
        self._window_emitted = 0
        self._pieces = []
        self._text_cache = ""

    @property
    def tokens(self) -> list[int]:
        """Every id added since the last reset, in order (a copy)."""
        return list(self._tokens)

    @property
    def text(self) -> str:
        """All text returned so far by ``add_token`` and ``finalize`` (not the held part)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._pieces)
        return self._text_cache

    def add_token(self, token_id: int) -> str:
        """Adds one generated id and returns the text that became final with it.

        Args:
            token_id: A token id (a Python or numpy integer). Ids the tokenizer does not
                know decode to nothing, as in ``tokenizer.decode``.

        Returns:
            The new text, possibly ``""`` when the id only starts a multi-byte character,
            is a skipped special token, or adds no characters.

        Raises:
            InvalidArgumentError: ``token_id`` is not an integer in [0, 2**32).
        """
        token_id = _check_token_id(token_id)
        self._tokens.append(token_id)
        if not self._is_decoded(token_id):
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)
        complete = len(text.rstrip(_REPLACEMENT))
        if complete == len(text) or len(self._window) - self._context_len >= MAX_PENDING_TOKENS:
            # Every character of the window is complete: emit the rest, slide forward.
            piece = text[self._window_emitted :]
            self._slide()
        elif complete > self._window_emitted:
            # The characters before the trailing U+FFFD run can no longer change: only
            # the incomplete character at the end waits for its next bytes.
            piece = text[self._window_emitted : complete]
            self._window_emitted = complete
        else:
            piece = ""
        return self._emit(piece)

    def finalize(self) -> str:
        """Returns the held-back text (an incomplete character decodes as U+FFFD).

        Call it once the sequence has ended. Afterwards ``text`` equals
        ``tokenizer.decode(tokens, skip_special_tokens=...)``. More ids may still be added;
        they continue the same text.
        """
        if len(self._window) == self._context_len:
            return ""
        piece = self._decode(self._window)[self._window_emitted :]
        self._slide()
        return self._emit(piece)

    def _is_decoded(self, token_id: int) -> bool:
        """True if ``decode`` keeps this id: it is known and not a skipped special token."""
        token = self._tokenizer.id_to_token(token_id)
        if token is None:
            return False
        return not (self._skip_special_tokens and token in self._special_contents)

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
        return text

    def _slide(self) -> None:
        """Moves the window forward once all of its text is out.

        The ids that were pending become the new context: they start at a point where the
        previous text was complete (a character boundary, the end of a byte run), so the
        decoder treats what follows them exactly as in a full decode.
        """
        self._window = self._window[self._context_len :]
        self._context_len = len(self._window)
        self._window_emitted = len(self._decode(self._window))

    def _emit(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
            self._text_cache = None
        return piece


def _check_token_id(token_id: int) -> int:
    """Returns ``token_id`` as an ``int``, accepting numpy integers, rejecting the rest."""
    try:
        value = operator.index(token_id)
    except TypeError:
        raise InvalidArgumentError(
            f"token_id must be an integer in [0, 2**32), got {token_id!r} "
            f"of type {type(token_id).__name__}"
        ) from None
    if not 0 <= value <= _MAX_TOKEN_ID:
        raise InvalidArgumentError(f"token_id must be an integer in [0, 2**32), got {value}")
    return value
