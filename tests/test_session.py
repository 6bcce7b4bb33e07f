"""Per-machine session defaults (edge_slm/engine/session.py) and their overrides."""

from __future__ import annotations

import os

import pytest

from edge_slm.engine.session import SPINNING_ENV, THREADS_ENV, default_threads, session_defaults
from edge_slm.errors import InvalidArgumentError


def test_defaults_follow_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv(SPINNING_ENV, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    quiet = session_defaults()
    assert quiet.threads == default_threads()
    assert quiet.spinning is None  # onnxruntime's default: spinning on
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    busy = session_defaults()
    assert busy.spinning is False and "spinning off" in busy.reason


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "1")
    monkeypatch.setenv(SPINNING_ENV, "0")
    defaults = session_defaults()
    assert (defaults.threads, defaults.spinning) == (1, False)
    monkeypatch.setenv(SPINNING_ENV, "1")
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    assert session_defaults().spinning is True  # the override wins over the load


@pytest.mark.parametrize(
    ("name", "value"), [(THREADS_ENV, "0"), (THREADS_ENV, "two"), (SPINNING_ENV, "yes")]
)
def test_bad_environment_values_are_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidArgumentError, match=name):
        session_defaults()
