"""The build stage installs under names this project owns (setup.py maps the folders
export/ and quantize/ to edge_slm_export and edge_slm_quantize): from outside the
repository, no top-level ``export`` or ``quantize`` package exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHECK = """
import importlib.util as u, json
print(json.dumps({m: u.find_spec(m) is not None for m in
                  ("export", "quantize", "edge_slm_export", "edge_slm_quantize",
                   "edge_slm_export.architectures", "edge_slm_quantize.methods")}))
"""


def test_import_names_outside_the_repository(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {
        "export": False,
        "quantize": False,
        "edge_slm_export": True,
        "edge_slm_quantize": True,
        "edge_slm_export.architectures": True,
        "edge_slm_quantize.methods": True,
    }
