"""Other work on a second core while onnxruntime builds a session.

A load spends most of its time in two places: onnxruntime building the session
(optimizing the graph, pre-packing the weights) and the tokenizer parsing
``tokenizer.json``. onnxruntime releases the GIL for the whole of its build; the
tokenizer's parse holds it throughout. So the two can overlap, but only if the parse
starts once onnxruntime is inside the long call: started earlier, it takes the GIL when
the session's short constructor releases it, and the rest of the build waits for the
whole parse. :func:`build_beside` starts the work at that moment.

The cost is memory: the parse's short-lived heap (in the worker's own malloc arena) is
not reused by the session, so peak RSS rises by roughly the tokenizer's parse
(docs/performance.md, "Cold start-up"); with one usable CPU nothing overlaps, and the
tokenizer is parsed first, on the loading thread, as before.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar, cast

from edge_slm.engine.device import usable_cpus

S = TypeVar("S")
W = TypeVar("W")

_LONG_CALL = "initialize_session"  # onnxruntime's C++ call that optimizes and pre-packs


def build_beside(build: Callable[[], S], work: Callable[[], W]) -> tuple[S, W]:
    """``build()`` (which opens an onnxruntime session) here, ``work()`` on a worker.

    The worker starts ``work`` the moment this thread calls onnxruntime's
    ``initialize_session``: a profile hook on this thread only (``sys.setprofile``'s
    ``c_call`` event, which comes just before the call) tells it. If ``build`` never
    gets there (it failed earlier, or a cached result needed no session), ``work``
    starts when ``build`` returns. With one usable CPU (nothing to overlap on), or a
    profiler already active on this thread, ``work`` simply runs before ``build``.

    Returns both results. Raises ``work``'s exception if it failed, else ``build``'s:
    the same order as running ``work`` first.
    """
    if usable_cpus() < 2 or sys.getprofile() is not None:
        done = work()
        return build(), done
    inside = threading.Event()
    outcome: list[Any] = []

    def run_work() -> None:
        inside.wait()
        try:
            outcome.append((work(), None))
        except BaseException as exc:  # handed to the building thread
            outcome.append((None, exc))

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__name__", None) == _LONG_CALL:
            inside.set()

    worker = threading.Thread(target=run_work, name="edge-slm-beside-session", daemon=True)
    worker.start()
    built: S | None = None
    failure: BaseException | None = None
    sys.setprofile(hook)
    try:
        built = build()
    except BaseException as exc:  # raised after work's, which takes precedence
        failure = exc
    finally:
        sys.setprofile(None)
        inside.set()
        worker.join()
    done, work_failure = outcome[0]
    if work_failure is not None:
        raise work_failure
    if failure is not None:
        raise failure
    return cast(S, built), done
