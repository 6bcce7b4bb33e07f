"""Run a snippet in a fresh interpreter where some top-level packages cannot be imported.

The runtime isolation tests use it to prove that edge_slm works without torch,
transformers, optimum or the build stage: any import of a blocked package raises.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_BLOCKER = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    """
)
# Appended to every snippet: which blocked packages ended up imported anyway.
_HEAVY = "\nREPORT['heavy'] = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)\n"
_PRINT = "print(json.dumps(REPORT))\n"


def run_blocked(
    body: str, blocked: Sequence[str], cwd: Path | None = None, **names: str
) -> subprocess.CompletedProcess[str]:
    """Run ``body`` (which fills a dict ``REPORT``) with ``blocked`` unimportable.

    ``names`` become string constants of the snippet. Run it from a bundle's folder
    (``cwd``) so the repository folders are not on the path.
    """
    constants = "".join(f"{key} = {value!r}\n" for key, value in names.items())
    code = f"BLOCKED = {tuple(blocked)!r}\n{constants}{_BLOCKER}REPORT = {{}}\n"
    code += textwrap.dedent(body) + _HEAVY + _PRINT
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def report_of(out: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The REPORT dict a successful snippet printed last."""
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return report
