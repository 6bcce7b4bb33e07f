"""One model, many conversations: threads, interleaved streams, determinism, limits.

The threaded runs happen in a subprocess (tests/concurrency_worker.py) whose exit
status is checked, several times: a crash (heap corruption) cannot take pytest down
with it and still reads as a failure. Each runs on the fused and the plain (optimum)
graph, in fp32 and 4-bit.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import edge_slm
from edge_slm.generation.kv_pool import MIN_CAPACITY

WORKER = Path(__file__).with_name("concurrency_worker.py")
SYSTEM = "You are a kiosk assistant at the central station. Answer briefly. "
KINDS = ("fused-fp32", "plain-fp32", "fused-int4", "plain-int4")


@pytest.fixture(scope="module")
def kinds(
    fused_bundles: dict[str, Path],
    bundles: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """kind -> bundle: fused and plain Llama (GQA) graphs, fp32 and 4-bit."""
    from edge_slm_quantize import quantize_bundle

    root = tmp_path_factory.mktemp("concurrency")
    return {
        "fused-fp32": fused_bundles["llama"],
        "plain-fp32": bundles["llama"],
        "fused-int4": quantize_bundle(fused_bundles["llama"], root / "fused-int4", "int4-search"),
        "plain-int4": quantize_bundle(bundles["llama"], root / "plain-int4", "int4"),
    }


def _worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("kind", KINDS)
def test_threads_give_the_sequential_results(kinds: dict[str, Path], kind: str) -> None:
    for attempt in range(3):
        run = _worker("generate", str(kinds[kind]), "--threads", "4", "--rounds", "2")
        assert run.returncode == 0, (
            f"attempt {attempt}: exit {run.returncode}\n{run.stdout}{run.stderr}"
        )
        assert "ok:" in run.stdout
        if kind.startswith("fused"):
            # Decode steps of different threads met in one forward.
            found = re.search(r"batches=(\d+), batched_steps=(\d+)", run.stdout)
            assert found, run.stdout
            batches, steps = int(found[1]), int(found[2])
            assert steps > 1.2 * batches, run.stdout


def test_classifier_and_embedder_from_threads(encoder_bundles: dict[str, Path]) -> None:
    classifier, embedder = encoder_bundles["clf"], encoder_bundles["emb"]
    for attempt in range(3):
        run = _worker("encoders", str(classifier), str(embedder), "--threads", "4")
        assert run.returncode == 0, (
            f"attempt {attempt}: exit {run.returncode}\n{run.stdout}{run.stderr}"
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("count", [2, 3])
def test_interleaved_streams_on_one_thread_equal_their_solo_runs(
    kinds: dict[str, Path], kind: str, count: int
) -> None:
    model = edge_slm.load(kinds[kind])
    prompts = [SYSTEM + q for q in ("Where is platform 4?", "Where are the toilets?", "Hello")]
    settings: list[dict[str, Any]] = [
        {"max_new_tokens": 14, "temperature": 0.0},
        {"max_new_tokens": 10, "temperature": 0.8, "seed": 3},
        {"max_new_tokens": 12, "temperature": 0.0, "stop": ["e"]},
    ]
    solo = [
        [t for c in model.stream(p, **s) for t in c.token_ids]
        for p, s in zip(prompts[:count], settings, strict=False)
    ]
    streams = [model.stream(p, **s) for p, s in zip(prompts[:count], settings, strict=False)]
    got: list[list[int]] = [[] for _ in streams]
    live = list(range(count))
    while live:  # one chunk from each live stream in turn
        for i in list(live):
            chunk = next(streams[i], None)
            if chunk is None:
                live.remove(i)
            else:
                got[i].extend(chunk.token_ids)
    assert got == solo
    assert model.capacity().live_sessions == 0


@pytest.fixture(scope="module")
def every_method(
    bundles: dict[str, Path],
    fused_bundles: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """Every quantization method that takes a float bundle, on the graph it is made for."""
    from edge_slm_quantize import METHODS, quantize_bundle

    root = tmp_path_factory.mktemp("every-method")
    out = {"fp32-fused": fused_bundles["llama"], "fp32-plain": bundles["llama"]}
    for name, method in METHODS.items():
        if getattr(method, "needs_gguf", False) or name.startswith("gguf") or name == "int4":
            continue  # gguf methods need a GGUF source (tests/test_gguf.py); int4 is an alias
        source = fused_bundles["llama"]
        out[name] = quantize_bundle(source, root / name, name)
    return out


def test_fresh_calls_do_not_depend_on_what_ran_before(every_method: dict[str, Path]) -> None:
    """Same inputs and seed on a fresh conversation: same tokens, on every method."""
    for name, bundle in every_method.items():
        model = edge_slm.load(bundle)
        prompt = SYSTEM + "Where are the toilets?"
        kwargs: dict[str, Any] = {"max_new_tokens": 12, "temperature": 0.7, "seed": 5}
        first = model.generate(prompt, **kwargs)
        model.generate(SYSTEM + "Where is platform 4?", max_new_tokens=9, temperature=0.0)
        with model.conversation() as conversation:
            conversation.generate(SYSTEM + "Hi", max_new_tokens=3)
        again = model.generate(prompt, **kwargs)
        assert again.token_ids == first.token_ids, name
        assert again.timings.reused_prompt_tokens == 0, name
        with model.conversation(prefix_reuse=False) as conversation:
            conversation.generate(SYSTEM + "Hi", max_new_tokens=3)
            no_reuse = conversation.generate(prompt, **kwargs)
        assert no_reuse.token_ids == first.token_ids, name
        assert no_reuse.timings.reused_prompt_tokens == 0, name


def test_prefix_reuse_changes_at_most_late_digits(every_method: dict[str, Path]) -> None:
    """A reused prefix gives the fresh distribution: exactly on fp32, closely on quantized."""
    prompt = SYSTEM + "Where are the toilets?"
    for name, bundle in every_method.items():
        model = edge_slm.load(bundle)
        fresh = model.generate(prompt, max_new_tokens=1, temperature=0.0, logprobs=5)
        with model.conversation() as conversation:
            conversation.generate(SYSTEM + "Where is platform 4?", max_new_tokens=4)
            reused = conversation.generate(prompt, max_new_tokens=1, temperature=0.0, logprobs=5)
        assert reused.timings.reused_prompt_tokens > 5, name
        ours = dict(reused.logprobs[0].top_logprobs)
        theirs = dict(fresh.logprobs[0].top_logprobs)
        common = sorted(set(ours) & set(theirs))
        assert len(common) >= 4, name
        worst = max(abs(ours[t] - theirs[t]) for t in common)
        if name.startswith("fp32"):
            assert worst < 1e-4, (name, worst)
        else:
            assert worst < 0.05, (name, worst)


@pytest.mark.parametrize("kind", ["fused-fp32", "plain-fp32"])
def test_max_sessions_evicts_idle_then_refuses_or_waits(kinds: dict[str, Path], kind: str) -> None:
    model = edge_slm.load(kinds[kind], options=edge_slm.LoadOptions(max_sessions=2))
    one, two, three = (model.conversation() for _ in range(3))
    one.generate(SYSTEM + "Hi", max_new_tokens=2)
    two.generate(SYSTEM + "Hello", max_new_tokens=2)
    assert model.capacity().live_sessions == 2
    three.generate(SYSTEM + "Hey", max_new_tokens=2)  # takes the least recently used slot
    assert one.cached_tokens == () and two.cached_tokens != ()
    # Both slots generating: a third caller is refused with a typed error...
    streams = [
        two.stream(SYSTEM + "a", max_new_tokens=50),
        three.stream(SYSTEM + "b", max_new_tokens=50),
    ]
    for stream in streams:
        next(stream)
    with pytest.raises(edge_slm.CapacityError, match="max_sessions"):
        one.generate(SYSTEM + "Hi", max_new_tokens=2)
    assert model.capacity().generating == 2
    streams[0].close()  # ...and served once a stream ends
    assert one.generate(SYSTEM + "Hi", max_new_tokens=2).token_ids
    streams[1].close()
    for conversation in (one, two, three):
        conversation.close()
    assert model.capacity().live_sessions == 0 and model.capacity().kv_bytes == 0


def test_a_caller_may_wait_for_a_slot(kinds: dict[str, Path]) -> None:
    model = edge_slm.load(
        kinds["fused-fp32"], options=edge_slm.LoadOptions(max_sessions=1, wait_s=10)
    )
    stream = model.stream(SYSTEM + "a", max_new_tokens=50)
    next(stream)
    threading.Timer(0.3, stream.close).start()
    start = time.monotonic()
    result = model.generate(SYSTEM + "b", max_new_tokens=2)
    assert result.token_ids and time.monotonic() - start >= 0.25


@pytest.mark.parametrize("kind", ["fused-fp32", "plain-fp32"])
def test_kv_memory_limit_is_a_typed_error(kinds: dict[str, Path], kind: str) -> None:
    model = edge_slm.load(kinds[kind], options=edge_slm.LoadOptions(max_kv_bytes=1000))
    with pytest.raises(edge_slm.CapacityError, match="max_kv_bytes=1000"):
        model.generate(SYSTEM + "Hi", max_new_tokens=4)
    assert model.capacity().live_sessions == 0
    with pytest.raises(edge_slm.InvalidArgumentError, match="max_sessions"):
        edge_slm.LoadOptions(max_sessions=0)
    with pytest.raises(edge_slm.InvalidArgumentError, match="threads"):
        edge_slm.LoadOptions(threads=100_000)


def test_one_conversation_serves_one_call_at_a_time(kinds: dict[str, Path]) -> None:
    model = edge_slm.load(kinds["fused-fp32"])
    with model.conversation() as conversation:
        stream = conversation.stream(SYSTEM + "a", max_new_tokens=20)
        next(stream)
        with pytest.raises(edge_slm.BusyError, match="already generating"):
            conversation.generate("b", max_new_tokens=2)
        stream.close()
        assert conversation.generate(SYSTEM + "b", max_new_tokens=2).token_ids
    with pytest.raises(edge_slm.InvalidArgumentError, match="closed"):
        conversation.generate("c", max_new_tokens=2)


def test_kv_memory_grows_to_need_and_is_freed(kinds: dict[str, Path]) -> None:
    model = edge_slm.load(kinds["fused-fp32"])
    assert model.capacity().kv_bytes == 0
    with model.conversation() as conversation:
        conversation.generate("Hi", max_new_tokens=3)
        pool = model.backend.pool
        context = model.manifest.context_length
        assert pool.rows == 1 and pool.capacity == min(MIN_CAPACITY, context)
        assert model.capacity().kv_bytes == pool.capacity * model.decoder.bytes_per_position
        kept = conversation.cached_tokens
        assert len(kept) > 0
    assert model.capacity().kv_bytes == 0


def test_generate_batch_on_the_fused_graph_is_one_forward_per_step(kinds: dict[str, Path]) -> None:
    model = edge_slm.load(kinds["fused-fp32"])
    prompts = [SYSTEM + "Where?", "Hello", SYSTEM + "When does the last train leave?"]
    one_by_one = [model.generate(p, max_new_tokens=8, temperature=0.0).token_ids for p in prompts]
    before = model.capacity()
    batch = model.generate_batch(prompts, max_new_tokens=8, temperature=0.0)
    after = model.capacity()
    assert [r.token_ids for r in batch] == one_by_one
    steps = after.batched_steps - before.batched_steps
    forwards = after.batches - before.batches
    lengths = [len(r.token_ids) for r in batch]
    assert steps == sum(n - 1 for n in lengths)  # every decode step went through a batch
    assert forwards == len(prompts) + max(lengths) - 1  # prefills, then one forward per step


def test_a_batch_larger_than_max_sessions_runs_in_groups(kinds: dict[str, Path]) -> None:
    """generate_batch never holds more rows at once than max_sessions (bounded memory)."""
    for kind in ("fused-fp32", "plain-fp32"):
        model = edge_slm.load(kinds[kind], options=edge_slm.LoadOptions(max_sessions=2))
        prompts = [SYSTEM + q for q in ("Where?", "When?", "Who?", "How?", "Why?")]
        alone = [model.generate(p, max_new_tokens=5, temperature=0.0).token_ids for p in prompts]
        batch = model.generate_batch(prompts, max_new_tokens=5, temperature=0.0)
        assert [r.token_ids for r in batch] == alone, kind
        assert model.capacity().live_sessions == 0
