"""``edge-slm serve``: an OpenAI-compatible HTTP server over the runtime (standard library only).

    >>> from edge_slm.server import RunningServer, ServerConfig
    >>> server = RunningServer(ServerConfig(port=8080), [("smollm2", Path("bundles/smollm2"))])
    >>> server.start()

Modules, one job each: :mod:`~edge_slm.server.app` (HTTP and routing),
:mod:`~edge_slm.server.openai_schema` (request validation), :mod:`~edge_slm.server.responses`
(response objects), :mod:`~edge_slm.server.generation` (a request's generations on
threads), :mod:`~edge_slm.server.sse` (server-sent events), :mod:`~edge_slm.server.limits`,
:mod:`~edge_slm.server.metrics`, :mod:`~edge_slm.server.registry` (the served models),
:mod:`~edge_slm.server.static`, :mod:`~edge_slm.server.runner` (start and stop).
See docs/server.md.
"""

from __future__ import annotations

from edge_slm.server.config import ServerConfig
from edge_slm.server.registry import parse_bundle_arg
from edge_slm.server.runner import RunningServer

__all__ = ["RunningServer", "ServerConfig", "parse_bundle_arg"]
