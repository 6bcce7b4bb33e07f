"""Token steps to text chunks: the streaming detokenizer, then stop strings.

One :class:`TextChunker` per generated sequence. Text that could begin a stop string is
held back until resolved, and a multi-byte character split across tokens is never
emitted half-way.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

from edge_slm.generation.results import Chunk, TokenStep
from edge_slm.text.detokenizer import StreamingDetokenizer
from edge_slm.text.stops import FinishReason, StopStringMatcher


class TextChunker:
    """One sequence's text: streaming detokenizer, then stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.matcher = StopStringMatcher(stop) if stop else None
        self.pending: list[TokenStep] = []

    def push(self, step: TokenStep) -> Chunk | None:
        """Add a token; returns a chunk when there is text to show or the row finished."""
        self.pending.append(step)
        piece = self.detokenizer.add_token(step.token_id)
        finished = step.finish_reason is not None
        if finished:
            piece += self.detokenizer.finalize()
        if self.matcher is not None:
            result = self.matcher.push(piece)
            if result.stopped:
                return Chunk(
                    result.text, self._take(), FinishReason.STOP_STRING, result.stop_string
                )
            piece = result.text + (self.matcher.flush() if finished else "")
        if finished:
            stop = step.token_id if step.finish_reason == FinishReason.STOP_TOKEN else None
            return Chunk(piece, self._take(), step.finish_reason, stop)
        return Chunk(piece, self._take()) if piece else None

    def _take(self) -> tuple[TokenStep, ...]:
        steps, self.pending = tuple(self.pending), []
        return steps
