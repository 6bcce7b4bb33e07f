"""Weight-only quantization of bundles: graph passes, methods, perplexity, manifest, CLI.

Every family's fp32 bundle (``bundles`` fixture) is quantized once per method with an
evaluation text; the tests then check the graphs, the manifests and the logits.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_models import CORPUS, FAMILIES
from tokenizers import Tokenizer

from edge_slm.bundle import Manifest, read_bundle, sha256_file
from edge_slm.errors import EdgeSlmError
from edge_slm.generation.decoders import open_decoder
from edge_slm.generation.perplexity import token_windows
from edge_slm_quantize import (
    METHODS,
    AlreadyQuantizedError,
    QuantizationError,
    UnknownMethodError,
    bundle_perplexity,
    methods,
    quantize_bundle,
)
from edge_slm_quantize.cli import main
from edge_slm_quantize.graph_passes import fold_weight_transposes, rewrite_gemms
from edge_slm_quantize.weight_only import census

METHOD_NAMES = ("int8", "int4-rtn")
# 2 layers x (GPT-2: c_attn, c_proj, c_fc, mlp c_proj; Llama/Qwen2: q, k, v, o, gate, up,
# down) + the lm_head
EXPECTED_QUANTIZED = {"gpt2": 9, "llama": 15, "qwen2": 15}
# GPT-2 and the Llama here tie lm_head to the embedding; Qwen2 here does not.
TIED = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight", "qwen2": None}


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small English text of a few hundred tokens, several context windows long."""
    path = tmp_path_factory.mktemp("eval") / "prose.txt"
    path.write_text("\n".join(CORPUS * 6), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def quantized(
    bundles: dict[str, Path], eval_text: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Path]:
    """(family, method) -> quantized bundle, with perplexity measured on ``eval_text``."""
    root = tmp_path_factory.mktemp("quantized")
    return {
        (family, method): quantize_bundle(
            bundles[family], root / f"{family}-{method}", method, eval_text=eval_text
        )
        for family in FAMILIES
        for method in METHOD_NAMES
    }


def _op_counts(model_path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(model_path)).graph.node)


def _probe_ids(manifest: Manifest) -> np.ndarray:
    """``[2, 48]`` random token ids (fixed seed)."""
    return np.random.default_rng(0).integers(0, manifest.vocab_size, size=(2, 48), dtype=np.int64)


def _logits(bundle: Path, ids: np.ndarray, model_path: Path | None = None) -> np.ndarray:
    manifest = read_bundle(bundle, verify=False)
    assert manifest.decoder is not None
    model = open_decoder(model_path or bundle / "model.onnx", manifest.decoder)
    return model.all_logits(ids)  # [batch, seq, vocab]


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_bundle_loads_and_records_what_happened(
    quantized: dict[tuple[str, str], Path],
    bundles: dict[str, Path],
    eval_text: Path,
    family: str,
    method: str,
) -> None:
    out = quantized[family, method]
    manifest = read_bundle(out)  # checksums verified
    assert manifest.decoder is not None
    open_decoder(out / "model.onnx", manifest.decoder)  # the graph loads and matches its I/O
    graph = onnx.load(str(out / "model.onnx"))
    counts = Counter(node.op_type for node in graph.graph.node)
    assert counts["MatMulNBits"] == EXPECTED_QUANTIZED[family]
    assert counts["Gemm"] == 0  # GPT-2's Gemms were rewritten, then quantized
    left = census(graph)
    assert left.float_weight == 0, left.float_weight_nodes  # no float MatMul weight left

    q = manifest.quantization
    settings = METHODS[method].defaults
    assert (q.method, q.bits, q.block_size, q.symmetric, q.accuracy_level) == (
        method,
        settings.bits,
        32,
        False,
        settings.accuracy_level,
    )
    assert q.size_before_bytes == (bundles[family] / "model.onnx").stat().st_size
    # the quantized graph keeps its weights beside it, in model.onnx.data
    on_disk = sum((out / name).stat().st_size for name in ("model.onnx", "model.onnx.data"))
    assert q.size_after_bytes == on_disk
    assert q.size_after_bytes < q.size_before_bytes
    assert q.details["quantized_matmuls"] == EXPECTED_QUANTIZED[family]
    assert q.details["remaining_float_matmuls"] == 0
    assert q.details["lm_head"] == "quantized"
    assert q.details["gemms_rewritten"] == (8 if family == "gpt2" else 0)
    assert (q.details["tied_lm_head"] is not None) == (TIED[family] is not None)
    assert q.details["source_model_sha256"] == sha256_file(bundles[family] / "model.onnx")
    assert q.perplexity_before is not None and q.perplexity_after is not None
    assert q.perplexity_before > 1 and q.perplexity_after > 1
    assert (q.eval_text, q.eval_text_sha256) == ("prose.txt", sha256_file(eval_text))
    assert q.eval_tokens is not None and q.eval_tokens > 200
    # everything else is the source's manifest
    source = read_bundle(bundles[family])
    assert (manifest.decoder, manifest.files, manifest.special_tokens) == (
        source.decoder,
        source.files,
        source.special_tokens,
    )
    assert (out / "tokenizer.json").read_bytes() == (
        bundles[family] / "tokenizer.json"
    ).read_bytes()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_graph_passes_preserve_logits(
    bundles: dict[str, Path], tmp_path: Path, family: str
) -> None:
    """Gemm -> MatMul + Add (GPT-2) and the folded lm_head transpose change no logit."""
    model = onnx.load(str(bundles[family] / "model.onnx"))
    gemms = rewrite_gemms(model)
    folded = fold_weight_transposes(model)
    assert gemms.rewritten == (8 if family == "gpt2" else 0) and gemms.kept == ()
    assert folded == (TIED[family],)
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["Gemm"] == 0
    assert census(model).float_weight == EXPECTED_QUANTIZED[family]  # all visible to the quantizer
    path = tmp_path / "passes.onnx"
    onnx.save(model, str(path))
    manifest = read_bundle(bundles[family])
    ids = _probe_ids(manifest)
    before = _logits(bundles[family], ids)
    after = _logits(bundles[family], ids, model_path=path)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)


def _gemm_model(trans_b: int, bias: bool, alpha: float = 1.0) -> onnx.ModelProto:
    """Y = Gemm(X [3, 4], W, b) with W [4, 5] (or [5, 4] for transB=1) as initializers."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W")]
    inputs = ["X", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Gemm", inputs, ["Y"], name="g", transB=trans_b, alpha=alpha)
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"X": x})[0])


@pytest.mark.parametrize(("trans_b", "bias"), [(0, True), (1, True), (1, False)])
def test_gemm_rewrite_variants(trans_b: int, bias: bool) -> None:
    model = _gemm_model(trans_b, bias)
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    expected = _run(model, x)
    assert rewrite_gemms(model).rewritten == 1
    ops = [node.op_type for node in model.graph.node]
    assert ops == (["MatMul", "Add"] if bias else ["MatMul"])
    weight = {t.name: t for t in model.graph.initializer}[model.graph.node[0].input[1]]
    assert list(weight.dims) == [4, 5]  # [K, N], as MatMulNBits wants
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-6, atol=1e-6)


def test_gemm_with_alpha_is_kept() -> None:
    model = _gemm_model(0, True, alpha=0.5)
    result = rewrite_gemms(model)
    assert (result.rewritten, result.kept) == (0, ("g",))
    assert [node.op_type for node in model.graph.node] == ["Gemm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_logits_stay_close_to_fp32(
    quantized: dict[tuple[str, str], Path], bundles: dict[str, Path], family: str
) -> None:
    """int8 is close to fp32; int4 is further off but sane.

    These tiny random models (initializer_range=0.3) are far more sensitive to weight
    noise than trained ones: int8 measures ~4% relative RMS logit error, int4 ~50%.
    """
    manifest = read_bundle(bundles[family])
    ids = _probe_ids(manifest)
    reference = _logits(bundles[family], ids)
    scale = float(np.sqrt(np.mean(reference**2)))
    errors = {}
    for method in METHOD_NAMES:
        logits = _logits(quantized[family, method], ids)
        assert np.isfinite(logits).all()
        errors[method] = float(np.sqrt(np.mean((logits - reference) ** 2))) / scale
    assert errors["int8"] < 0.1, errors
    assert errors["int4-rtn"] < 1.0, errors
    assert errors["int8"] < errors["int4-rtn"], errors
    int8 = _logits(quantized[family, "int8"], ids)
    assert (int8.argmax(-1) == reference.argmax(-1)).mean() > 0.8


def test_perplexity_matches_torch(
    hf_models: dict[str, Path], bundles: dict[str, Path], eval_text: Path
) -> None:
    """The bundle's perplexity equals one computed from the torch model, same windows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    window, max_tokens = 48, 300
    result = bundle_perplexity(bundles["llama"], eval_text, window=window, max_tokens=max_tokens)

    text = eval_text.read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(hf_models["llama"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    bundle_ids = Tokenizer.from_file(str(bundles["llama"] / "tokenizer.json")).encode(
        text, add_special_tokens=False
    )
    assert bundle_ids.ids[:max_tokens] == ids
    model = AutoModelForCausalLM.from_pretrained(hf_models["llama"]).eval()
    nll, predicted, windows = 0.0, 0, 0
    for start in range(0, len(ids), window):
        chunk = torch.tensor([ids[start : start + window]])
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(chunk).logits[0].double()  # [seq, vocab]
        nll += torch.nn.functional.cross_entropy(logits[:-1], chunk[0, 1:], reduction="sum").item()
        predicted += chunk.shape[1] - 1
        windows += 1
    assert (result.tokens, result.windows) == (predicted, windows)
    assert result.perplexity == pytest.approx(math.exp(nll / predicted), rel=1e-3)


def test_perplexity_window_is_capped_by_context(bundles: dict[str, Path], eval_text: Path) -> None:
    result = bundle_perplexity(bundles["qwen2"], eval_text, window=10_000, max_tokens=300)
    assert result.windows == math.ceil(300 / 128)  # context_length of the tiny models
    assert result.tokens == 300 - result.windows


def test_token_windows_with_bos() -> None:
    windows = token_windows([1, 2, 3, 4, 5], window=3, bos_token_id=0)
    assert [w.tolist() for w in windows] == [[[0, 1, 2]], [[0, 3, 4]], [[0, 5]]]
    assert [w.tolist() for w in token_windows([1, 2, 3, 4, 5], window=2)] == [[[1, 2]], [[3, 4]]]


def test_unknown_method_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UnknownMethodError, match=r"'int3'.*'gguf'.*'int4-rtn'.*'int8'") as info:
        quantize_bundle(bundles["llama"], tmp_path / "out", "int3")
    assert isinstance(info.value, QuantizationError) and isinstance(info.value, EdgeSlmError)
    assert not (tmp_path / "out").exists()


def test_already_quantized_source_is_refused(
    quantized: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    with pytest.raises(AlreadyQuantizedError, match="already quantized"):
        quantize_bundle(quantized["llama", "int8"], tmp_path / "again", "int4-rtn")
    assert not (tmp_path / "again").exists()


def test_bad_settings_and_output_folders_are_refused(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(QuantizationError, match="block_size must be a power of two"):
        quantize_bundle(bundles["llama"], tmp_path / "a", "int4-rtn", block_size=24)
    with pytest.raises(QuantizationError, match="accuracy_level"):
        quantize_bundle(bundles["llama"], tmp_path / "a", "int4-rtn", accuracy_level=7)
    with pytest.raises(QuantizationError, match="outside the source bundle"):
        quantize_bundle(bundles["llama"], bundles["llama"] / "int4", "int4-rtn")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(QuantizationError, match="not empty"):
        quantize_bundle(bundles["llama"], busy, "int8")
    assert (busy / "keep.txt").exists()


def test_cli_quantizes_with_options(
    bundles: dict[str, Path],
    eval_text: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Also: the former name ``int4`` still works, warns, and is recorded as ``int4-rtn``."""
    monkeypatch.setattr(methods, "_WARNED", set())
    out = tmp_path / "gpt2-int4-sym"
    (out / "stale").mkdir(parents=True)  # replaced thanks to --overwrite
    argv = [str(bundles["gpt2"]), str(out), "--method", "int4", "--eval-text", str(eval_text)]
    argv += ["--symmetric", "--block-size", "64", "--accuracy-level", "0", "--overwrite"]
    with pytest.warns(FutureWarning, match="'int4' is now called 'int4-rtn'"):
        assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"bundle: {out}" in captured.out
    assert "size: " in captured.out and "perplexity: " in captured.out
    assert "quantizing model.onnx (int4-rtn)" in captured.err  # progress on stderr
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert (q["method"], q["bits"], q["block_size"], q["symmetric"], q["accuracy_level"]) == (
        "int4-rtn",
        4,
        64,
        True,
        0,
    )
    nodes = [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == EXPECTED_QUANTIZED["gpt2"]
    assert all(len(n.input) == 3 for n in nodes)  # symmetric: no zero points
    assert not (out / "stale").exists()


def test_cli_reports_errors_on_stderr(
    quantized: dict[tuple[str, str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([str(quantized["qwen2", "int4-rtn"]), str(tmp_path / "x"), "--method", "int8"])
    assert code == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and "already quantized" in captured.err
    assert captured.out == ""


def test_importing_the_quantizer_leaves_logging_alone() -> None:
    """onnxruntime's quantizer calls logging.basicConfig at import; we undo it."""
    code = (
        "import logging\n"
        "from edge_slm_quantize.weight_only import _quiet_quantizer\n"
        "with _quiet_quantizer(): pass\n"
        "root = logging.getLogger()\n"
        "print(len(root.handlers), root.level)\n"
    )
    root = Path(__file__).parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["0", str(30)]  # no handler, WARNING as Python starts


def test_every_method_module_is_registered_by_name() -> None:
    """quantize/methods/: one module per family, each method under its own name."""
    import importlib
    import pkgutil

    names = []
    for info in pkgutil.iter_modules(methods.__path__):
        if info.name != "base":
            module = importlib.import_module(f"edge_slm_quantize.methods.{info.name}")
            names += [m.name for m in module.METHODS]
    assert sorted(names) == sorted(methods.METHODS)
    assert all(methods.get_method(n).name == n for n in names)
    assert {"int4-rtn", "int4-search", "gguf", "gguf-head4", "int8"} <= set(names)


def test_former_method_names_are_aliases_that_warn_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(methods, "_WARNED", set())
    assert methods.ALIASES == {
        "int4": "int4-rtn",
        "int4-shared": "int4-rtn-shared",
        "int4-emb8": "int4-rtn-emb8",
    }
    for old, new in methods.ALIASES.items():
        assert old not in methods.METHODS
        with pytest.warns(FutureWarning, match=f"'{old}' is now called '{new}'"):
            assert methods.get_method(old) is methods.get_method(new)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert methods.get_method(old) is methods.get_method(new)  # once only
