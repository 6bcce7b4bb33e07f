"""Start and stop a server: listen first, load the bundles in the background, shut down
cleanly (running generations are cancelled, their memory freed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_slm.server.app import App, EdgeSlmServer
from edge_slm.server.config import ServerConfig
from edge_slm.server.registry import Loader, Registry


def default_loader(threads: int | None = None, cache: bool | None = None) -> Loader:
    """``edge_slm.load`` with the server's threads and prepared-session cache settings."""

    def load(path: Path) -> Any:
        import edge_slm

        return edge_slm.load(path, threads=threads, cache=cache)

    return load


class RunningServer:
    """A listening server and its model loader, each on a background thread.

    >>> server = RunningServer(ServerConfig(port=0), [("tiny", Path("bundles/tiny"))])
    >>> server.start().wait_ready(); print(server.url); server.stop()
    """

    def __init__(
        self,
        config: ServerConfig,
        sources: Sequence[tuple[str, Path | Any]],
        loader: Loader | None = None,
    ) -> None:
        self.registry = Registry(sources, loader or default_loader())
        self.app = App(config, self.registry)
        self.httpd = EdgeSlmServer(self.app)  # binds now: OSError if the port is taken
        self._serve = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="edge-slm-serve",
            daemon=True,
        )
        self._load = threading.Thread(target=self._load_models, name="edge-slm-load", daemon=True)

    def _load_models(self) -> None:
        self.registry.load_all(self.app.models_loaded)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.app.config.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def start(self) -> RunningServer:
        self._serve.start()
        self._load.start()
        return self

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Wait for the bundles; True when they all loaded."""
        self.registry.ready.wait(timeout_s)
        return self.registry.state == "ready"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, cancel running generations, wait for answers in flight."""
        self.app.shutting_down.set()
        if self._serve.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
        end = time.monotonic() + timeout_s
        while self.app.metrics.in_flight > 0 and time.monotonic() < end:
            time.sleep(0.02)
        self._load.join(max(end - time.monotonic(), 0.0))
