"""Quantize an fp32 decoder bundle into a new bundle, measuring what it cost.

:func:`quantize_bundle` reads the source bundle (checksums verified), quantizes its
graph with a registered method (:mod:`edge_slm_quantize.methods`), writes the new graph and a
copy of the other files into the output folder, checks that the new graph loads and
runs, measures perplexity before and after on an evaluation text when one is given,
and writes a manifest whose ``quantization`` section records settings, sizes,
perplexities and what happened to the graph's matrix products.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
from tokenizers import Tokenizer

from edge_slm.bundle import Manifest, Quantization, read_bundle, sha256_file, write_manifest
from edge_slm.cli.progress import Reporter, silent_reporter, step
from edge_slm.generation.decoders import open_decoder
from edge_slm.generation.perplexity import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_WINDOW,
    PerplexityResult,
    bos_for_scoring,
    effective_window,
    encode_text,
    perplexity,
    read_text,
)
from edge_slm_export.graph_io import save_graph
from edge_slm_quantize.errors import AlreadyQuantizedError, QuantizationError
from edge_slm_quantize.methods import Method, MethodContext, get_method
from edge_slm_quantize.weight_only import WeightOnlySettings

_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
_PROBE_TOKENS = 64
_TOOLS = ("onnx", "onnxruntime", "onnx-ir")


def graph_files(model_path: Path) -> list[Path]:
    """The graph file and the external-data files its initializers point to."""
    proto = onnx.load(str(model_path), load_external_data=False)
    locations = {
        entry.value
        for tensor in proto.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [model_path] + [model_path.parent / name for name in sorted(locations)]


def graph_size(model_path: Path) -> int:
    """Bytes on disk of a graph, external data included."""
    return sum(path.stat().st_size for path in graph_files(model_path))


def _prepare_output(src: Path, out: Path, overwrite: bool) -> None:
    """Create an empty ``out``; refuse to clobber a non-empty one or touch the source."""
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise QuantizationError(
            f"output folder {str(out)!r} must be outside the source bundle {str(src)!r} and not contain it"
        )
    if out.exists() and not out.is_dir():
        raise QuantizationError(f"output {str(out)!r} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise QuantizationError(
                f"output folder {str(out)!r} is not empty (pass overwrite=True / --overwrite)"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _check_source(src: Path, manifest: Manifest) -> None:
    """Only fp32, not yet quantized, text-generation bundles are accepted."""
    if manifest.quantization.method != "none":
        raise AlreadyQuantizedError(
            f"bundle {str(src)!r} is already quantized (method {manifest.quantization.method!r}); "
            "quantize the fp32 bundle it came from instead"
        )
    if manifest.task != "text-generation" or manifest.decoder is None:
        raise QuantizationError(
            f"bundle {str(src)!r} is a {manifest.task!r} bundle; only text-generation bundles can be quantized"
        )
    if manifest.decoder.kv_dtype != "float32":
        raise QuantizationError(
            f"bundle {str(src)!r} has a {manifest.decoder.kv_dtype} graph; only float32 graphs can be quantized"
        )


def _tool_versions() -> dict[str, str]:
    """Installed versions of the tools that did the quantization."""
    versions = {}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _score(
    model_path: Path,
    manifest: Manifest,
    probe: np.ndarray,
    eval_ids: list[int] | None,
    window: int,
) -> tuple[np.ndarray, PerplexityResult | None]:
    """Logits of the probe ``[1, seq, vocab]`` and, with ``eval_ids``, the perplexity of one graph."""
    assert manifest.decoder is not None
    model = open_decoder(model_path, manifest.decoder)
    logits = model.all_logits(probe)
    if eval_ids is None:
        return logits, None
    result = perplexity(
        model,
        eval_ids,
        window=effective_window(manifest, window),
        bos_token_id=bos_for_scoring(manifest),
    )
    return logits, result


def quantize_bundle(
    src: str | Path,
    out: str | Path,
    method: str,
    *,
    eval_text: str | Path | None = None,
    block_size: int | None = None,
    symmetric: bool | None = None,
    accuracy_level: int | None = None,
    eval_tokens: int = DEFAULT_MAX_TOKENS,
    window: int = DEFAULT_WINDOW,
    overwrite: bool = False,
    report: Reporter = silent_reporter,
    gguf_path: str | Path | None = None,
) -> Path:
    """Quantize the fp32 decoder bundle ``src`` with ``method`` into the bundle ``out``.

    Args:
        src: an fp32 text-generation bundle (its checksums are verified).
        out: the folder to write; it must be empty unless ``overwrite``.
        method: a registered method name (``int8``, ``int4-search``, ...; see
            ``edge_slm_quantize.methods``); a former name (``int4``) warns and is recorded
            under the new one.
        eval_text: UTF-8 text file to measure perplexity on before and after; None skips it.
        block_size, symmetric, accuracy_level: override the method's defaults (None keeps them).
        eval_tokens: tokens of ``eval_text`` to score at most.
        window: tokens per perplexity window (capped by the context length).
        overwrite: replace a non-empty ``out``.
        report: progress messages (e.g. ``edge_slm.cli.progress.stderr_reporter``).
        gguf_path: method ``gguf``: the GGUF file the bundle was exported from, when it
            is no longer where the provenance says (its sha256 is checked either way).

    Returns:
        The new bundle folder.

    Raises:
        UnknownMethodError: ``method`` is not registered.
        AlreadyQuantizedError: ``src`` is already quantized.
        QuantizationError: bad settings, a non-decoder or non-fp32 source, a bad output folder.
        BundleError: ``src`` is not a valid bundle.
    """
    src, out = Path(src), Path(out)
    chosen = get_method(method)
    settings = chosen.settings(
        block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level
    )
    settings.check()
    manifest = read_bundle(src)
    _check_source(src, manifest)
    if window < 2:
        raise QuantizationError(f"window must be >= 2 tokens, got {window}")
    tokenizer = Tokenizer.from_file(str(src / manifest.files["tokenizer"]))
    eval_ids = None
    if eval_text is not None:
        eval_text = Path(eval_text)
        eval_ids = encode_text(tokenizer, read_text(eval_text), eval_tokens)
    probe_length = min(_PROBE_TOKENS, manifest.context_length)
    probe_ids = (eval_ids or encode_text(tokenizer, _PROBE_TEXT))[:probe_length]
    probe = np.asarray([probe_ids], dtype=np.int64)  # [1, seq]
    _prepare_output(src, out, overwrite)
    try:
        context = MethodContext(src, manifest, Path(gguf_path) if gguf_path else None)
        return _quantize_into(
            src,
            out,
            manifest,
            chosen,
            settings,
            probe,
            eval_ids,
            eval_text,
            window,
            report,
            context,
        )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _quantize_into(
    src: Path,
    out: Path,
    manifest: Manifest,
    method: Method,
    settings: WeightOnlySettings,
    probe: np.ndarray,
    eval_ids: list[int] | None,
    eval_text: Path | None,
    window: int,
    report: Reporter,
    context: MethodContext,
) -> Path:
    """The work of :func:`quantize_bundle` once inputs are checked and ``out`` is empty."""
    assert manifest.decoder is not None
    src_model = src / manifest.files["model"]
    out_model = out / manifest.files["model"]
    with step(report, f"quantizing {src_model.name} ({method.name})"):
        graph = onnx.load(str(src_model))
        if any(node.op_type == "MatMulNBits" for node in graph.graph.node):
            raise AlreadyQuantizedError(
                f"{src_model} already holds MatMulNBits nodes although its manifest says method 'none'"
            )
        result = method.apply(graph, settings, manifest.decoder.logits, context)
        out_model.parent.mkdir(parents=True, exist_ok=True)
        save_graph(result.model, out_model)
        graph_details = result.details()
        del graph, result  # the graph is on disk: free it before opening sessions
    report(
        f"  {graph_details['quantized_matmuls']} MatMuls quantized, "
        f"{graph_details['remaining_float_matmuls']} float weight MatMuls left, "
        f"{graph_details.get('gemms_rewritten', 0)} Gemms rewritten, lm_head {graph_details['lm_head']}"
    )
    for role, name in manifest.files.items():
        if role != "model":
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, out / name)
    scoring = "scoring fp32 graph" + (" (perplexity)" if eval_ids else "")
    with step(report, scoring):
        logits_before, ppl_before = _score(src_model, manifest, probe, eval_ids, window)
    with step(report, scoring.replace("fp32", "quantized")):
        logits_after, ppl_after = _score(out_model, manifest, probe, eval_ids, window)
    if ppl_before and ppl_after:
        report(
            f"  perplexity {ppl_before.perplexity:.3f} -> {ppl_after.perplexity:.3f} on {ppl_after.tokens} tokens"
        )
    details = {
        **graph_details,
        "max_abs_logit_diff_vs_fp32": float(np.abs(logits_after - logits_before).max()),
        "probe_tokens": int(probe.shape[1]),
        "source_model_sha256": sha256_file(src_model),
        "tools": _tool_versions(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    quantization = Quantization(
        method=method.name,
        bits=settings.bits,
        block_size=settings.block_size,
        symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level,
        size_before_bytes=graph_size(src_model),
        size_after_bytes=graph_size(out_model),
        perplexity_before=ppl_before.perplexity if ppl_before else None,
        perplexity_after=ppl_after.perplexity if ppl_after else None,
        eval_text=eval_text.name if eval_text else None,
        eval_text_sha256=sha256_file(eval_text) if eval_text else None,
        eval_tokens=ppl_after.tokens if ppl_after else None,
        details=details,
    )
    write_manifest(out, replace(manifest, quantization=quantization))
    return out
