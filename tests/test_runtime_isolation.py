"""The runtime imports and generates with torch, transformers, optimum and the build stage
made unimportable, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCKED = ("torch", "transformers", "optimum", "export", "quantize", "jinja2")

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    import edge_slm
    model = edge_slm.load(BUNDLE)
    result = model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=6, temperature=0.0)
    pieces = [c.text for c in model.stream("Once upon a time", max_new_tokens=6, seed=1, temperature=0.8)]
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"tokens": result.token_ids, "pieces": pieces, "heavy": heavy}))
    """
)


@pytest.mark.parametrize("graph", ["optimum", "fused"])
def test_runtime_runs_without_the_build_stage(
    graph: str, bundles: dict[str, Path], fused_bundles: dict[str, Path]
) -> None:
    bundle = (bundles if graph == "optimum" else fused_bundles)["qwen2"]
    code = f"BLOCKED = {BLOCKED!r}\nBUNDLE = {str(bundle)!r}\n{SCRIPT}"
    # Run from the bundle's folder so the repository's export/ and quantize/ are not
    # even on the path unless installed.
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=bundle,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["tokens"]) > 0
    assert report["pieces"]
    assert report["heavy"] == []


def test_blocking_really_blocks(bundles: dict[str, Path]) -> None:
    code = f"BLOCKED = {BLOCKED!r}\nBUNDLE = ''\n" + SCRIPT.replace(
        "import edge_slm", "import torch"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode != 0 and "torch is blocked" in out.stderr
