"""Server-sent events over HTTP/1.1 chunked transfer encoding.

Each event is ``data: <json>\\n\\n`` sent as one HTTP chunk and flushed, so a client
sees every token as soon as it is generated; the stream ends with ``data: [DONE]`` and
the zero-length chunk, which leaves the connection open for the next request
(keep-alive). A write to a client that has gone raises :class:`ClientGone`.
"""

from __future__ import annotations

import json
import select
import socket
from typing import Any, BinaryIO

DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client closed the connection (or stopped reading past the socket timeout)."""


def json_bytes(payload: Any) -> bytes:
    """``payload`` as UTF-8 JSON; a lone surrogate (echoed from a request) is escaped."""
    try:
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(payload).encode("ascii")


def event(payload: dict[str, Any]) -> bytes:
    """One SSE event carrying ``payload`` as JSON."""
    return b"data: " + json_bytes(payload) + b"\n\n"


class ChunkedWriter:
    """Writes HTTP chunks to a response stream."""

    def __init__(self, wfile: BinaryIO) -> None:
        self.wfile = wfile

    def write(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (OSError, ValueError) as exc:  # EPIPE, ECONNRESET, timeout, closed file
            raise ClientGone(str(exc)) from None

    def close(self) -> None:
        """The last chunk (zero length): the response is complete."""
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (OSError, ValueError) as exc:
            raise ClientGone(str(exc)) from None


def client_gone(sock: socket.socket) -> bool:
    """True when the peer has closed ``sock`` (readable with nothing to read).

    Checked between generated tokens, so a client that disconnects is noticed even
    before the next write fails. Bytes a client pipelines do not count as gone.
    """
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):
        return True
