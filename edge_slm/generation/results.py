"""What generation gives back, layer by layer (after mlx-lm's generate.py).

1. :class:`TokenStep`: one generated token, its log-probability and alternatives;
2. :class:`Chunk`: a piece of streamed text and the tokens behind it;
3. :class:`GenerationResult`: the whole text, token ids, finish reason and
   :class:`Timings`.

A chat with ``tools`` also gives back :class:`ToolCall` objects, parsed from the answer
(edge_slm/generation/tools.py), on the last chunk and on the result.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_slm.generation.sampling import TokenLogprob
from edge_slm.text.stops import FinishReason


@dataclass(frozen=True)
class Timings:
    """Where the time went, in seconds (load time is the bundle's, measured once)."""

    load_s: float
    prompt_tokens: int
    reused_prompt_tokens: int
    prompt_s: float
    generated_tokens: int
    decode_s: float

    @property
    def time_to_first_token_s(self) -> float:
        """Prompt processing plus the first sample."""
        return self.prompt_s

    @property
    def prompt_tokens_per_s(self) -> float:
        """Prompt tokens actually computed (reused ones excluded) per second."""
        computed = self.prompt_tokens - self.reused_prompt_tokens
        return computed / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding."""
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


@dataclass
class RunStats:
    """What the token loop measures for the result's timings (one per call)."""

    prompt_ids: list[int] = field(default_factory=list)
    reused_prompt_tokens: int = 0
    first_token_at: float | None = None


@dataclass(frozen=True)
class TokenStep:
    """One generated token (layer 1)."""

    token_id: int
    logprob: float
    top_logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class ToolCall:
    """A parsed tool call: the tool's name, its arguments (valid against the tool's
    parameters schema) and an id unique to this call."""

    name: str
    arguments: Mapping[str, Any] = field(hash=False)
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's ``tool_calls`` item (``arguments`` as a JSON string)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed text (layer 2); the last chunk carries the finish reason and,
    in a chat with tools, the calls the whole answer makes (``tool_calls``)."""

    text: str
    steps: tuple[TokenStep, ...]
    finish_reason: FinishReason | None = None
    stop: str | int | None = None
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The tokens decoded since the previous chunk."""
        return tuple(step.token_id for step in self.steps)


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation (layer 3).

    ``tool_calls``: in a chat with ``tools``, the calls the answer makes (empty for a
    text answer, or an answer cut short by ``length``/``deadline``, which stays text).
    """

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: FinishReason
    stop: str | int | None
    timings: Timings
    logprobs: list[TokenStep] = field(default_factory=list)
    tool_calls: tuple[ToolCall, ...] = ()


def assemble_result(
    chunks: list[Chunk],
    stats: RunStats,
    load_s: float,
    start: float,
    end: float,
    keep_logprobs: bool,
) -> GenerationResult:
    """A finished generation from its chunks (the last carries the finish reason)."""
    last = chunks[-1]
    assert last.finish_reason is not None
    steps = [step for chunk in chunks for step in chunk.steps]
    first = stats.first_token_at or end
    timings = Timings(
        load_s=load_s,
        prompt_tokens=len(stats.prompt_ids),
        reused_prompt_tokens=stats.reused_prompt_tokens,
        prompt_s=first - start,
        generated_tokens=len(steps),
        decode_s=end - first,
    )
    return GenerationResult(
        text="".join(chunk.text for chunk in chunks),
        token_ids=[step.token_id for step in steps],
        prompt_token_ids=stats.prompt_ids,
        finish_reason=last.finish_reason,
        stop=last.stop,
        timings=timings,
        logprobs=steps if keep_logprobs else [],
        tool_calls=last.tool_calls,
    )
