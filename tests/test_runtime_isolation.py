"""The runtime imports and generates with torch, transformers, optimum, the build stage and
Ray made unimportable, in a fresh interpreter."""

from __future__ import annotations

from pathlib import Path

import pytest
from isolation import report_of, run_blocked

BLOCKED = (
    "torch",
    "transformers",
    "optimum",
    "edge_slm_export",
    "edge_slm_quantize",
    "jinja2",
    # the ray extra (edge_slm/scale/ray_data.py): never imported by the runtime itself
    "ray",
    "pyarrow",
)

GENERATE = """
import edge_slm
model = edge_slm.load(BUNDLE)
result = model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=6, temperature=0.0)
REPORT["tokens"] = result.token_ids
REPORT["pieces"] = [
    c.text for c in model.stream("Once upon a time", max_new_tokens=6, seed=1, temperature=0.8)
]
"""


@pytest.mark.parametrize("graph", ["optimum", "fused"])
def test_runtime_runs_without_the_build_stage(
    graph: str, bundles: dict[str, Path], fused_bundles: dict[str, Path]
) -> None:
    bundle = (bundles if graph == "optimum" else fused_bundles)["qwen2"]
    report = report_of(run_blocked(GENERATE, BLOCKED, cwd=bundle, BUNDLE=str(bundle)))
    assert len(report["tokens"]) > 0
    assert report["pieces"]
    assert report["heavy"] == []


def test_blocking_really_blocks() -> None:
    out = run_blocked("import torch", BLOCKED)
    assert out.returncode != 0 and "torch is blocked" in out.stderr
