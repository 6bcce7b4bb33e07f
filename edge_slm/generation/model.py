"""The shared language model: graph, tokenizer, manifest and defaults (never mutated).

:class:`TextGenerator` is what :func:`edge_slm.load` returns for a text-generation
bundle. Its ``generate``/``stream``/``chat``/``stream_chat``/``generate_tokens`` calls
each run in a fresh :class:`~edge_slm.generation.conversation.Conversation`, so they
are safe from several threads at once and as several live iterators on one thread,
and the same inputs and seed give the same tokens whatever ran before (only a prefix
cache you load with :meth:`TextGenerator.load_prefix_cache` is reused). For multi-turn
chat with prefix reuse, keep a conversation: ``with model.conversation() as c: ...``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from edge_slm.bundle import Manifest, read_manifest, sha256_file
from edge_slm.bundle.semantics import check_decoder, load_tokenizer
from edge_slm.engine.overlap import build_beside
from edge_slm.engine.session import LoadOptions
from edge_slm.errors import InvalidArgumentError
from edge_slm.generation.backends import Backend, Capacity, make_backend
from edge_slm.generation.batch import generate_batch
from edge_slm.generation.constraints import compile_constraint
from edge_slm.generation.conversation import Conversation, ToolList
from edge_slm.generation.decoders import Decoder, open_decoder
from edge_slm.generation.kv_slots import KVState
from edge_slm.generation.options import DecodeConfig, GenerationOptions, resolve_options
from edge_slm.generation.prefix_cache import SavedPrefix, load_prefix, save_prefix
from edge_slm.generation.results import Chunk, GenerationResult, TokenStep
from edge_slm.generation.scoring import choose
from edge_slm.text.chat_format import ChatFormat, render_chat
from edge_slm.text.inputs import check_text, check_token_ids, tokenizer_call
from edge_slm.text.safe_chat import safe_chat_ids


class TextGenerator:
    """Generates text from a text-generation bundle (see :func:`edge_slm.load`).

    Thread-safe: share one instance between threads; see the module docstring.
    """

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        options: LoadOptions | None = None,
    ) -> None:
        start = time.perf_counter()
        assert manifest.decoder is not None  # guaranteed by Manifest validation
        options = options or LoadOptions()
        self.folder = folder
        self.manifest = manifest
        io = manifest.decoder
        # the tokenizer parses on a second core while onnxruntime builds the session
        decoder, tokenizer = build_beside(
            lambda: open_decoder(folder / manifest.files["model"], io, options),
            lambda: load_tokenizer(folder / manifest.files["tokenizer"]),
        )
        self.decoder: Decoder = decoder
        self.tokenizer: Tokenizer = tokenizer
        check_decoder(
            manifest, self.decoder.session, self.tokenizer, folder / manifest.files["model"]
        )
        pad = manifest.special_tokens.pad_token_id or 0
        self.backend: Backend = make_backend(self.decoder, options, pad)
        self.chat_format = (
            ChatFormat.from_dict(manifest.chat_format) if manifest.chat_format else None
        )
        self._saved_prefixes: list[SavedPrefix] = []
        self._lock = threading.Lock()
        self._graph_sha256: str | None = None
        self.chat_special_tokens = options.chat_special_tokens
        self._plain_tokenizer: Tokenizer | None = None
        self.load_s = time.perf_counter() - start

    # ----------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (the tokenizer's own post-processor adds BOS if it should)."""
        check_text(text)
        encoding = tokenizer_call(
            self.tokenizer.encode, text, add_special_tokens=add_special_tokens
        )
        return list(encoding.ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``."""
        ids = check_token_ids(token_ids, self.manifest.vocab_size, "token_ids")
        return str(
            tokenizer_call(self.tokenizer.decode, ids, skip_special_tokens=skip_special_tokens)
        )

    def render_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text of ``messages`` under the bundle's chat template."""
        tokens = self.manifest.special_tokens
        strings = {"bos_token": tokens.bos_token or "", "eos_token": tokens.eos_token or ""}
        return render_chat(
            messages, self.chat_format, self.manifest.chat_template, add_generation_prompt, strings
        )

    def chat_ids(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        special_tokens_in_messages: bool | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the generation prompt.

        Text inside the messages cannot produce special tokens (a typed ``<|im_end|>``
        is encoded as plain text) unless ``special_tokens_in_messages`` (default:
        ``LoadOptions.chat_special_tokens``) says the caller is trusted. Chats without
        special-token text in them encode exactly as the whole rendered prompt would.
        """
        trusted = (
            self.chat_special_tokens
            if special_tokens_in_messages is None
            else bool(special_tokens_in_messages)
        )
        return safe_chat_ids(self, messages, add_generation_prompt, trusted)

    def decode_config(self, options: GenerationOptions) -> DecodeConfig:
        """``options`` resolved against the bundle's defaults and validated.

        A ``constraint`` is compiled here, once per call (docs/structured-output.md).
        """
        config = resolve_options(
            options,
            self.manifest.generation_defaults,
            self.manifest.vocab_size,
            self.manifest.special_tokens.eos_token_ids,
        )
        if config.options.constraint is not None:
            config = replace(config, constraint=compile_constraint(config.options.constraint, self))
        return config

    # ------------------------------------------------------------- conversations
    def conversation(self, prefix_reuse: bool = True) -> Conversation:
        """A new conversation: its own KV cache, reused across its calls.

        Args:
            prefix_reuse: reuse the KV of the longest prefix a prompt shares with what
                this conversation computed before (or with a loaded prefix cache).
        """
        return Conversation(self, prefix_reuse)

    def capacity(self) -> Capacity:
        """Conversations holding KV memory, generating and waiting; KV bytes; limits."""
        return self.backend.capacity()

    def generate_tokens(
        self, prompt_ids: Sequence[int], options: GenerationOptions | None = None, **overrides: Any
    ) -> Iterator[TokenStep]:
        """Yield generated tokens one by one; the last one carries the finish reason."""
        with self.conversation() as conversation:
            yield from conversation.generate_tokens(prompt_ids, options, **overrides)

    def stream(
        self, prompt: str, options: GenerationOptions | None = None, **overrides: Any
    ) -> Iterator[Chunk]:
        """Yield text pieces as they are decoded; the last chunk has the finish reason.

        Text that might begin a stop string is held back until it is resolved; the
        stop string itself is never returned. Closing the iterator ends the generation
        and frees its KV memory.
        """
        with self.conversation() as conversation:
            yield from conversation.stream(prompt, options, **overrides)

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
        """Stream the answer to a conversation's messages (with ``tools``, the last
        chunk carries the parsed ``tool_calls``; see :meth:`chat`)."""
        with self.conversation() as conversation:
            yield from conversation.stream_chat(
                messages,
                options,
                tools=tools,
                tool_choice=tool_choice,
                parallel_tool_calls=parallel_tool_calls,
                tool_format=tool_format,
                **overrides,
            )

    def generate(
        self, prompt: str, options: GenerationOptions | None = None, **overrides: Any
    ) -> GenerationResult:
        """Generate a completion of ``prompt`` and return it whole, with timings."""
        with self.conversation() as conversation:
            return conversation.generate(prompt, options, **overrides)

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

        Each call computes the whole prompt (or reuses a loaded prefix cache); to reuse
        earlier turns, keep a :meth:`conversation` and call its ``chat``. With ``tools``
        the result's ``tool_calls`` are the calls the answer makes
        (:meth:`Conversation.chat <edge_slm.generation.conversation.Conversation.chat>`,
        docs/structured-output.md).
        """
        with self.conversation() as conversation:
            return conversation.chat(
                messages,
                options,
                tools=tools,
                tool_choice=tool_choice,
                parallel_tool_calls=parallel_tool_calls,
                tool_format=tool_format,
                **overrides,
            )

    def generate_batch(
        self, prompts: Sequence[str], options: GenerationOptions | None = None, **overrides: Any
    ) -> list[GenerationResult]:
        """Generate for several prompts at once (one forward per step for all rows).

        Each row stops on its own (stop token, stop string, length) and gets its own
        finish reason. With a ``seed``, each row samples from its own generator seeded
        with it, so a row's output does not depend on the other rows: for greedy
        decoding (and for a given seed) the results equal one-by-one runs.
        """
        if isinstance(prompts, str) or not prompts:
            raise InvalidArgumentError("prompts must be a non-empty list of strings")
        config = self.decode_config(GenerationOptions.build(options, overrides))
        return generate_batch(self, prompts, config)

    def choose(
        self,
        prompt: str,
        options: Sequence[str],
        normalize: bool = False,
        deadline_s: float | None = None,
    ) -> list[tuple[str, float]]:
        """Score each option as a continuation of ``prompt``; returns (option, probability).

        The score of an option is the sum of its tokens' log-probabilities given the
        prompt (``normalize=True`` divides it by the option's token count, which favours
        long options less). Probabilities are the softmax of the scores over the options,
        so they sum to 1: zero-shot classification with the generative model, e.g.
        routing a kiosk request to one of a few intents. The option's tokens are those
        that ``prompt + option`` adds to ``prompt``'s tokens. ``deadline_s`` bounds the
        call (checked between options; :class:`~edge_slm.errors.DeadlineError`).
        """
        return choose(self, prompt, options, normalize, deadline_s)

    # ------------------------------------------------------------- prefix caches
    def save_prefix_cache(
        self,
        path: str | Path,
        prefix: str | Sequence[int] | Sequence[Mapping[str, str]],
    ) -> Path:
        """Compute the KV cache of ``prefix`` (e.g. a long fixed system prompt) and save it.

        ``prefix`` is prompt text (encoded as :meth:`generate` encodes prompts), token
        ids, or chat messages such as ``[{"role": "system", "content": ...}]`` (rendered
        and encoded as :meth:`chat` does, without the generation prompt). The file
        (``.npz``, arrays only, no pickle) records the token ids and the sha256 of the
        bundle's graph, so :meth:`load_prefix_cache` refuses it for another model. Ship
        it beside the bundle and load it at start-up to skip that prefill. The prefix
        is also kept in this model, as if loaded.
        """
        if isinstance(prefix, str):
            ids = self.encode(prefix)
        elif prefix and isinstance(prefix[0], Mapping):
            messages = [dict(m) for m in prefix if isinstance(m, Mapping)]
            ids = self.chat_ids(messages, add_generation_prompt=False)
        else:
            ids = check_token_ids(prefix, self.manifest.vocab_size, "prefix")
        if not ids or len(ids) >= self.manifest.context_length:
            raise InvalidArgumentError(
                f"a prefix must have 1 to {self.manifest.context_length - 1} tokens, got {len(ids)}"
            )
        backend, state = self.backend, KVState()
        backend.begin(state)
        try:
            backend.extend(state, ids)
            keys, values = backend.export(state)
        finally:
            backend.finish(state)
            backend.release(state)
        saved = SavedPrefix(tuple(ids), keys, values)
        self._keep_prefix(saved)
        return save_prefix(Path(path), saved, self._model_sha256())

    def load_prefix_cache(self, path: str | Path) -> int:
        """Load a cache saved by :meth:`save_prefix_cache`; returns its length in tokens.

        Every conversation of this model (and every model-level call) whose prompt
        starts with those tokens then copies their KV instead of computing it.

        Raises:
            BundleError: the file is not a prefix cache of this bundle's graph.
        """
        assert self.manifest.decoder is not None
        saved = load_prefix(
            Path(path),
            self.manifest.decoder,
            self.decoder.kv_dtype,
            self._model_sha256(),
            self.manifest.context_length,
        )
        self._keep_prefix(saved)
        return len(saved.tokens)

    def reset_cache(self) -> None:
        """Forget the prefix caches this model holds (calls then compute whole prompts)."""
        with self._lock:
            self._saved_prefixes = []

    def _keep_prefix(self, saved: SavedPrefix) -> None:
        with self._lock:
            kept = [p for p in self._saved_prefixes if p.tokens != saved.tokens]
            self._saved_prefixes = [*kept, saved]

    def best_saved_prefix(self, ids: list[int], limit: int) -> tuple[SavedPrefix | None, int]:
        """The saved prefix sharing the most leading tokens with ``ids`` (at most ``limit``)."""
        best: SavedPrefix | None = None
        best_len = 0
        for saved in self._saved_prefixes:  # a snapshot: the list is replaced, never changed
            shared = saved.shared_with(ids, limit)
            if shared > best_len:
                best, best_len = saved, shared
        return best, best_len

    def _model_sha256(self) -> str:
        """The graph's sha256: the manifest records it (checked at load unless
        ``verify=False``); hashed here only when the manifest lacks it."""
        if self._graph_sha256 is None:
            name = self.manifest.files["model"]
            checksums = read_manifest(self.folder)[1]
            recorded = checksums.get(name) if isinstance(checksums, dict) else None
            self._graph_sha256 = recorded or sha256_file(self.folder / name)
        return self._graph_sha256
