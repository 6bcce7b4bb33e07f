"""``edge-slm serve BUNDLE [BUNDLE ...]``: the OpenAI-compatible local server (docs/server.md)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Serve bundles over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/classifications, /v1/models, plus /health and /metrics. Give a
text-generation bundle, and optionally a classifier and an embedder; name a bundle
with NAME=PATH (the default name is its folder's name). Any OpenAI client works:
point its base URL at http://HOST:PORT/v1. Stop the server with Ctrl-C or SIGTERM.
"""


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to ``subparsers`` (from ``add_subparsers``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve bundles over an OpenAI-compatible HTTP API",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "bundles", nargs="+", metavar="BUNDLE", help="bundle folder, or NAME=FOLDER"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for all)",
    )
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0: any free)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("EDGE_SLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* and /metrics "
        "(default: $EDGE_SLM_API_KEY, or no key)",
    )
    parser.add_argument(
        "--static",
        type=Path,
        metavar="DIR",
        help="serve the files of DIR at / (for example a kiosk page)",
    )
    parser.add_argument(
        "--cors-origin",
        metavar="ORIGIN",
        help="allow browser pages from ORIGIN (or *) to call the API (default: not allowed)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="largest max_tokens a request may ask for (default: the model's context length)",
    )
    parser.add_argument(
        "--max-live",
        type=int,
        metavar="N",
        help="generations running at once; more wait in the queue "
        "(default: the model's session limit, else 4)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=16,
        metavar="N",
        help="requests waiting for a slot before new ones get 429 (default: 16)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=64,
        metavar="N",
        help="open connections (one thread each) before new ones get 503 (default: 64)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=1_000_000,
        metavar="N",
        help="largest request body; larger ones get 413 (default: 1000000)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="deadline of a request, queueing included; a generation that reaches it ends "
        "with finish_reason 'length' (default: 300; 0: none)",
    )
    parser.add_argument(
        "--threads", type=int, help="onnxruntime threads per model (default: all CPUs)"
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="do not use the prepared-session cache"
    )
    parser.add_argument("--quiet", action="store_true", help="no access log on stderr")
    parser.set_defaults(run=run_serve)
    return parser


def _say(message: str) -> None:
    print(f"edge-slm serve: {message}", file=sys.stderr, flush=True)


def _check_bundles(sources: list[tuple[str, Path]]) -> str | None:
    for name, path in sources:
        if not (path / "manifest.json").is_file():
            return f"{str(path)!r} (model {name!r}) is not a bundle folder (no manifest.json)"
    return None


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT or SIGTERM; 0 on a clean stop, 2 on a start-up error."""
    from edge_slm.server import RunningServer, ServerConfig, parse_bundle_arg
    from edge_slm.server.runner import default_loader

    sources = [parse_bundle_arg(text) for text in args.bundles]
    problem = _check_bundles(sources)
    for value, name in (
        (args.max_queue, "--max-queue"),
        (args.max_connections, "--max-connections"),
    ):
        if value < (0 if name == "--max-queue" else 1):
            problem = problem or f"{name} must be positive, got {value}"
    if args.max_live is not None and args.max_live < 1:
        problem = problem or f"--max-live must be >= 1, got {args.max_live}"
    if args.static is not None and not args.static.is_dir():
        problem = problem or f"--static {str(args.static)!r} is not a folder"
    if problem:
        _say(f"error: {problem}")
        return 2
    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes,
        max_tokens=args.max_tokens,
        max_live=args.max_live,
        max_queue=args.max_queue,
        max_connections=args.max_connections,
        request_timeout_s=args.request_timeout or None,
        static_dir=args.static,
        cors_origin=args.cors_origin,
        quiet=args.quiet,
    )
    loader = default_loader(threads=args.threads, cache=False if args.no_cache else None)
    try:
        server = RunningServer(config, sources, loader)
    except (OSError, ValueError) as exc:
        _say(f"error: cannot listen on {args.host}:{args.port}: {exc}")
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        names = ", ".join(name for name, _ in sources)
        _say(f"listening on {server.url} (loading {names})")
        announced = False
        while not stop.wait(0.25):
            if announced or not server.registry.ready.is_set():
                continue
            announced = True
            if server.registry.state != "ready":
                _say(f"error: {server.registry.error}")
                server.stop()
                return 2
            _say(f"ready: {server.url}/v1 serves {names}")
        _say("stopping")
        server.stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str], prog: str = "edge-slm serve") -> int:
    """``edge-slm serve ...`` on its own parser (``argv`` after the word ``serve``)."""
    holder = argparse.ArgumentParser(prog=prog.rsplit(" ", 1)[0], add_help=False)
    parser = add_serve_parser(holder.add_subparsers())
    parser.prog = prog
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return run_serve(parser.parse_args(argv))
