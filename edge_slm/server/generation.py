"""Run a request's generations, each on its own thread, and merge their chunks.

Every choice (``n``, or one per prompt of a list) is one call to the runtime's
``stream_chat`` / ``stream`` on a worker thread: concurrent calls on one model are
decoded together by the runtime, one forward per step for all of them. The HTTP
thread reads the merged events; cancelling (a client that disconnected, a shutdown)
makes each worker close its stream generator after its current token, which ends that
generation and frees its KV memory.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from edge_slm.server.metrics import Metrics
from edge_slm.server.openai_schema import Job
from edge_slm.server.registry import ServedModel

POLL_S = 0.02
"""How often (seconds) a waiting request checks whether its client is still there."""


@dataclass(frozen=True)
class Event:
    """A chunk of one choice, or the error that ended it."""

    job: Job
    chunk: Any = None
    error: BaseException | None = None


@dataclass
class ChoiceStats:
    """What a choice produced so far (usage, finish reason)."""

    tokens: int = 0
    finish_reason: str | None = None


class Run:
    """The generations of one request, started by :meth:`start`."""

    def __init__(
        self,
        served: ServedModel,
        jobs: tuple[Job, ...],
        options: dict[str, Any],
        seed: int | None,
        metrics: Metrics,
        started_at: float,
        shutting_down: threading.Event,
    ) -> None:
        self.served = served
        self.jobs = jobs
        self.options = options
        self.seed = seed
        self.metrics = metrics
        self.started_at = started_at
        self.shutting_down = shutting_down
        self.stats = {job.index: ChoiceStats() for job in jobs}
        self._events: queue.Queue[tuple[Job, Any, BaseException | None, bool]] = queue.Queue()
        self._cancel = threading.Event()
        self.cancel_reason: str | None = None
        self._threads: list[threading.Thread] = []
        self._done: set[int] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        for job in self.jobs:
            thread = threading.Thread(
                target=self._work, args=(job,), name=f"edge-slm-gen-{job.index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def cancel(self, reason: str) -> None:
        """Stop every generation after its current token (counted once per request)."""
        with self._lock:
            if not self._cancel.is_set() and self.running:
                self.cancel_reason = reason
                self.metrics.cancelled(reason)
            self._cancel.set()

    @property
    def running(self) -> bool:
        """Some generation has not ended yet."""
        return len(self._done) < len(self._threads)

    def join(self) -> None:
        """Wait for every worker (cancelled workers end within one token)."""
        for thread in self._threads:
            thread.join()

    def events(self, client_gone: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Chunks and errors as they come, until every generation ended.

        ``client_gone`` is polled every :data:`POLL_S` seconds; when it says so, or the
        server shuts down, the run is cancelled (its remaining chunks still drain).
        """
        remaining = {job.index for job in self.jobs}
        checked = time.monotonic()
        while remaining:
            try:
                job, chunk, error, done = self._events.get(timeout=POLL_S)
            except queue.Empty:
                job = None
            now = time.monotonic()
            if now - checked >= POLL_S or job is None:
                checked = now
                if self.shutting_down.is_set():
                    self.cancel("shutdown")
                elif client_gone is not None and not self._cancel.is_set() and client_gone():
                    self.cancel("disconnect")
            if job is None:
                continue
            if done:
                remaining.discard(job.index)
            else:
                yield Event(job, chunk, error)

    def _work(self, job: Job) -> None:
        options = dict(self.options)
        if self.seed is not None:
            options["seed"] = self.seed + job.seed_offset
        model, name = self.served.model, self.served.id
        stats = self.stats[job.index]
        first: float | None = None
        try:
            if job.messages is not None:
                stream = model.stream_chat([dict(m) for m in job.messages], **options)
            else:
                stream = model.stream(job.prompt, **options)
            try:
                for chunk in stream:
                    now = time.perf_counter()
                    stats.tokens += len(chunk.steps)
                    self.metrics.completion_tokens(name, len(chunk.steps))
                    if first is None:
                        first = now
                        self.metrics.first_token(name, now - self.started_at)
                    if chunk.finish_reason is not None:
                        stats.finish_reason = str(chunk.finish_reason)
                        if stats.tokens > 1 and now > first:
                            self.metrics.decode_rate(name, (stats.tokens - 1) / (now - first))
                    self._events.put((job, chunk, None, False))
                    if self._cancel.is_set():
                        break
            finally:
                stream.close()  # ends the generation and frees its KV memory
        except BaseException as exc:  # handed to the HTTP thread, which answers it
            self._events.put((job, None, exc, False))
        finally:
            with self._lock:
                self._done.add(job.index)
            self._events.put((job, None, None, True))
