"""onnxruntime session creation with the defaults a small device wants."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from edge_slm.errors import InvalidArgumentError


def default_threads() -> int:
    """Intra-op threads: the CPUs this process may run on (cgroup/affinity aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def create_session(
    model_path: Path,
    threads: int | None = None,
    spinning: bool | None = None,
) -> ort.InferenceSession:
    """Open an ONNX graph on the CPU execution provider.

    Args:
        model_path: the ``.onnx`` file (external-data files must sit beside it).
        threads: intra-op threads; None picks :func:`default_threads`.
        spinning: let idle worker threads spin; None keeps onnxruntime's default.
            Turning it off helps on a CPU shared with other work (a kiosk UI).
    """
    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if spinning is not None:
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning else "0"
        )
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
