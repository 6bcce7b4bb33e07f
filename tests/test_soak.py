"""The soak (opt-in: ``make test-soak``, ``pytest -m soak``): 1,000 mixed generations and
server requests on a tiny bundle in a subprocess (tests/soak_worker.py); memory and
latency stay flat.

Memory: RSS grows by less than :data:`RSS_GROWTH` over the last 500 requests (the first
500 are the warm-up: allocator pools, onnxruntime arenas, caches filling). Latency: the
median of the last 100 requests is within :data:`LATENCY_RATIO` of the median of
requests 100-200 (every window of 100 holds the same mix of kinds).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("soak_worker.py")
REQUESTS = 1000
RSS_GROWTH = 20 << 20
LATENCY_RATIO = 1.5

pytestmark = pytest.mark.soak


def test_soak_memory_and_latency_flat(fused_bundles: dict[str, Path]) -> None:
    done = subprocess.run(
        [sys.executable, str(WORKER), str(fused_bundles["llama"]), "--requests", str(REQUESTS)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    rss, latencies = figures["rss"], figures["latencies"]
    assert len(latencies) == REQUESTS and len(rss) == REQUESTS // 100 + 1

    mib = [round(r / (1 << 20), 1) for r in rss]
    medians = [
        round(statistics.median(latencies[i : i + 100]) * 1000, 2) for i in range(0, REQUESTS, 100)
    ]
    growth = rss[-1] - rss[REQUESTS // 200]
    early, late = statistics.median(latencies[100:200]), statistics.median(latencies[-100:])
    print(f"\nsoak: {REQUESTS} requests in {sum(latencies):.1f} s")
    print(f"soak: RSS (MiB) at start and after every 100 requests: {mib}")
    print(f"soak: median latency (ms) of each 100 requests: {medians}")
    print(
        f"soak: RSS growth over the last {REQUESTS // 2} requests: {growth / (1 << 20):.2f} MiB"
        f" (bound {RSS_GROWTH >> 20} MiB); median latency requests 100-200 {early * 1000:.2f}"
        f" ms, last 100 {late * 1000:.2f} ms (ratio {late / early:.2f}, bound {LATENCY_RATIO})"
    )
    assert growth < RSS_GROWTH, mib
    assert late < LATENCY_RATIO * early, medians
