"""Counters and histograms of the server, rendered in Prometheus' text format (0.0.4).

No client library: a few counters behind one lock. Gauges that belong to someone else
(queue depth, live generations, each model's KV memory) are read when ``/metrics`` is
scraped, through the callback the app passes to :meth:`Metrics.render`.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)

Labels = tuple[tuple[str, str], ...]
Gauge = tuple[str, str, Labels, float]
"""A gauge sample: name, help text, labels, value."""


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1


def _labels(labels: Labels, extra: Labels = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class Metrics:
    """The server's counters, safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[Labels, int] = defaultdict(int)
        self._prompt_tokens: dict[Labels, int] = defaultdict(int)
        self._completion_tokens: dict[Labels, int] = defaultdict(int)
        self._cancelled: dict[Labels, int] = defaultdict(int)
        self._ttft: dict[Labels, _Histogram] = {}
        self._rate: dict[Labels, _Histogram] = {}
        self.in_flight = 0

    # ------------------------------------------------------------------ updates
    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def request_finished(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.in_flight -= 1
            self._requests[(("endpoint", endpoint), ("status", str(status)))] += 1

    def count_request(self, endpoint: str, status: int) -> None:
        """A request that was never in flight (health, metrics, static, refused)."""
        with self._lock:
            self._requests[(("endpoint", endpoint), ("status", str(status)))] += 1

    def prompt_tokens(self, model: str, n: int) -> None:
        with self._lock:
            self._prompt_tokens[(("model", model),)] += n

    def completion_tokens(self, model: str, n: int) -> None:
        """Counted as tokens are generated, so a stopped generation counts what it made."""
        with self._lock:
            self._completion_tokens[(("model", model),)] += n

    def first_token(self, model: str, seconds: float) -> None:
        with self._lock:
            self._ttft.setdefault((("model", model),), _Histogram(TTFT_BUCKETS)).observe(seconds)

    def decode_rate(self, model: str, tokens_per_s: float) -> None:
        with self._lock:
            self._rate.setdefault((("model", model),), _Histogram(RATE_BUCKETS)).observe(
                tokens_per_s
            )

    def cancelled(self, reason: str) -> None:
        with self._lock:
            self._cancelled[(("reason", reason),)] += 1

    # ------------------------------------------------------------------ reading
    def completion_tokens_total(self, model: str) -> int:
        with self._lock:
            return self._completion_tokens.get((("model", model),), 0)

    def render(self, gauges: Iterable[Gauge] = ()) -> str:
        """The exposition text: counters, histograms, then ``gauges``."""
        lines: list[str] = []
        with self._lock:
            self._counter(
                lines,
                "edge_slm_requests_total",
                "HTTP requests answered, by endpoint and status.",
                self._requests,
            )
            self._counter(
                lines,
                "edge_slm_prompt_tokens_total",
                "Prompt tokens of generation requests.",
                self._prompt_tokens,
            )
            self._counter(
                lines,
                "edge_slm_completion_tokens_total",
                "Tokens generated (stopped generations included).",
                self._completion_tokens,
            )
            self._counter(
                lines,
                "edge_slm_generations_cancelled_total",
                "Generations stopped early (client disconnect, shutdown).",
                self._cancelled,
            )
            self._histogram(
                lines,
                "edge_slm_time_to_first_token_seconds",
                "From the request's arrival to its first generated text.",
                self._ttft,
            )
            self._histogram(
                lines,
                "edge_slm_decode_tokens_per_second",
                "Decode rate of each finished generation (after the first token).",
                self._rate,
            )
            in_flight = self.in_flight
        samples: dict[str, tuple[str, list[tuple[Labels, float]]]] = {}
        for name, help_text, labels, value in [
            ("edge_slm_requests_in_flight", "API requests being answered.", (), in_flight),
            *gauges,
        ]:
            samples.setdefault(name, (help_text, []))[1].append((labels, value))
        for name, (help_text, values) in samples.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            lines += [f"{name}{_labels(labels)} {_number(v)}" for labels, v in values]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _counter(lines: list[str], name: str, help_text: str, values: dict[Labels, int]) -> None:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        lines += [f"{name}{_labels(labels)} {v}" for labels, v in sorted(values.items())]

    @staticmethod
    def _histogram(
        lines: list[str], name: str, help_text: str, values: dict[Labels, _Histogram]
    ) -> None:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for labels, hist in sorted(values.items()):
            running = 0
            for bound, count in zip(hist.buckets, hist.counts, strict=False):
                running += count
                lines.append(f"{name}_bucket{_labels(labels, (('le', _number(bound)),))} {running}")
            lines.append(f"{name}_bucket{_labels(labels, (('le', '+Inf'),))} {hist.n}")
            lines.append(f"{name}_sum{_labels(labels)} {_number(hist.total)}")
            lines.append(f"{name}_count{_labels(labels)} {hist.n}")
