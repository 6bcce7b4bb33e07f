"""Progress reporting for the slow build steps (loading, exporting, validating)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Reporter = Callable[[str], None]


def stderr_reporter(message: str) -> None:
    """Print a progress line to stderr (stdout stays clean for results)."""
    print(message, file=sys.stderr, flush=True)


def silent_reporter(message: str) -> None:
    """Discard progress messages."""


@contextmanager
def step(report: Reporter, name: str) -> Iterator[None]:
    """Report ``name`` when a step starts and its duration when it ends."""
    report(f"… {name}")
    start = time.perf_counter()
    yield
    report(f"✓ {name} ({time.perf_counter() - start:.1f} s)")
