"""The server's settings (``edge-slm serve`` options; docs/server.md lists the defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_LIVE = 4


@dataclass(frozen=True)
class ServerConfig:
    """Where to listen, who may call, and the limits each request is held to."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    """When set, /v1/* and /metrics need ``Authorization: Bearer <key>``; /health and
    static files stay public."""
    max_body_bytes: int = 1_000_000
    max_tokens: int | None = None
    """Cap on a request's max_tokens (None: the model's context length)."""
    max_live: int | None = None
    """Generations running at once (each choice of ``n`` counts); None: the generator's
    ``max_sessions`` when it has one, else :data:`DEFAULT_MAX_LIVE`."""
    max_queue: int = 16
    """Requests waiting for a generation slot; beyond that, 429."""
    max_connections: int = 64
    """Connection threads; a connection beyond that gets a 503 at once."""
    max_inputs: int = 256
    """Texts per embeddings / classifications request."""
    request_timeout_s: float | None = 300.0
    """Per-request deadline: queue wait plus generation (the runtime's deadline_s)."""
    idle_timeout_s: float = 30.0
    """A keep-alive connection idle this long is closed; also the socket write timeout."""
    static_dir: Path | None = None
    cors_origin: str | None = None
    quiet: bool = False
    """No access log lines on stderr."""
