"""OpenAI response objects: completions, their streamed chunks, logprobs, usage."""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

FINISH_REASONS = {
    "stop_token": "stop",
    "stop_string": "stop",
    "constraint": "stop",  # the response_format's JSON (regex, grammar) is complete
    "length": "length",
    "context_length": "length",
    # No OpenAI value means "out of time"; like "length", the answer was cut by a limit.
    "deadline": "length",
}


def finish_reason(reason: str | None) -> str | None:
    """The runtime's finish reason as OpenAI spells it."""
    return None if reason is None else FINISH_REASONS.get(reason, "stop")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class TokenText:
    """Token strings for logprobs (a token's own text; bytes as UTF-8 of that text)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = str(self.model.decode([token_id], skip_special_tokens=False))
            self._cache[token_id] = text
        return text


def chat_logprobs(steps: Sequence[Any], token_text: TokenText) -> dict[str, Any]:
    """``choices[i].logprobs`` of a chat completion: ``{"content": [...]}``."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": float(logprob), "bytes": list(text.encode("utf-8"))}

    content = []
    for step in steps:
        item = entry(step.token_id, step.logprob)
        item["top_logprobs"] = [entry(a.token_id, a.logprob) for a in step.top_logprobs]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(steps: Sequence[Any], token_text: TokenText, offset: int) -> dict[str, Any]:
    """``choices[i].logprobs`` of a text completion (the legacy shape)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for step in steps:
        text = token_text(step.token_id)
        tokens.append(text)
        token_logprobs.append(float(step.logprob))
        tops.append({token_text(a.token_id): float(a.logprob) for a in step.top_logprobs})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def embedding_value(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as floats, or base64 of little-endian float32 (what the openai client asks)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
