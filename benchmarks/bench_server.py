"""Concurrent clients against OpenAI-compatible servers: ``edge-slm serve`` and llama.cpp's.

Usage (from the repository root; ``make bench-server`` sets up the peers and runs it):

    .venv/bin/python benchmarks/bench_server.py [--engines edge-slm,llama-server]
        [--rounds 3] [--concurrency 1,2,4,8] [--max-tokens 128] [--bundle DIR]
        [--gguf FILE] [--threads 2] [--edge-args "..."] [--out docs/performance-server.md]

Engines (``--engines``, comma-separated, default ``edge-slm,llama-server,llama-cpp-python``):

* ``edge-slm``: ``.venv/bin/edge-slm serve BUNDLE --port P --threads THREADS --max-live
  C --quiet`` (C the highest concurrency; plus ``--edge-args``), on the demo's 4-bit
  bundle by default (``bundles/smollm2-135m-instruct-int4``: the GGUF's own
  Q4_1 blocks);
* ``llama-server``: llama.cpp's server on the same GGUF, ``-t/-tb THREADS``, ``-np`` slots
  for the highest concurrency, ``--cont-batching`` (concurrent requests share each
  decode step), built by ``benchmarks/peers.py``;
* ``llama-cpp-python``: its OpenAI server (``python -m llama_cpp.server``), which answers
  one request at a time (a global lock): the queueing baseline.

Each round starts every engine's server in a fresh process (engines interleaved, the
order reversed every other round, so that a busy machine slows them alike), waits for
``/health`` (``/v1/models`` for llama-cpp-python) to answer 200, sends one short untimed
warm-up request, then for each concurrency c: c client threads (one HTTP connection
each, started together) send the same streamed chat request: same prompt, greedy
(``temperature: 0``), ``max_tokens`` tokens with the end-of-text tokens banned by
``logit_bias`` (-100, the OpenAI field every engine here reads) so that every answer is
exactly ``max_tokens`` long; ``stream_options.include_usage`` asks for the count. Per
client: time to first token (request sent to first chunk with text) and completion
tokens (``usage``, or the text chunks when a server sends none). Aggregate tokens/s = all
clients' completion tokens / wall time (first request sent to last answer done). A
client whose token count is not ``max_tokens`` is flagged in the table and on stderr.
The server's peak RSS is read from ``/proc`` before it is stopped.

The markdown table (medians over rounds; ratios = median of the per-round ratios of
edge-slm to each llama.cpp server, with the rounds' values) goes to ``--out``; every
client's numbers to ``--raw-json`` if given. Server logs: ``.cache/bench-server/``.
Only the standard library and httpx on the client side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import peers  # benchmarks/peers.py: llama.cpp's servers
from peers import GGUF, ROOT

BUNDLE = ROOT / "bundles/smollm2-135m-instruct-int4-small"  # int4-search, the fastest
LOGS = ROOT / ".cache/bench-server"
EDGE = "edge-slm"
LLAMA_SERVER = "llama-server"
LLAMA_PYTHON = "llama-cpp-python"
ENGINES = (EDGE, LLAMA_SERVER, LLAMA_PYTHON)
PEERS = (LLAMA_SERVER, LLAMA_PYTHON)  # the ratios' denominators
PROMPT = (
    "Write a long story about an old lighthouse keeper who climbs the spiral stairs every "
    "evening, counting the steps and listening to the sea, while the ships pass far out in "
    "the dark. Describe the storms, the visitors and the letters he writes."
)
# SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>: banned so that no answer ends early
BANNED = (0, 1, 2)
READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 900.0


@dataclass
class Client:
    """One client's request: when sent, first text, done; tokens and how counted."""

    sent: float = 0.0
    first: float | None = None
    done: float = 0.0
    tokens: int = 0
    counted_by: str = "usage"
    text: str = ""
    error: str | None = None


@dataclass
class Level:
    """One concurrency level of one round of one engine."""

    concurrency: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    ttft_median_s: float
    ttft_max_s: float
    short: list[int] = field(default_factory=list)  # token counts != max_tokens
    errors: list[str] = field(default_factory=list)
    distinct_texts: int = 1  # greedy, same prompt: more than 1 means the batch changed numbers
    counted_by: str = "usage"  # how the servers' answers gave their token counts


@dataclass
class Run:
    """One engine's fresh server process in one round."""

    engine: str
    round: int
    ready_s: float
    peak_rss_bytes: int
    levels: list[Level]
    omp_wait_policy: str = "default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(engine: str, port: int, args: argparse.Namespace) -> tuple[list[str], str]:
    """The command starting ``engine`` on ``port``, and the path that answers 200 when ready."""
    top = max(args.concurrency)
    if engine == EDGE:
        command = [
            str(ROOT / ".venv/bin/edge-slm"), "serve", str(args.bundle), "--port", str(port),
            "--threads", str(args.threads), "--max-live", str(top), "--quiet",
        ]  # fmt: skip
        return command + args.edge_args.split(), "/health"
    if engine == LLAMA_SERVER:
        slot_ctx = max(1024, 2 * args.max_tokens + 512)  # prompt + answer, with room
        binary = args.llama_server or peers.ensure_llama_server()
        command = peers.llama_server_command(
            Path(binary), args.gguf, port, args.threads, slots=top, slot_ctx=slot_ctx
        )
        return command, "/health"
    if engine == LLAMA_PYTHON:
        python = args.llama_python or peers.ensure_llama_venv()
        ctx = max(2048, 2 * args.max_tokens + 512)
        return peers.llama_python_command(Path(python), args.gguf, port, args.threads, ctx), (
            "/v1/models"
        )
    raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")


def wait_ready(proc: subprocess.Popen[bytes], base: str, path: str, log: Path) -> float:
    """Seconds until ``path`` answers 200; raises if the process dies or time runs out."""
    start = time.perf_counter()
    with httpx.Client(timeout=5.0) as client:
        while time.perf_counter() - start < READY_TIMEOUT_S:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(f"server exited ({proc.returncode}):\n" + "\n".join(tail))
            try:
                if client.get(base + path).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{base}{path} not ready after {READY_TIMEOUT_S:.0f} s (log: {log})")


def peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server we started, then SIGKILL it if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def request_body(model: str, max_tokens: int) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {str(token): -100 for token in BANNED},
    }


def stream_one(url: str, body: dict[str, object], start: threading.Barrier, out: Client) -> None:
    """One client: wait for the others, send, read the SSE stream to its end."""
    chunks, usage = 0, None
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        client.get(url.rsplit("/v1/", 1)[0] + "/v1/models")  # connect before the start
        start.wait()
        out.sent = time.perf_counter()
        try:
            with client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    response.read()
                    out.error = f"HTTP {response.status_code}: {response.text[:200]}"
                    return
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if event.get("usage"):
                        usage = event["usage"].get("completion_tokens")
                    for choice in event.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            if out.first is None:
                                out.first = time.perf_counter()
                            chunks += 1
                            out.text += piece
        except (httpx.HTTPError, json.JSONDecodeError) as error:
            out.error = f"{type(error).__name__}: {error}"
        out.done = time.perf_counter()
    if usage is not None:
        out.tokens = int(usage)
    else:
        out.tokens, out.counted_by = chunks, "chunks"


def run_level(url: str, model: str, concurrency: int, max_tokens: int) -> Level:
    """``concurrency`` clients at once; their aggregate rate and times to first token."""
    body = request_body(model, max_tokens)
    barrier = threading.Barrier(concurrency)
    clients = [Client() for _ in range(concurrency)]
    threads = [threading.Thread(target=stream_one, args=(url, body, barrier, c)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = max(c.done for c in clients) - min(c.sent for c in clients)
    tokens = sum(c.tokens for c in clients)
    ttfts = [(c.first or c.done) - c.sent for c in clients]
    return Level(
        concurrency=concurrency,
        wall_s=wall,
        tokens=tokens,
        tokens_per_s=tokens / wall,
        ttft_median_s=statistics.median(ttfts),
        ttft_max_s=max(ttfts),
        short=[c.tokens for c in clients if c.tokens != max_tokens],
        errors=[c.error for c in clients if c.error],
        distinct_texts=len({c.text for c in clients}),
        counted_by="/".join(sorted({c.counted_by for c in clients})),
    )


def run_engine(engine: str, round_: int, args: argparse.Namespace) -> Run:
    """A fresh server for ``engine``: ready, warmed up, every concurrency level, stopped."""
    port = free_port()
    command, ready_path = server_command(engine, port, args)
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{engine}-round{round_}.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    wait = "default"
    if engine in PEERS:  # llama.cpp's OpenMP threads: our engine's spinning rule
        env = {k: v for k, v in env.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
        wait = args.llama_wait
        if wait == "auto":
            busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
            wait = "passive" if busy else "default"
        if wait != "default":
            env["OMP_WAIT_POLICY"] = wait.upper()
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(proc, base, ready_path, log)
        models = httpx.get(base + "/v1/models", timeout=30).json().get("data") or [{}]
        model = str(models[0].get("id", "default"))
        url = base + "/v1/chat/completions"
        warm = run_level(url, model, 1, 8)  # first-request costs (allocations) untimed
        if warm.errors:
            raise RuntimeError(f"{engine}: warm-up failed: {warm.errors[0]}")
        levels = []
        for c in args.concurrency:
            level = run_level(url, model, c, args.max_tokens)
            levels.append(level)
            flag = ""
            if level.short or level.errors:
                flag = f"  !! token counts {level.short} errors {level.errors[:2]}"
            print(
                f"  {engine} c={c}: {level.tokens_per_s:.1f} tok/s, ttft median "
                f"{level.ttft_median_s:.3f} s{flag}",
                file=sys.stderr,
                flush=True,
            )
        return Run(engine, round_, ready, peak_rss(proc.pid), levels, wait)
    finally:
        stop(proc)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def write_table(runs: list[Run], args: argparse.Namespace, loads: tuple[float, float]) -> str:
    """The markdown report: one row per engine and concurrency, medians over rounds."""
    engines = [e for e in args.engines if any(r.engine == e for r in runs)]
    by = {
        (r.engine, r.round, lv.concurrency): lv for r in runs for lv in r.levels
    }  # fmt: skip
    rounds = sorted({r.round for r in runs})
    peers_here = [p for p in PEERS if p in engines] if EDGE in engines else []
    head = (
        "| engine | clients | aggregate tok/s | per-client tok/s | TTFT median (s) | TTFT max (s) |"
    )
    rule = "|---|---:|---:|---:|---:|---:|"
    for peer in peers_here:
        head += f" edge-slm / {peer} (rounds) |"
        rule += "---|"
    lines = [head + " checks |", rule + "---|"]
    flagged = []
    for engine in engines:
        for c in args.concurrency:
            levels = [by[(engine, r, c)] for r in rounds if (engine, r, c) in by]
            rate = _median([lv.tokens_per_s for lv in levels])
            row = (
                f"| {engine} | {c} | {rate:.1f} | {rate / c:.1f} | "
                f"{_median([lv.ttft_median_s for lv in levels]):.3f} | "
                f"{_median([lv.ttft_max_s for lv in levels]):.3f} |"
            )
            for peer in peers_here:
                if engine != EDGE:
                    row += " |"
                    continue
                ratios = [
                    by[(EDGE, r, c)].tokens_per_s / by[(peer, r, c)].tokens_per_s
                    for r in rounds
                    if (EDGE, r, c) in by and (peer, r, c) in by
                ]
                each = ", ".join(f"{x:.2f}" for x in ratios)
                row += f" {_median(ratios):.2f} ({each}) |"
            bad = [lv for lv in levels if lv.short or lv.errors]
            check = "ok" if not bad else f"**{len(bad)} round(s) not {args.max_tokens} tokens**"
            distinct = max(lv.distinct_texts for lv in levels)
            if distinct > 1:
                check += f"; {distinct} different answers"
            if any("chunks" in lv.counted_by for lv in levels):
                check += "; tokens counted as text chunks (no usage sent)"
            if bad:
                flagged.append(f"{engine} c={c}")
            lines.append(row + f" {check} |")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    bundle = args.bundle.relative_to(ROOT) if args.bundle.is_relative_to(ROOT) else args.bundle
    rss = {
        e: _median([r.peak_rss_bytes / 2**20 for r in runs if r.engine == e]) for e in engines
    }  # fmt: skip
    ready = {e: _median([r.ready_s for r in runs if r.engine == e]) for e in engines}
    notes = [
        f"Measured {when} on {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} "
        f"threads per server; {len(rounds)} round(s) of fresh server processes, engines "
        f"interleaved; load average (1 min) {loads[0]:.1f} before, {loads[1]:.1f} after.",
        f"Each client: one streamed chat request, {args.max_tokens} greedy tokens "
        "(end-of-text banned by `logit_bias`), the same prompt for every client. Aggregate "
        "tok/s = completion tokens of all clients / wall time; TTFT = request sent to first "
        "text chunk (median and max over the clients, then median over rounds).",
        "Servers: "
        + "; ".join(f"{e}: ready in {ready[e]:.1f} s, peak RSS {rss[e]:.0f} MiB" for e in engines)
        + ".",
    ]
    how = {
        EDGE: f"edge-slm: `edge-slm serve {bundle} --threads {args.threads} --max-live "
        f"{max(args.concurrency)}{' ' + args.edge_args if args.edge_args else ''}`",
        LLAMA_SERVER: f"llama-server (llama.cpp vendored by llama-cpp-python "
        f"{peers.LLAMA_VERSION}): `-t {args.threads} -tb {args.threads} -np "
        f"{max(args.concurrency)} --cont-batching` on `{args.gguf.name}`: concurrent "
        "requests share each decode step",
        LLAMA_PYTHON: f"llama-cpp-python {peers.LLAMA_VERSION}'s server on the same GGUF: "
        "one request at a time (a global lock; the others wait)",
    }
    notes.append("; ".join(how[e] for e in engines) + ".")
    waits = sorted({r.omp_wait_policy for r in runs if r.engine in PEERS})
    if waits:
        notes.append(
            f"llama.cpp's OpenMP wait policy: {', '.join(waits)} (`--llama-wait "
            f"{args.llama_wait}`: on a machine already busy, spinning OpenMP workers collapse "
            "the rate, so they sleep there, as our engine stops spinning)."
        )
    if flagged:
        notes.append("**Flagged** (token counts not all equal to max_tokens, or errors): "
                     + ", ".join(flagged) + ".")  # fmt: skip
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def _levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--engines",
        type=lambda s: [e.strip() for e in s.split(",") if e.strip()],
        default=list(ENGINES),
        help=f"comma-separated, from {', '.join(ENGINES)} (default: all)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=_levels, default=[1, 2, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="every server's threads")
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--gguf", type=Path, default=GGUF)
    parser.add_argument(
        "--edge-args", default="", help="more options for `edge-slm serve` (one string)"
    )
    parser.add_argument(
        "--llama-wait",
        choices=("auto", "default", "passive", "active"),
        default="auto",
        help="OMP_WAIT_POLICY of the llama.cpp servers (auto: passive when the load average "
        "already fills the CPUs, as our engine turns spinning off; else libgomp's default)",
    )
    parser.add_argument("--llama-server", help="a llama-server binary (default: peers.py's)")
    parser.add_argument("--llama-python", help="a python with llama-cpp-python[server]")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/performance-server.md")
    parser.add_argument("--raw-json", type=Path, help="also write every level's numbers here")
    args = parser.parse_args()
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
    args.bundle, args.gguf = args.bundle.resolve(), args.gguf.resolve()
    if EDGE in args.engines and not (args.bundle / "manifest.json").is_file():
        parser.error(f"no bundle at {args.bundle}: run `make demo` first")
    if set(args.engines) & set(PEERS) and not args.gguf.is_file():
        parser.error(f"no GGUF at {args.gguf}: run examples/fetch_assets.py first")
    try:  # set-up first: a compile failure shows before any measuring
        if LLAMA_SERVER in args.engines and not args.llama_server:
            args.llama_server = str(peers.ensure_llama_server())
        if LLAMA_PYTHON in args.engines and not args.llama_python:
            args.llama_python = str(peers.ensure_llama_venv())
    except peers.PeerError as error:
        print(f"setting up llama.cpp failed: {error}", file=sys.stderr)
        return 1
    load_before = os.getloadavg()[0]
    runs: list[Run] = []
    for round_ in range(1, args.rounds + 1):
        order = args.engines if round_ % 2 else args.engines[::-1]
        for engine in order:
            print(f"round {round_}/{args.rounds}: {engine}", file=sys.stderr, flush=True)
            runs.append(run_engine(engine, round_, args))
    table = write_table(runs, args, (load_before, os.getloadavg()[0]))
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Concurrent clients: edge-slm serve and llama.cpp's servers\n\n"
        "Written by `benchmarks/bench_server.py` (`make bench-server`).\n\n" + table
    )
    if args.raw_json:
        args.raw_json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    short = any(lv.short or lv.errors for r in runs for lv in r.levels)
    if short:
        print("WARNING: some answers were not max_tokens long (see the table)", file=sys.stderr)
    return 2 if short else 0


if __name__ == "__main__":
    raise SystemExit(main())
