"""A conversation: the per-caller state of generation over a shared model.

A :class:`Conversation` owns everything that changes while text is generated: its KV
cache (a :class:`~edge_slm.generation.kv_slots.KVState`), and per call the random
generator, the sampling history, the streaming detokenizer and the stop-string state.
The model it runs on (:class:`~edge_slm.generation.model.TextGenerator`) is shared and
never changes during generation (the split onnxruntime-genai makes between ``Model``
and ``Generator``).

Concurrency contract: one conversation serves one call at a time (a second call while a
stream is still open raises :class:`~edge_slm.errors.BusyError`); any number of
conversations may generate at once, from any threads, on one model, and several
streams may be advanced in turn on one thread.

Prefix reuse: with ``prefix_reuse`` (the default), a call keeps the KV cache of the
longest prefix its prompt shares with what the conversation computed before (earlier
chat turns, a fixed system prompt) or with a prefix cache loaded into the model, and
computes only the rest. On fp32 graphs the result equals computing the whole prompt;
on quantized graphs the kernels compute a prompt in one pass slightly differently from
token by token, so a reused prefix can change late digits of the logits and, rarely,
a sampled token. A fresh conversation, or ``prefix_reuse=False``, always gives the
same tokens for the same inputs and seed, whatever ran before on the model.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

from edge_slm.errors import InvalidArgumentError
from edge_slm.generation.chunks import TextChunker
from edge_slm.generation.kv_slots import KVState
from edge_slm.generation.loop import fit_context, generate_step
from edge_slm.generation.options import DecodeConfig, GenerationOptions
from edge_slm.generation.prefix_cache import shared_length
from edge_slm.generation.results import (
    Chunk,
    GenerationResult,
    RunStats,
    TokenStep,
    assemble_result,
)
from edge_slm.generation.tools import Tool, ToolUse, check_no_tool_messages
from edge_slm.text.inputs import check_token_ids

if TYPE_CHECKING:
    from edge_slm.generation.model import TextGenerator

ToolList = Sequence[Mapping[str, Any] | Tool]
"""OpenAI's ``tools`` list (``{"type": "function", "function": {...}}`` dicts) or
:class:`~edge_slm.generation.tools.Tool` objects."""


class Conversation:
    """Generation state of one caller over a shared :class:`TextGenerator`.

    Made by :meth:`TextGenerator.conversation`. Use it as a context manager, or call
    :meth:`close`, to give its KV memory back at once (otherwise it goes when the
    object is garbage-collected).
    """

    def __init__(self, model: TextGenerator, prefix_reuse: bool = True) -> None:
        if not isinstance(prefix_reuse, bool):
            raise InvalidArgumentError(f"prefix_reuse must be True or False, got {prefix_reuse!r}")
        self.model = model
        self.prefix_reuse = prefix_reuse
        """Whether calls reuse the KV of a prefix computed before (see the module doc)."""
        self._state = KVState()
        self._closed = False
        self._release = weakref.finalize(self, model.backend.release, self._state)

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Conversation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Free the KV memory; later calls raise."""
        self._closed = True
        self._release()

    def reset(self) -> None:
        """Forget the computed prefix (the next call computes its prompt from scratch)."""
        if self._state.busy:
            raise InvalidArgumentError("cannot reset a conversation while it is generating")
        self._state.forget()

    @property
    def cached_tokens(self) -> tuple[int, ...]:
        """The token ids whose KV this conversation holds (for prefix reuse)."""
        return tuple(self._state.tokens)

    # ------------------------------------------------------------- layer 1: tokens
    def generate_tokens(
        self, prompt_ids: Sequence[int], options: GenerationOptions | None = None, **overrides: Any
    ) -> Iterator[TokenStep]:
        """Yield generated tokens one by one; the last one carries the finish reason."""
        config = self.model.decode_config(GenerationOptions.build(options, overrides))
        yield from self._tokens(list(prompt_ids), config, RunStats())

    def _tokens(
        self, prompt_ids: list[int], config: DecodeConfig, stats: RunStats
    ) -> Iterator[TokenStep]:
        if self._closed:
            raise InvalidArgumentError("this conversation is closed")
        model = self.model
        ids, budget = fit_context(
            check_token_ids(prompt_ids, model.manifest.vocab_size),
            config,
            model.manifest.context_length,
            model.manifest.special_tokens.bos_token_id,
        )
        backend, state = model.backend, self._state
        backend.begin(state)
        try:
            self._reuse_prefix(ids)
            yield from generate_step(backend, state, ids, budget, config, stats)
        finally:
            backend.finish(state)

    def _reuse_prefix(self, ids: list[int]) -> None:
        """Cut the KV state to what it shares with ``ids`` (or load a saved prefix).

        At least one prompt token is left to compute: its logits are needed.
        """
        state, backend = self._state, self.model.backend
        limit = len(ids) - 1
        if not self.prefix_reuse:
            backend.truncate(state, 0)
            return
        own = shared_length(state.tokens, ids, limit)
        saved, saved_len = self.model.best_saved_prefix(ids, limit)
        if saved is not None and saved_len > own:
            keys = [k[:, :, :saved_len] for k in saved.keys]
            values = [v[:, :, :saved_len] for v in saved.values]
            backend.load(state, keys, values, saved.tokens[:saved_len])
            return
        backend.truncate(state, own)

    # --------------------------------------------------------------- layer 2: text
    def stream(
        self, prompt: str, options: GenerationOptions | None = None, **overrides: Any
    ) -> Iterator[Chunk]:
        """Yield text pieces as they are decoded; the last chunk has the finish reason.

        Text that might begin a stop string is held back until it is resolved; the
        stop string itself is never returned. Closing the iterator early ends the
        generation.
        """
        config = self.model.decode_config(GenerationOptions.build(options, overrides))
        yield from self._chunks(self.model.encode(prompt), config, RunStats())

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        options: GenerationOptions | None = None,
        *,
        tools: ToolList | None = None,
        tool_choice: object = "auto",
        parallel_tool_calls: bool = True,
        tool_format: str = "auto",
        **overrides: Any,
    ) -> Iterator[Chunk]:
        """Stream the answer to a conversation's messages.

        With ``tools`` (see :meth:`chat`) the answer's text streams as usual (a call's
        text too) and the last chunk carries the parsed ``tool_calls``.
        """
        use = self._tool_use(tools, tool_choice, parallel_tool_calls, tool_format)
        config = self._chat_config(options, overrides, use)
        yield from self._chunks(self._chat_ids(messages, use), config, RunStats(), use)

    def _tool_use(
        self, tools: ToolList | None, tool_choice: object, parallel: bool, tool_format: str
    ) -> ToolUse | None:
        if tools is None:
            if tool_choice not in (None, "auto", "none"):
                raise InvalidArgumentError(f"tool_choice={tool_choice!r} needs tools")
            return None
        return ToolUse.resolve(self.model, tools, tool_choice, parallel, tool_format)

    def _chat_config(
        self, options: GenerationOptions | None, overrides: Mapping[str, Any], use: ToolUse | None
    ) -> DecodeConfig:
        built = GenerationOptions.build(options, overrides)
        if use is not None and use.constraint is not None:
            if built.constraint is not None:
                raise InvalidArgumentError(
                    "a chat with tools sets the constraint itself; pass tool_choice='none' "
                    "to constrain a text answer"
                )
            built = replace(built, constraint=use.constraint)
        return self.model.decode_config(built)

    def _chat_ids(self, messages: Sequence[Mapping[str, Any]], use: ToolUse | None) -> list[int]:
        if use is not None:
            return use.prompt_ids(self.model, messages)
        check_no_tool_messages(messages)
        return self.model.chat_ids(messages)

    def _chunks(
        self,
        prompt_ids: list[int],
        config: DecodeConfig,
        stats: RunStats,
        tools: ToolUse | None = None,
    ) -> Iterator[Chunk]:
        text = TextChunker(self.model.tokenizer, config.stop_strings)
        answer: list[str] = []  # with tools: the whole answer, parsed for calls at its end
        for step in self._tokens(prompt_ids, config, stats):
            chunk = text.push(step)
            if chunk is None:
                continue
            if tools is not None:
                answer.append(chunk.text)
                if chunk.finish_reason is not None:
                    calls = tools.calls("".join(answer), chunk.finish_reason)
                    chunk = replace(chunk, tool_calls=calls)
            yield chunk
            if chunk.finish_reason is not None:
                return

    # ------------------------------------------------------------ layer 3: result
    def generate(
        self, prompt: str, options: GenerationOptions | None = None, **overrides: Any
    ) -> GenerationResult:
        """Generate a completion of ``prompt`` and return it whole, with timings."""
        config = self.model.decode_config(GenerationOptions.build(options, overrides))
        return self._collect(self.model.encode(prompt), config)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        options: GenerationOptions | None = None,
        *,
        tools: ToolList | None = None,
        tool_choice: object = "auto",
        parallel_tool_calls: bool = True,
        tool_format: str = "auto",
        **overrides: Any,
    ) -> GenerationResult:
        """Answer a conversation (``[{"role": ..., "content": ...}, ...]``).

        Pass the whole conversation each time: the earlier turns this conversation
        computed come from its KV cache, not recomputed.

        With ``tools`` (OpenAI's function tools), the messages may also hold tool
        results (``{"role": "tool", "tool_call_id": ..., "content": ...}``) and
        assistant ``tool_calls``; the answer is constrained by ``tool_choice``
        (``"auto"``, ``"required"``, ``{"type": "function", "function": {"name": ...}}``
        or ``"none"``) and the result's ``tool_calls`` are the calls it makes, each valid
        against its tool's parameters schema. ``parallel_tool_calls``: one or more calls
        per answer, or exactly one; ``tool_format``: ``"auto"``, ``"template"`` or
        ``"plain"`` (:meth:`edge_slm.generation.tools.ToolUse.resolve`,
        docs/structured-output.md). The ``constraint`` option is then the tools' own
        (allowed only with ``tool_choice="none"``).
        """
        use = self._tool_use(tools, tool_choice, parallel_tool_calls, tool_format)
        config = self._chat_config(options, overrides, use)
        return self._collect(self._chat_ids(messages, use), config, use)

    def _collect(
        self, prompt_ids: list[int], config: DecodeConfig, tools: ToolUse | None = None
    ) -> GenerationResult:
        start = time.perf_counter()
        stats = RunStats()
        chunks = list(self._chunks(prompt_ids, config, stats, tools))
        end = time.perf_counter()
        return assemble_result(chunks, stats, self.model.load_s, start, end, config.logprobs > 0)
