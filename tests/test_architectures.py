"""The build stage's registry of model families (export/architectures/): one module per
``model_type``, found by name; unknown families refused with the supported list; no
import circle among the graph builders."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

from edge_slm_export import architectures
from edge_slm_export.architectures import (
    DecoderArchitecture,
    EncoderArchitecture,
    decoder_architecture,
    encoder_architecture,
    get_architecture,
    supported,
)
from edge_slm_export.architectures.llama import LlamaArchitecture
from edge_slm_export.errors import UnsupportedModelError

EXPORT = Path(architectures.__file__).parent.parent


def _family_modules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(architectures.__path__) if m.name != "base"]


def test_supported_families() -> None:
    decoders = ("gemma3_text", "gpt2", "llama", "mistral", "phi3", "qwen2", "qwen3")
    assert supported("decoder") == decoders
    assert supported("encoder") == ("bert", "distilbert", "roberta")
    assert supported() == tuple(sorted((*decoders, "bert", "distilbert", "roberta")))


@pytest.mark.parametrize("name", _family_modules())
def test_each_module_is_found_by_its_model_type(name: str) -> None:
    module = importlib.import_module(f"edge_slm_export.architectures.{name}")
    architecture = get_architecture(name)
    assert architecture is module.ARCHITECTURE
    assert architecture.model_type == name
    if architecture.kind == "decoder":
        assert isinstance(architecture, DecoderArchitecture)
        assert decoder_architecture(name) is architecture
    else:
        assert isinstance(architecture, EncoderArchitecture)
        assert encoder_architecture(name) is architecture


@pytest.mark.parametrize("model_type", ["gpt_neox", "gemma3", "base", "../llama", "", "llama.x"])
def test_unknown_model_type_is_refused_naming_the_supported_ones(model_type: str) -> None:
    with pytest.raises(UnsupportedModelError, match=r"\['gemma3_text', 'gpt2', 'llama', 'mistral'"):
        decoder_architecture(model_type)
    with pytest.raises(UnsupportedModelError, match=r"\['bert', 'distilbert', 'roberta'\]"):
        encoder_architecture(model_type)


def test_a_family_of_the_other_kind_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match=r"'bert' is not supported; supported decoders"):
        decoder_architecture("bert")
    with pytest.raises(
        UnsupportedModelError, match=r"'llama' is not supported; supported encoders"
    ):
        encoder_architecture("llama")


def test_differences_are_overrides() -> None:
    for family in ("qwen2", "qwen3", "mistral"):
        architecture = decoder_architecture(family)
        assert isinstance(architecture, LlamaArchitecture)
        assert type(architecture).build_fused_graph is LlamaArchitecture.build_fused_graph
    assert isinstance(decoder_architecture("phi3"), LlamaArchitecture)
    assert all(decoder_architecture(t).fused for t in supported("decoder"))
    assert encoder_architecture("roberta").position_offset(type("C", (), {"pad_token_id": 1})) == 2
    assert encoder_architecture("bert").position_offset(object()) == 0


def test_no_unfused_family_builds_a_fused_graph(tmp_path: Path) -> None:
    class Plain(DecoderArchitecture):
        model_type = "plain"

    with pytest.raises(UnsupportedModelError, match="--graph optimum"):
        Plain().build_fused_graph(object(), tmp_path / "model.onnx")


def _imports(path: Path) -> set[str]:
    """Modules of the build stage that ``path`` imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("edge_slm_export")}


def test_no_import_circle_in_the_export_package() -> None:
    graph = {}
    for path in EXPORT.rglob("*.py"):
        parts = path.relative_to(EXPORT).with_suffix("").parts
        name = ".".join(("edge_slm_export", *parts)).removesuffix(".__init__")
        graph[name] = _imports(path) - {name}
    # The common graph module imports no family; families import only downwards.
    assert not any(
        m.startswith("edge_slm_export.architectures") for m in graph["edge_slm_export.fused_graph"]
    )

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"import circle: {' -> '.join((*stack, name))}"
        for dep in graph.get(name, ()):
            visit(dep, (*stack, name))

    for name in graph:
        visit(name, ())
