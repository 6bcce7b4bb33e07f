"""Who holds KV memory: conversation states, their slots, and the model's limits.

A :class:`KVState` is one conversation's KV cache as the model sees it: the token ids
whose keys and values are stored, and where they are stored (a row of the fused
graph's shared pool, or the plain graph's own arrays). A :class:`SlotTable` gives
states their slots, at most ``max_sessions`` at once: a call takes a slot when it
starts (its state keeps it while idle, for prefix reuse), an idle state loses its KV
to a newcomer when every slot is taken (least recently used first), and a call that
finds every slot generating waits ``wait_s``, then raises :class:`CapacityError`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from edge_slm.errors import BusyError, CapacityError
from edge_slm.generation.plain_step import KVCache


@dataclass(eq=False)
class KVState:
    """One conversation's KV cache: the ids it encodes and where it lives.

    Attributes:
        tokens: the token ids whose keys and values are stored, in order.
        slot: the slot this state holds (None: none, its KV is gone).
        cache: the plain graph's arrays (None for the fused graph, whose KV is the
            pool's row ``slot``).
        busy: a call is generating with this state.
        last_used: monotonic time the last call ended (for eviction).
    """

    tokens: list[int] = field(default_factory=list)
    slot: int | None = None
    cache: KVCache | None = None
    busy: bool = False
    last_used: float = 0.0

    def forget(self) -> None:
        """Drop the stored KV (the next call computes its prompt from scratch)."""
        self.tokens = []
        self.cache = None


class SlotTable:
    """At most ``max_sessions`` states hold KV at once; see the module docstring."""

    def __init__(self, max_sessions: int, wait_s: float) -> None:
        self.max_sessions = max_sessions
        self._wait_s = wait_s
        self._cv = threading.Condition()
        self._holders: dict[int, KVState] = {}
        self.waiting = 0
        """Calls waiting for a slot right now."""

    def acquire(self, state: KVState) -> None:
        """Mark ``state`` generating and make sure it holds a slot.

        Raises:
            BusyError: ``state`` is already generating (one call at a time).
            CapacityError: every slot is generating and none freed within ``wait_s``.
        """
        deadline = time.monotonic() + self._wait_s
        with self._cv:
            if state.busy:
                raise BusyError(
                    "this conversation is already generating; finish or close its stream "
                    "first, or use another conversation"
                )
            while state.slot is None:
                free = next(i for i in range(self.max_sessions + 1) if i not in self._holders)
                if free < self.max_sessions:
                    self._holders[free] = state
                    state.slot = free
                    state.forget()
                    break
                idle = [s for s in self._holders.values() if not s.busy]
                if idle:
                    victim = min(idle, key=lambda s: s.last_used)
                    assert victim.slot is not None
                    del self._holders[victim.slot]
                    victim.slot = None
                    victim.forget()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CapacityError(
                        f"all {self.max_sessions} conversation slots of this model are "
                        "generating (max_sessions); retry later, or load with a larger "
                        "max_sessions or a wait_s"
                    )
                self.waiting += 1
                try:
                    self._cv.wait(remaining)
                finally:
                    self.waiting -= 1
            state.busy = True

    def finish(self, state: KVState) -> None:
        """The call on ``state`` ended; it keeps its slot, idle."""
        with self._cv:
            state.busy = False
            state.last_used = time.monotonic()
            self._cv.notify_all()

    def release(self, state: KVState) -> None:
        """``state`` gives its slot back and forgets its KV."""
        with self._cv:
            if state.slot is not None and self._holders.get(state.slot) is state:
                del self._holders[state.slot]
            state.slot = None
            state.busy = False
            state.forget()
            self._cv.notify_all()

    def snapshot(self) -> dict[int, KVState]:
        """The slots held right now."""
        with self._cv:
            return dict(self._holders)

    @property
    def live(self) -> int:
        """States holding a slot."""
        return len(self._holders)

    @property
    def generating(self) -> int:
        """States in a call."""
        with self._cv:
            return sum(s.busy for s in self._holders.values())
