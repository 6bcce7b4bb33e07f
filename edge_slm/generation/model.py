"""Text generation over a decoder bundle, in three layers (after mlx-lm's generate.py).

1. :meth:`TextGenerator.generate_tokens` yields :class:`TokenStep` (token id, log-prob)
   from a prompt's token ids: the KV-cache loop, the sampler, stop tokens, limits.
2. :meth:`TextGenerator.stream` yields :class:`Chunk` (a text piece, its tokens, and the
   finish reason on the last one): the streaming detokenizer and stop strings.
3. :meth:`TextGenerator.generate` returns one :class:`GenerationResult` with the
   whole text, token ids, finish reason and timings.

:class:`GenerationOptions` holds per-call settings; a field left at None takes the
bundle's default (its ``generation_defaults``), as in piper's SynthesisConfig.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from edge_slm.bundle import Manifest
from edge_slm.engine.prepared_cache import CacheSetting
from edge_slm.errors import BundleError, ContextLengthError, InvalidArgumentError
from edge_slm.generation.fused_step import open_decoder
from edge_slm.generation.plain_step import KVCache
from edge_slm.generation.sampling import (
    LogitsProcessor,
    Sampler,
    TokenLogprob,
    make_logits_processors,
    make_sampler,
    top_logprobs,
)
from edge_slm.text.chat_format import ChatFormat, render_chat
from edge_slm.text.detokenizer import StreamingDetokenizer
from edge_slm.text.stops import Deadline, FinishReason, StopStringMatcher


@dataclass(frozen=True)
class GenerationOptions:
    """Per-call generation settings; None means "the bundle's default".

    Sampling is greedy when ``temperature`` is 0. When ``temperature`` is None the
    bundle's default applies: its ``temperature`` if its generation_config samples,
    greedy otherwise.
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: Mapping[int, float] | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None
    deadline_s: float | None = None
    logprobs: int = 0
    truncate_prompt: bool = False

    @classmethod
    def build(
        cls, options: GenerationOptions | None, overrides: Mapping[str, Any]
    ) -> GenerationOptions:
        """``options`` (or the defaults) with keyword ``overrides``; unknown names raise."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidArgumentError(
                f"unknown generation option(s) {unknown}; allowed: {sorted(names)}"
            )
        return replace(options or cls(), **overrides)


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
class _RunStats:
    """What layer 1 measures for layer 3's timings."""

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
class Chunk:
    """A piece of streamed text (layer 2); the last chunk carries the finish reason."""

    text: str
    steps: tuple[TokenStep, ...]
    finish_reason: FinishReason | None = None
    stop: str | int | None = None

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The tokens decoded since the previous chunk."""
        return tuple(step.token_id for step in self.steps)


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation (layer 3)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: FinishReason
    stop: str | int | None
    timings: Timings
    logprobs: list[TokenStep] = field(default_factory=list)


class TextGenerator:
    """Generates text from a text-generation bundle (see :func:`edge_slm.load`)."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        threads: int | None = None,
        spinning: bool | None = None,
        cache: CacheSetting = None,
    ) -> None:
        start = time.perf_counter()
        assert manifest.decoder is not None  # guaranteed by Manifest validation
        self.folder = folder
        self.manifest = manifest
        # The tokenizer first: parsing tokenizer.json frees heap that the session then
        # reuses; loaded after the session it left ~19 MiB more peak RSS (SmolLM2).
        self.tokenizer: Tokenizer = Tokenizer.from_file(str(folder / manifest.files["tokenizer"]))
        self.model = open_decoder(
            folder / manifest.files["model"], manifest.decoder, threads, spinning, cache=cache
        )
        self.chat_format = (
            ChatFormat.from_dict(manifest.chat_format) if manifest.chat_format else None
        )
        self._cache: KVCache | None = None
        self._graph_sha256: str | None = None
        self._vocab = manifest.vocab_size
        self.load_s = time.perf_counter() - start

    # ----------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (the tokenizer's own post-processor adds BOS if it should)."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``."""
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def render_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text of ``messages`` under the bundle's chat template."""
        tokens = self.manifest.special_tokens
        strings = {"bos_token": tokens.bos_token or "", "eos_token": tokens.eos_token or ""}
        return render_chat(
            messages, self.chat_format, self.manifest.chat_template, add_generation_prompt, strings
        )

    # ------------------------------------------------------------------- settings
    def _resolve(self, options: GenerationOptions) -> GenerationOptions:
        """Fill None fields from the bundle's generation defaults."""
        defaults = self.manifest.generation_defaults
        temperature = options.temperature
        if temperature is None:
            wants_sampling = defaults.do_sample or any(
                v is not None
                for v in (options.top_k, options.top_p, options.min_p, options.typical_p)
            )
            temperature = (defaults.temperature or 1.0) if wants_sampling else 0.0
        return replace(
            options,
            max_new_tokens=options.max_new_tokens
            if options.max_new_tokens is not None
            else defaults.max_new_tokens,
            temperature=temperature,
            top_k=options.top_k if options.top_k is not None else (defaults.top_k or 0),
            top_p=options.top_p if options.top_p is not None else (defaults.top_p or 1.0),
            min_p=options.min_p if options.min_p is not None else (defaults.min_p or 0.0),
            typical_p=options.typical_p if options.typical_p is not None else 1.0,
            repetition_penalty=options.repetition_penalty
            if options.repetition_penalty is not None
            else (defaults.repetition_penalty or 1.0),
        )

    def _fit_context(
        self, prompt_ids: list[int], options: GenerationOptions
    ) -> tuple[list[int], int]:
        """Check the prompt fits; returns (prompt ids, max new tokens clamped to the room left).

        With ``truncate_prompt`` the oldest tokens are dropped (a leading BOS is kept)
        so that at least one new token fits; otherwise a long prompt raises.
        """
        context = self.manifest.context_length
        wanted = int(options.max_new_tokens or 0)
        if wanted < 1:
            raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {wanted}")
        if not prompt_ids:
            raise InvalidArgumentError("the prompt is empty (it encodes to no tokens)")
        if len(prompt_ids) >= context:
            if not options.truncate_prompt:
                raise ContextLengthError(
                    f"the prompt has {len(prompt_ids)} tokens but the context holds {context} "
                    "(including the tokens to generate); shorten it or pass truncate_prompt=True"
                )
            keep = max(1, context - min(wanted, context // 2))
            bos = self.manifest.special_tokens.bos_token_id
            head = [prompt_ids[0]] if bos is not None and prompt_ids[0] == bos else []
            prompt_ids = head + prompt_ids[len(prompt_ids) - (keep - len(head)) :]
        return prompt_ids, min(wanted, context - len(prompt_ids))

    def _decoding(self, options: GenerationOptions) -> _Decoding:
        """Validate resolved options and build the sampler, processors and stop set."""
        opts = self._resolve(options)
        for token_id in opts.stop_token_ids:
            if not 0 <= token_id < self._vocab:
                raise InvalidArgumentError(
                    f"stop token id {token_id} outside the vocabulary [0, {self._vocab})"
                )
        if opts.logprobs < 0:
            raise InvalidArgumentError(f"logprobs must be >= 0, got {opts.logprobs}")
        return _Decoding(
            options=opts,
            sampler=make_sampler(
                temperature=float(opts.temperature or 0.0),
                top_k=int(opts.top_k or 0),
                top_p=float(opts.top_p or 1.0),
                min_p=float(opts.min_p or 0.0),
                typical_p=float(opts.typical_p or 1.0),
            ),
            processors=make_logits_processors(
                repetition_penalty=float(opts.repetition_penalty or 1.0),
                frequency_penalty=opts.frequency_penalty,
                presence_penalty=opts.presence_penalty,
                no_repeat_ngram_size=opts.no_repeat_ngram_size,
                logit_bias=opts.logit_bias,
                vocab_size=self._vocab,
            ),
            stop_ids=frozenset(self.manifest.special_tokens.eos_token_ids)
            | frozenset(opts.stop_token_ids),
            deadline=Deadline(opts.deadline_s),
        )

    # ------------------------------------------------------------- layer 1: tokens
    def generate_tokens(
        self, prompt_ids: Sequence[int], options: GenerationOptions | None = None, **overrides: Any
    ) -> Iterator[TokenStep]:
        """Yield generated tokens one by one; the last one carries the finish reason.

        The KV cache of the previous call is reused for the longest shared prefix of
        token ids (a fixed system prompt, earlier chat turns).
        """
        yield from self._tokens(
            prompt_ids, GenerationOptions.build(options, overrides), _RunStats()
        )

    def _tokens(
        self, prompt_ids: Sequence[int], options: GenerationOptions, stats: _RunStats
    ) -> Iterator[TokenStep]:
        decoding = self._decoding(options)
        ids, budget = self._fit_context(list(prompt_ids), decoding.options)
        stats.prompt_ids = ids
        row = _Row(decoding, ids, budget, self.tokenizer)
        prompt = np.asarray([ids], dtype=np.int64)  # [1, prompt_len]
        cache = self._reusable_cache(prompt)
        stats.reused_prompt_tokens = cache.length
        self._cache = None  # a failure mid-way must not leave a half-updated cache behind
        logits, cache = self.model.forward(prompt[:, cache.length :], cache)
        while True:
            step = row.sample(logits[0])
            if stats.first_token_at is None:
                stats.first_token_at = time.perf_counter()
            # The cache holds every token but the last sampled one: valid for reuse
            # even if the caller stops iterating here.
            self._cache = cache
            yield step
            if step.finish_reason is not None:
                return
            self._cache = None
            logits, cache = self.model.forward(np.asarray([[step.token_id]], dtype=np.int64), cache)

    def _reusable_cache(self, prompt: np.ndarray) -> KVCache:
        """The previous cache cut to the prefix it shares with ``prompt`` (at least one
        prompt token is left to compute, since its logits are needed)."""
        cache = self._cache
        if cache is None or cache.tokens.shape[0] != 1:
            return self.model.empty_cache(1)
        limit = min(cache.length, prompt.shape[1] - 1)
        same = cache.tokens[0, :limit] == prompt[0, :limit]
        shared = int(limit if same.all() else np.argmin(same))
        return cache.truncated(shared) if shared > 0 else self.model.empty_cache(1)

    def reset_cache(self) -> None:
        """Forget the cached prefix (the next call computes its prompt from scratch)."""
        self._cache = None

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
        it beside the bundle and load it at start-up to skip that prefill.
        """
        if isinstance(prefix, str):
            ids = self.encode(prefix)
        elif prefix and isinstance(prefix[0], Mapping):
            messages = [dict(m) for m in prefix if isinstance(m, Mapping)]
            ids = self.encode(self.render_chat(messages, add_generation_prompt=False), False)
        else:
            ids = [int(t) for t in prefix if not isinstance(t, Mapping)]
        if not ids or len(ids) >= self.manifest.context_length:
            raise InvalidArgumentError(
                f"a prefix must have 1 to {self.manifest.context_length - 1} tokens, got {len(ids)}"
            )
        _, cache = self.model.forward(np.asarray([ids], dtype=np.int64), self.model.empty_cache(1))
        # Fused caches are views of larger buffers: save the valid positions only.
        n = cache.length
        arrays: dict[str, Any] = {f"key_{i}": k[:, :, :n] for i, k in enumerate(cache.keys)}
        arrays.update({f"value_{i}": v[:, :, :n] for i, v in enumerate(cache.values)})
        path = Path(path)
        with open(path, "wb") as fh:
            np.savez(
                fh,
                tokens=cache.tokens,
                model_sha256=np.asarray(self._model_sha256()),
                **arrays,
            )
        self._cache = cache
        return path

    def load_prefix_cache(self, path: str | Path) -> int:
        """Load a cache saved by :meth:`save_prefix_cache`; returns its length in tokens.

        Raises:
            BundleError: the file is not a prefix cache of this bundle's graph.
        """
        layers = self.model.io.num_layers
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["model_sha256"]) != self._model_sha256():
                    raise BundleError(f"prefix cache {str(path)!r} was made for another model")
                tokens = np.asarray(data["tokens"], dtype=np.int64)
                keys = [np.asarray(data[f"key_{i}"]) for i in range(layers)]
                values = [np.asarray(data[f"value_{i}"]) for i in range(layers)]
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"{str(path)!r} is not a valid prefix cache: {exc}") from None
        expected = (1, self.model.io.num_kv_heads, tokens.shape[1], self.model.io.head_dim)
        if tokens.shape[0] != 1 or any(a.shape != expected for a in keys + values):
            raise BundleError(f"prefix cache {str(path)!r} has shapes that do not fit this model")
        self._cache = self.model.cache_from_arrays(keys, values, tokens)
        return int(tokens.shape[1])

    def _model_sha256(self) -> str:
        """The graph's sha256: the manifest records it (checked at load unless
        ``verify=False``); hashed here only when the manifest lacks it."""
        from edge_slm.bundle import read_manifest, sha256_file

        if self._graph_sha256 is None:
            name = self.manifest.files["model"]
            checksums = read_manifest(self.folder)[1]
            recorded = checksums.get(name) if isinstance(checksums, dict) else None
            self._graph_sha256 = recorded or sha256_file(self.folder / name)
        return self._graph_sha256

    # --------------------------------------------------------------- layer 2: text
    def stream(
        self, prompt: str, options: GenerationOptions | None = None, **overrides: Any
    ) -> Iterator[Chunk]:
        """Yield text pieces as they are decoded; the last chunk has the finish reason.

        Text that might begin a stop string is held back until it is resolved; the
        stop string itself is never returned.
        """
        opts = GenerationOptions.build(options, overrides)
        yield from self._stream_ids(self.encode(prompt), opts, _RunStats())

    def _stream_ids(
        self, prompt_ids: list[int], opts: GenerationOptions, stats: _RunStats
    ) -> Iterator[Chunk]:
        text = _RowText(self.tokenizer, opts.stop)
        for step in self._tokens(prompt_ids, opts, stats):
            chunk = text.push(step)
            if chunk is not None:
                yield chunk
                if chunk.finish_reason is not None:
                    return

    # ------------------------------------------------------------ layer 3: result
    def generate(
        self, prompt: str, options: GenerationOptions | None = None, **overrides: Any
    ) -> GenerationResult:
        """Generate a completion of ``prompt`` and return it whole, with timings."""
        opts = GenerationOptions.build(options, overrides)
        return self._collect(self.encode(prompt), opts)

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        options: GenerationOptions | None = None,
        **overrides: Any,
    ) -> GenerationResult:
        """Answer a conversation (``[{"role": ..., "content": ...}, ...]``).

        In a multi-turn session, pass the whole conversation each time: the shared
        prefix (earlier turns) is taken from the KV cache, not recomputed.
        """
        opts = GenerationOptions.build(options, overrides)
        return self._collect(self._chat_ids(messages), opts)

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        options: GenerationOptions | None = None,
        **overrides: Any,
    ) -> Iterator[Chunk]:
        """Stream the answer to a conversation."""
        opts = GenerationOptions.build(options, overrides)
        yield from self._stream_ids(self._chat_ids(messages), opts, _RunStats())

    def _chat_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        # The template already holds every special token: do not let the tokenizer add BOS.
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    def _collect(self, prompt_ids: list[int], opts: GenerationOptions) -> GenerationResult:
        start = time.perf_counter()
        stats = _RunStats()
        texts: list[str] = []
        steps: list[TokenStep] = []
        last: Chunk | None = None
        for chunk in self._stream_ids(prompt_ids, opts, stats):
            texts.append(chunk.text)
            steps.extend(chunk.steps)
            last = chunk
        end = time.perf_counter()
        assert last is not None and last.finish_reason is not None
        return _result(last, texts, steps, stats, self.load_s, start, end, opts.logprobs > 0)

    # ------------------------------------------------------------------ batches
    def generate_batch(
        self, prompts: Sequence[str], options: GenerationOptions | None = None, **overrides: Any
    ) -> list[GenerationResult]:
        """Generate for several prompts at once (left padding, one forward per step).

        Each row stops on its own (stop token, stop string, length) and gets its own
        finish reason. With a ``seed``, each row samples from its own generator seeded
        with it, so a row's output does not depend on the other rows: for greedy
        decoding (and for a given seed) the results equal one-by-one runs.
        """
        if isinstance(prompts, str) or not prompts:
            raise InvalidArgumentError("prompts must be a non-empty list of strings")
        opts = GenerationOptions.build(options, overrides)
        if not self.model.supports_padding:
            # This graph cannot left-pad rows: run them one after the other (same results).
            return [self._collect(self.encode(prompt), opts) for prompt in prompts]
        start = time.perf_counter()
        rows: list[_Row] = []
        texts: list[_RowText] = []
        for prompt in prompts:
            decoding = self._decoding(opts)
            ids, budget = self._fit_context(self.encode(prompt), decoding.options)
            rows.append(_Row(decoding, ids, budget, self.tokenizer))
            texts.append(_RowText(self.tokenizer, opts.stop))
        width = max(len(r.prompt_ids) for r in rows)
        pad = self.manifest.special_tokens.pad_token_id or 0
        ids_array = np.full((len(rows), width), pad, dtype=np.int64)  # [B, width]
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids_array[i, width - len(row.prompt_ids) :] = row.prompt_ids
            mask[i, width - len(row.prompt_ids) :] = 1
        logits, cache = self.model.forward(ids_array, self.model.empty_cache(len(rows)), mask)
        first_token_at = None
        pieces: list[list[Chunk]] = [[] for _ in rows]
        done = [False] * len(rows)
        while True:
            next_ids = np.full((len(rows), 1), pad, dtype=np.int64)
            next_mask = np.zeros((len(rows), 1), dtype=np.int64)
            for i, row in enumerate(rows):
                if done[i]:
                    continue
                step = row.sample(logits[i])
                chunk = texts[i].push(step)
                if chunk is not None:
                    pieces[i].append(chunk)
                    done[i] = chunk.finish_reason is not None
                next_ids[i, 0], next_mask[i, 0] = step.token_id, 0 if done[i] else 1
            first_token_at = first_token_at or time.perf_counter()
            if all(done):
                break
            logits, cache = self.model.forward(next_ids, cache, next_mask)
        end = time.perf_counter()
        results = []
        for row, chunks in zip(rows, pieces, strict=True):
            stats = _RunStats(prompt_ids=row.prompt_ids, first_token_at=first_token_at)
            steps = [s for c in chunks for s in c.steps]
            results.append(
                _result(
                    chunks[-1],
                    [c.text for c in chunks],
                    steps,
                    stats,
                    self.load_s,
                    start,
                    end,
                    opts.logprobs > 0,
                )
            )
        return results

    # ---------------------------------------------------------- constrained choice
    def choose(
        self, prompt: str, options: Sequence[str], normalize: bool = False
    ) -> list[tuple[str, float]]:
        """Score each option as a continuation of ``prompt``; returns (option, probability).

        The score of an option is the sum of its tokens' log-probabilities given the
        prompt (``normalize=True`` divides it by the option's token count, which favours
        long options less). Probabilities are the softmax of the scores over the options,
        so they sum to 1: zero-shot classification with the generative model, e.g.
        routing a kiosk request to one of a few intents. The option's tokens are those
        that ``prompt + option`` adds to ``prompt``'s tokens.
        """
        if isinstance(options, str) or len(options) < 1:
            raise InvalidArgumentError("options must be a non-empty list of strings")
        context = self.encode(prompt)
        if not context:
            raise InvalidArgumentError("the prompt is empty (it encodes to no tokens)")
        # The prompt but its last token goes in the cache once; each option then feeds
        # that last token and its own tokens (but the last), whose logits predict it.
        cache = self.model.empty_cache(1)
        if len(context) > 1:
            _, cache = self.model.forward(np.asarray([context[:-1]], dtype=np.int64), cache)
        scores = []
        for option in options:
            full = self.encode(prompt + option)
            if full[: len(context)] != context or len(full) == len(context):
                raise InvalidArgumentError(
                    f"option {option!r} adds no tokens after the prompt, or changes the "
                    "prompt's tokens; start options with a space or end the prompt with one"
                )
            if len(full) > self.manifest.context_length:
                raise ContextLengthError(f"prompt + option {option!r} exceeds the context")
            new = np.asarray([full[len(context) - 1 : -1]], dtype=np.int64)
            logits, _ = self.model.forward(new, cache, all_positions=True)
            targets = np.asarray(full[len(context) :])
            logp = _log_softmax(logits[0])[np.arange(len(targets)), targets]
            total = float(logp.sum())
            scores.append(total / len(targets) if normalize else total)
        values = np.asarray(scores)
        probs = np.exp(values - values.max())
        probs /= probs.sum()
        return [(option, float(p)) for option, p in zip(options, probs, strict=True)]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 ``[..., vocab]``."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return np.asarray(x - np.log(np.exp(x).sum(axis=-1, keepdims=True)))


@dataclass(frozen=True)
class _Decoding:
    """Everything one call samples with, built once from resolved options."""

    options: GenerationOptions
    sampler: Sampler
    processors: list[LogitsProcessor]
    stop_ids: frozenset[int]
    deadline: Deadline


class _Row:
    """One sequence's sampling state: history, generated tokens, RNG, limits."""

    def __init__(
        self, decoding: _Decoding, prompt_ids: list[int], budget: int, tokenizer: Tokenizer
    ) -> None:
        self.decoding = decoding
        self.prompt_ids = prompt_ids
        self.budget = budget
        self.history = list(prompt_ids)
        self.generated: list[int] = []
        self.rng = np.random.default_rng(decoding.options.seed)

    def sample(self, logits: np.ndarray) -> TokenStep:
        """Process ``logits`` ``[vocab]``, draw a token and say whether the row is done."""
        d = self.decoding
        row = logits
        if d.processors:
            history = np.asarray(self.history, dtype=np.int64)
            generated = np.asarray(self.generated, dtype=np.int64)
            for process in d.processors:
                row = process(history, generated, row)
        token = d.sampler(row, self.rng)
        logprob, alternatives = top_logprobs(row, token, d.options.logprobs)
        self.generated.append(token)
        self.history.append(token)
        reason: FinishReason | None = None
        if token in d.stop_ids:
            reason = FinishReason.STOP_TOKEN
        elif len(self.generated) >= self.budget:
            reason = FinishReason.LENGTH
        elif d.deadline.expired():
            reason = FinishReason.DEADLINE
        return TokenStep(token, logprob, alternatives, reason)


class _RowText:
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


def _result(
    last: Chunk,
    texts: list[str],
    steps: list[TokenStep],
    stats: _RunStats,
    load_s: float,
    start: float,
    end: float,
    keep_logprobs: bool,
) -> GenerationResult:
    """Assemble a finished generation from its chunks and measurements."""
    assert last.finish_reason is not None
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
        text="".join(texts),
        token_ids=[step.token_id for step in steps],
        prompt_token_ids=stats.prompt_ids,
        finish_reason=last.finish_reason,
        stop=last.stop,
        timings=timings,
        logprobs=steps if keep_logprobs else [],
    )
