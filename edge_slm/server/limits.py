"""Admission limits: generations decoding at once, requests waiting, and model capacity.

A request takes one slot per generation it runs (``n`` choices take ``n``). When every
slot is taken it waits in a bounded queue; a full queue answers 429, a wait longer than
the request's deadline answers 503 (both with ``Retry-After``). The runtime batches the
decoding steps of concurrent generations on one model, so the slots are what bounds its
batch; the model's own ``max_sessions`` (from :func:`model_capacity`) caps the default.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from edge_slm.server.errors import busy


@dataclass(frozen=True)
class Capacity:
    """A model's conversations and KV memory, as ``model.capacity()`` reports them."""

    live_sessions: int
    max_sessions: int | None
    kv_bytes: int
    max_kv_bytes: int | None
    generating: int = 0
    waiting: int = 0
    batches: int = 0
    """Forwards the runtime's step scheduler ran (its batched decode steps / this = mean batch)."""
    batched_steps: int = 0


def model_capacity(model: Any) -> Capacity | None:
    """``model.capacity()`` as a :class:`Capacity`, or None for a model without one
    (encoders, which hold no conversations)."""
    method = getattr(model, "capacity", None)
    if method is None:
        return None
    info = method()
    return Capacity(
        live_sessions=int(info.live_sessions),
        max_sessions=None if info.max_sessions is None else int(info.max_sessions),
        kv_bytes=int(info.kv_bytes),
        max_kv_bytes=None if info.max_kv_bytes is None else int(info.max_kv_bytes),
        generating=int(getattr(info, "generating", 0)),
        waiting=int(getattr(info, "waiting", 0)),
        batches=int(getattr(info, "batches", 0)),
        batched_steps=int(getattr(info, "batched_steps", 0)),
    )


class Admission:
    """Slots for generations running at once, and a bounded queue of waiting requests."""

    def __init__(self, max_live: int, max_queue: int) -> None:
        if max_live < 1 or max_queue < 0:
            raise ValueError(f"need max_live >= 1 and max_queue >= 0, got {max_live}, {max_queue}")
        self.max_live = max_live
        self.max_queue = max_queue
        self._live = 0
        self._waiting = 0
        self._cond = threading.Condition()

    @property
    def live(self) -> int:
        """Slots in use (generations running)."""
        return self._live

    @property
    def waiting(self) -> int:
        """Requests waiting for slots (the queue depth)."""
        return self._waiting

    def acquire(self, slots: int, timeout_s: float | None) -> None:
        """Take ``slots`` slots, waiting at most ``timeout_s`` (None: no limit).

        Raises:
            ApiError: 429 when the queue is full, 503 when the wait timed out.
        """
        if slots > self.max_live:
            raise ValueError(f"{slots} slots asked, only {self.max_live} exist")
        end = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            if self._live + slots <= self.max_live and self._waiting == 0:
                self._live += slots
                return
            if self._waiting >= self.max_queue:
                raise busy(
                    f"the server is busy: {self._live} generations running and "
                    f"{self._waiting} requests waiting (the most it queues); retry later",
                    429,
                    "queue_full",
                )
            self._waiting += 1
            try:
                while self._live + slots > self.max_live:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        raise busy(
                            "the server is busy: no generation slot freed up before the "
                            "request's deadline; retry later",
                            503,
                            "queue_timeout",
                        )
                    self._cond.wait(left)
                self._live += slots
            finally:
                self._waiting -= 1
                self._cond.notify_all()

    def release(self, slots: int) -> None:
        """Give back ``slots`` slots."""
        with self._cond:
            self._live -= slots
            self._cond.notify_all()
