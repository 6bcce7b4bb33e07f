"""``edge-slm bench``: how fast a text-generation bundle runs on this machine.

Measures, with numpy and onnxruntime only: load time, time to first token, prompt
and decode tokens per second, peak resident memory, and the memory bandwidth decoding
achieves (bytes of weights read per token x tokens/s) against a bound measured here
with large array copies. Decoding a small model is bandwidth-bound: every step reads
every weight once, so ``achieved / bound`` says how much speed is left on the table.

The prompt is synthetic (the tokenizer's encoding of a fixed text, repeated to the
wanted length) and decoding is greedy without stop tokens, so every run does the same
work. Run one bundle per process for honest load times and peak memory.

The load goes through the prepared-session cache (edge_slm.engine.prepared_cache) like
any ``edge_slm.load``: the report says whether the session was a cache hit or was
built now; ``cache=False`` (``edge-slm bench --no-cache``) measures a cold load.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.engine.device import graph_bytes, memory_bandwidth
from edge_slm.errors import InvalidArgumentError

__all__ = ["BenchResult", "format_result", "memory_bandwidth", "run_bench", "synthetic_prompt"]

_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the "
    "steps and listening to the sea below, while the ships passed far out in the dark. "
)


@dataclass(frozen=True)
class BenchResult:
    """Medians over the repetitions (seconds, tokens/s, bytes)."""

    bundle: str
    graph_layout: str
    quantization: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    repeats: int
    load_s: float
    time_to_first_token_s: float
    prompt_tokens_per_s: float
    decode_tokens_per_s: float
    peak_rss_bytes: int
    model_bytes: int
    bandwidth_bound_bytes_per_s: float
    achieved_bytes_per_s: float
    session_source: str = ""

    @property
    def bandwidth_fraction(self) -> float:
        """Achieved decode bandwidth as a fraction of the measured bound."""
        bound = self.bandwidth_bound_bytes_per_s
        return self.achieved_bytes_per_s / bound if bound > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with the bandwidth fraction."""
        return {**asdict(self), "bandwidth_fraction": self.bandwidth_fraction}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this program's
    own memory. ``getrusage`` keeps the maximum across ``exec``, so a benchmark started
    by a big parent process would report the parent's peak. Elsewhere ``ru_maxrss``
    (macOS reports bytes, the BSDs KiB).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if peak > 1 << 32 else int(peak) * 1024


def synthetic_prompt(generator: Any, tokens: int) -> np.ndarray:
    """``[1, tokens]`` int64 ids of a fixed English text repeated to length."""
    ids = generator.encode(_TEXT, add_special_tokens=False)
    reps = -(-tokens // len(ids))
    return np.asarray([(ids * reps)[:tokens]], dtype=np.int64)


def run_bench(
    bundle: str | Path,
    *,
    prompt_tokens: int = 32,
    new_tokens: int = 64,
    repeats: int = 3,
    threads: int | None = None,
    spinning: bool | None = None,
    verify: bool = False,
    cache: bool | None = None,
) -> BenchResult:
    """Load ``bundle`` once, then prefill + greedy-decode ``repeats`` times; medians.

    Args:
        bundle: a text-generation bundle folder.
        prompt_tokens: length of the synthetic prompt.
        new_tokens: tokens decoded after the first (EOS does not stop them).
        repeats: measured runs (after one untimed warm-up of 4 tokens).
        threads: onnxruntime intra-op threads (None: every CPU this process may use).
        spinning: onnxruntime thread spinning (None: onnxruntime's default).
        verify: check the bundle's checksums while loading (counted in ``load_s``).
        cache: the prepared-session cache (None: on unless ``EDGE_SLM_CACHE=0``;
            False: a cold load).
    """
    from edge_slm import load
    from edge_slm.engine.session import session_defaults
    from edge_slm.generation.kv_slots import KVState
    from edge_slm.generation.model import TextGenerator

    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1:
        raise InvalidArgumentError("prompt_tokens, new_tokens and repeats must be >= 1")
    folder = Path(bundle)
    start = time.perf_counter()
    generator = load(folder, threads=threads, spinning=spinning, verify=verify, cache=cache)
    load_s = time.perf_counter() - start
    if not isinstance(generator, TextGenerator):
        raise InvalidArgumentError(f"{folder} is not a text-generation bundle")
    manifest = generator.manifest
    if prompt_tokens + new_tokens + 1 > manifest.context_length:
        raise InvalidArgumentError(
            f"prompt_tokens + new_tokens must fit in the context ({manifest.context_length})"
        )
    backend = generator.backend
    prompt = [int(t) for t in synthetic_prompt(generator, prompt_tokens)[0]]

    def one_run(steps: int) -> tuple[float, float]:
        state = KVState()
        backend.begin(state)
        try:
            begin = time.perf_counter()
            token = int(np.argmax(backend.extend(state, prompt)[-1]))
            first = time.perf_counter()
            for _ in range(steps):
                token = int(np.argmax(backend.step(state, token)))
            return first - begin, time.perf_counter() - first
        finally:
            backend.finish(state)
            backend.release(state)

    one_run(4)  # warm-up: onnxruntime allocates its arenas on the first runs
    ttft, decode = zip(*(one_run(new_tokens) for _ in range(repeats)), strict=True)
    ttft_s = statistics.median(ttft)
    decode_tps = new_tokens / statistics.median(decode)
    n_threads = threads or session_defaults().threads
    model_bytes = graph_bytes(folder, manifest.files["model"])
    assert manifest.decoder is not None
    return BenchResult(
        bundle=str(folder),
        graph_layout=manifest.decoder.layout,
        quantization=manifest.quantization.method,
        threads=n_threads,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        load_s=load_s,
        time_to_first_token_s=ttft_s,
        prompt_tokens_per_s=prompt_tokens / ttft_s,
        decode_tokens_per_s=decode_tps,
        peak_rss_bytes=peak_rss_bytes(),
        model_bytes=model_bytes,
        bandwidth_bound_bytes_per_s=memory_bandwidth(n_threads),
        achieved_bytes_per_s=model_bytes * decode_tps,
        session_source=str(getattr(generator.decoder, "session_source", "")),
    )


def format_result(result: BenchResult) -> str:
    """A few human-readable lines."""
    mib = 1 << 20
    return "\n".join(
        [
            f"bundle           {result.bundle} ({result.graph_layout}, "
            f"quantization {result.quantization}, {result.threads} threads)",
            f"load             {result.load_s:.3f} s"
            + (f" ({result.session_source})" if result.session_source else ""),
            f"first token      {result.time_to_first_token_s * 1000:.1f} ms "
            f"({result.prompt_tokens}-token prompt, {result.prompt_tokens_per_s:.1f} tok/s)",
            f"decode           {result.decode_tokens_per_s:.1f} tok/s "
            f"(median of {result.repeats} x {result.new_tokens} tokens)",
            f"peak RSS         {result.peak_rss_bytes / mib:.0f} MiB",
            f"model            {result.model_bytes / mib:.1f} MiB",
            f"bandwidth        {result.achieved_bytes_per_s / 1e9:.1f} GB/s achieved, "
            f"{result.bandwidth_bound_bytes_per_s / 1e9:.1f} GB/s bound "
            f"({100 * result.bandwidth_fraction:.0f}%)",
        ]
    )
