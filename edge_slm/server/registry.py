"""The served models: bundles named and loaded in the background, looked up by task.

The server listens before the bundles are loaded (``/health`` answers 503 ``loading``
meanwhile), so a supervisor sees the process up at once and a kiosk page can show a
"starting" state. Each model's id is its bundle folder's name, or ``NAME`` when the
bundle is given as ``NAME=PATH``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_slm.server.errors import RETRY_AFTER_S, ApiError

GENERATION = "text-generation"
CLASSIFICATION = "text-classification"
TOKEN_CLASSIFICATION = "token-classification"
EMBEDDING = "feature-extraction"

Loader = Callable[[Path], Any]


@dataclass(frozen=True)
class ServedModel:
    """A loaded model, its id and its task."""

    id: str
    task: str
    model: Any
    created: int


def parse_bundle_arg(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` -> (id, path); the id defaults to the folder's name."""
    name, sep, rest = text.partition("=")
    if sep and name and "/" not in name and not Path(text).exists():
        return name, Path(rest)
    path = Path(text)
    return path.resolve().name or str(path), path


class Registry:
    """Models by id, loaded once by :meth:`load_all` (in a background thread)."""

    def __init__(self, sources: Sequence[tuple[str, Path | Any]], loader: Loader) -> None:
        ids = [name for name, _ in sources]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(
                f"two bundles share the id {duplicates[0]!r}; name them with NAME=PATH"
            )
        self._sources = list(sources)
        self._loader = loader
        self._models: dict[str, ServedModel] = {}
        self.state = "loading"
        self.error: str | None = None
        self.ready = threading.Event()

    def load_all(self, after: Callable[[list[ServedModel]], None] | None = None) -> None:
        """Load every bundle (a path) or take an already loaded model, call ``after``
        with them, then say ready; never raises."""
        try:
            for name, source in self._sources:
                model = self._loader(source) if isinstance(source, Path) else source
                task = model.manifest.task
                self._models[name] = ServedModel(name, task, model, int(time.time()))
            if after is not None:
                after(list(self._models.values()))
            self.state = "ready"
        except Exception as exc:  # reported by /health and by `edge-slm serve`
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "error"
        finally:
            self.ready.set()

    @property
    def models(self) -> list[ServedModel]:
        return list(self._models.values()) if self.state == "ready" else []

    def check_ready(self) -> None:
        if self.state == "loading":
            raise ApiError(
                503,
                "the models are still loading; retry shortly",
                "server_error",
                code="loading",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        if self.state == "error":
            raise ApiError(
                503, f"the models failed to load: {self.error}", "server_error", code="load_failed"
            )

    def find(self, task: str | tuple[str, ...], name: str | None) -> ServedModel:
        """The model called ``name`` (None: the first one) that does ``task`` (or one of
        several tasks)."""
        self.check_ready()
        tasks = (task,) if isinstance(task, str) else task
        task = " or ".join(tasks)
        fitting = [m for m in self._models.values() if m.task in tasks]
        if name is None:
            if not fitting:
                raise ApiError(
                    404, f"no {task} model is served", code="model_not_found", param="model"
                )
            return fitting[0]
        found = self._models.get(name)
        if found is None or found.task not in tasks:
            ids = ", ".join(m.id for m in fitting) or "none"
            what = "does not exist" if found is None else f"is a {found.task} model"
            raise ApiError(
                404,
                f"the model {name!r} {what}; {task} models served here: {ids}",
                code="model_not_found",
                param="model",
            )
        return found
