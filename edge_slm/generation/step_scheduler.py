"""One forward at a time per model, and decode steps of several threads in one forward.

Every step that touches a fused model's shared KV pool goes through
:meth:`StepScheduler.submit`. The calling thread queues its request; if no forward is
running it becomes the leader: it waits a moment (``window_s``, 5 ms by default) for
the other threads that are decoding right now to queue theirs, takes the whole queue,
runs it (prefills one by one, then every decode step as one batched forward) and wakes
the others with their results. The others simply wait for theirs. There is no extra
thread, and a single caller never waits: the leader only waits for threads that
submitted a step within the last :data:`LIVE_S` seconds and have none queued.

Several streams advanced in turn on one thread never batch (one thread has one step
in flight at a time); they are still correct, as each conversation owns its KV rows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

LIVE_S = 0.05
"""A thread that submitted a step this recently is expected to submit the next one."""


@dataclass(eq=False)
class StepRequest:
    """One unit of work for the leader: a prefill or a decode step of one conversation."""

    kind: str  # "prefill" or "decode"
    state: Any
    token_ids: Sequence[int]
    all_positions: bool = False
    thread: int = field(default_factory=threading.get_ident)
    result: Any = None
    error: BaseException | None = None
    done: bool = False


class StepScheduler:
    """Serializes a model's forwards and batches the decode steps that meet.

    Args:
        run_batch: runs a list of requests, setting each one's ``result`` or
            ``error``; called with the run lock held, by one thread at a time.
        window_s: the longest a leader waits for other live threads' steps.
    """

    def __init__(self, run_batch: Callable[[list[StepRequest]], None], window_s: float) -> None:
        self._run_batch = run_batch
        self._window_s = window_s
        self._cv = threading.Condition()
        self._queue: list[StepRequest] = []
        self._leading = False
        self._live: dict[int, float] = {}
        self.run_lock = threading.Lock()
        """Held while a batch runs; :meth:`exclusive` takes it for other pool changes."""
        self.batches = 0
        self.batched_steps = 0

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off every forward while the block runs (pool changes outside a batch)."""
        with self.run_lock:
            yield

    def leave(self) -> None:
        """The calling thread has no more steps coming (its call ended)."""
        with self._cv:
            self._live.pop(threading.get_ident(), None)
            self._cv.notify_all()

    def submit(self, requests: Sequence[StepRequest]) -> None:
        """Run ``requests`` (from this thread), batched with other threads' steps.

        Returns when every request is done; raises the first request's error, if any.
        """
        me = threading.get_ident()
        with self._cv:
            self._live[me] = time.monotonic()
            self._queue.extend(requests)
            self._cv.notify_all()
            batch: list[StepRequest] | None = None
            try:
                while not all(r.done for r in requests):
                    if not self._leading:
                        self._leading = True
                        self._gather()
                        batch, self._queue = self._queue, []
                        break
                    self._cv.wait()
            except BaseException:  # e.g. KeyboardInterrupt while waiting: withdraw
                self._queue = [r for r in self._queue if r not in requests]
                self._live.pop(me, None)
                raise
        if batch is not None:
            self._lead(batch)
        for request in requests:
            if request.error is not None:
                raise request.error

    def _gather(self) -> None:
        """As the leader, wait (briefly) for the steps of every other live thread."""
        deadline = time.monotonic() + self._window_s
        while True:
            now = time.monotonic()
            queued = {r.thread for r in self._queue}
            missing = [
                t for t, seen in self._live.items() if t not in queued and now - seen < LIVE_S
            ]
            if not missing or now >= deadline:
                return
            self._cv.wait(deadline - now)

    def _lead(self, batch: list[StepRequest]) -> None:
        try:
            with self.run_lock:
                self._run_batch(batch)
                self.batches += 1
                self.batched_steps += sum(r.kind == "decode" for r in batch)
        except BaseException as exc:  # the requests' threads re-raise it
            for request in batch:
                if request.result is None and request.error is None:
                    request.error = exc
        finally:
            with self._cv:
                for request in batch:
                    request.done = True
                self._leading = False
                self._cv.notify_all()
