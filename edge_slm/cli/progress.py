"""Progress on stderr for long work: a bar in a terminal, a plain line now and then in a log.

Counted work (windows scored, texts classified, tensors quantized)::

    with Progress(total=len(windows), label="scoring", unit="windows") as bar:
        for window in windows:
            ...
            bar.update()

    for text in track(texts, label="embedding", unit="texts"):   # total optional
        ...

Named steps of unknown length (loading, exporting, validating) go through a
``Reporter``, a ``str -> None`` callable, and :func:`step`, which reports the start and
the duration; with :func:`stderr_reporter` on a terminal it also shows the seconds
elapsed while the step runs.

In a terminal (stderr is a TTY and ``TERM`` is not ``dumb``) the bar is redrawn in
place at most ten times a second. In a pipe or a log file nothing is redrawn: one plain
line every ``log_interval`` seconds (10 by default) and a summary line at the end, so
logs stay short. Results never go to stderr, so stdout stays clean for scripts.

Runtime code (standard library only): the build stage imports it too, never the other
way round.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TextIO, TypeVar

T = TypeVar("T")
Reporter = Callable[[str], None]

__all__ = [
    "Progress",
    "Reporter",
    "format_duration",
    "is_terminal",
    "silent_reporter",
    "stderr_reporter",
    "step",
    "track",
]


def is_terminal(stream: TextIO) -> bool:
    """True if ``stream`` is an interactive terminal that can redraw a line."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
    return bool(tty) and os.environ.get("TERM", "") != "dumb"


def format_duration(seconds: float) -> str:
    """``0:07``, ``12:03`` or ``1:02:03``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _rate(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


class Progress:
    """A progress bar on a terminal; occasional plain lines elsewhere.

    Args:
        total: how many units the work has (None: unknown, no bar, just a count).
        label: what is being done, shown first ("scoring", "classifying").
        unit: the unit counted ("windows", "texts").
        stream: where to draw (default: ``sys.stderr``).
        enabled: False draws nothing at all (a ``--no-progress`` option).
        log_interval: seconds between plain lines when ``stream`` is not a terminal.
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        label: str = "",
        unit: str = "items",
        stream: TextIO | None = None,
        enabled: bool = True,
        log_interval: float = 10.0,
    ) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.tty = is_terminal(self.stream)
        self.interval = 0.1 if self.tty else log_interval
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.closed = False
        self._width = 0

    def update(self, count: int = 1) -> None:
        """Count ``count`` more units done; redraw if it is time."""
        self.done += count
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self._draw(self.render(now))

    def close(self) -> None:
        """Draw the final state (and end the terminal line). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.enabled:
            self._draw(self.render(time.perf_counter(), final=True))
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def render(self, now: float, final: bool = False) -> str:
        """The line to show at time ``now`` (``time.perf_counter()``)."""
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        head = f"{self.label}: " if self.label else ""
        if final or not self.tty:
            count = f"{self.done:,}" if self.total is None else f"{self.done:,}/{self.total:,}"
            return (
                f"{head}{count} {self.unit} in {format_duration(elapsed)} "
                f"({_rate(rate)} {self.unit}/s)"
            )
        if self.total is None or self.total <= 0:
            return f"{head}{self.done:,} {self.unit}  {_rate(rate)} {self.unit}/s  " + (
                format_duration(elapsed)
            )
        fraction = min(self.done / self.total, 1.0)
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        tail = (
            f" {100 * fraction:3.0f}%  {self.done:,}/{self.total:,} {self.unit}  "
            f"{_rate(rate)} {self.unit}/s  ETA {format_duration(left)}"
        )
        columns = shutil.get_terminal_size((80, 24)).columns
        width = max(10, min(30, columns - len(head) - len(tail) - 3))
        filled = round(width * fraction)
        return f"{head}[{'#' * filled}{'-' * (width - filled)}]{tail}"

    def _draw(self, line: str) -> None:
        if self.tty:
            pad = " " * max(0, self._width - len(line))
            self._width = len(line)
            self.stream.write(f"\r{line}{pad}")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def track(
    items: Iterable[T],
    *,
    total: int | None = None,
    label: str = "",
    unit: str = "items",
    stream: TextIO | None = None,
    enabled: bool = True,
) -> Iterator[T]:
    """Yield ``items`` while counting them on a :class:`Progress` (closed at the end).

    ``total`` defaults to ``len(items)`` when ``items`` has a length.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, label=label, unit=unit, stream=stream, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update()


def stderr_reporter(message: str) -> None:
    """Print a progress message to stderr (stdout stays clean for results)."""
    print(message, file=sys.stderr, flush=True)


def silent_reporter(message: str) -> None:
    """Discard progress messages."""


@contextmanager
def step(report: Reporter, name: str) -> Iterator[None]:
    """Report ``name`` when a step starts and its duration when it ends.

    With :func:`stderr_reporter` on a terminal, the start line shows the seconds
    elapsed while the step runs (redrawn once a second by a background thread).
    """
    start = time.perf_counter()
    ticker = None
    if report is stderr_reporter and is_terminal(sys.stderr):
        ticker = _Ticker(f"… {name}", start)
        ticker.begin()
    else:
        report(f"… {name}")
    try:
        yield
    except BaseException:
        if ticker is not None:
            ticker.end(keep=True)  # the step that failed stays on screen
        raise
    if ticker is not None:
        ticker.end(keep=False)
    report(f"✓ {name} ({time.perf_counter() - start:.1f} s)")


class _Ticker:
    """Redraws ``text  12 s`` on the current terminal line until ended."""

    def __init__(self, text: str, start: float) -> None:
        self.text, self.start = text, start
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def begin(self) -> None:
        self._draw()
        self.thread.start()

    def end(self, keep: bool) -> None:
        self.stop.set()
        self.thread.join()
        # the result line replaces the ticking one, unless the step failed
        sys.stderr.write("\n" if keep else "\r\033[K")
        sys.stderr.flush()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self._draw()

    def _draw(self) -> None:
        elapsed = format_duration(time.perf_counter() - self.start)
        sys.stderr.write(f"\r{self.text}  {elapsed}")
        sys.stderr.flush()
