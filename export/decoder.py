"""Export a Hugging Face decoder (a family in :mod:`edge_slm_export.architectures`) to a bundle."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from edge_slm.bundle import (
    DecoderIO,
    GenerationDefaults,
    Manifest,
    Provenance,
    SpecialTokens,
    write_manifest,
)
from edge_slm.cli.progress import Reporter, silent_reporter, step
from edge_slm_export.architectures import decoder_architecture
from edge_slm_export.chat_template import compile_chat_template
from edge_slm_export.errors import ExportError
from edge_slm_export.source import LoadedSource, load_source
from edge_slm_export.validate import validate_decoder

GRAPHS = ("auto", "optimum", "fused")
DEFAULT_TOLERANCE = 1e-3
_TOOLS = ("edge-slm", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime")


@dataclass(frozen=True)
class ExportOptions:
    """Knobs of :func:`export_decoder`; defaults suit every supported family."""

    tolerance: float = DEFAULT_TOLERANCE
    opset: int | None = None
    # "auto": the fused graph for the families that build one (export/architectures/,
    # fused = True), optimum's graph otherwise; "optimum": optimum's plain graph;
    # "fused": the family's build_fused_graph (export/fused_graph.py has the common parts)
    graph: str = "auto"
    overwrite: bool = False
    # Load pickle checkpoints (.bin) too; off: safetensors only (a pickle runs code).
    allow_pickle: bool = False


def tool_versions() -> dict[str, str]:
    """Installed versions of the tools that shape a bundle (for provenance)."""
    versions = {}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    """Create an empty output folder; refuse to clobber a non-empty one unless asked."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ExportError(f"output folder {str(out_dir)!r} is not empty (pass --overwrite)")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _decoder_io(config: Any, graph_inputs: set[str]) -> DecoderIO:
    """KV layout and I/O names read from the model config and the exported graph."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return DecoderIO(
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        position_ids="position_ids" if "position_ids" in graph_inputs else None,
    )


def _context_length(config: Any, io: DecoderIO) -> int:
    """The model's context, cut to the positions a fused graph covers (a family may build
    fewer than the config allows: Phi-3's long-rope graph stops at the original length)."""
    length = int(
        getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
    )
    return min(length, io.max_length) if io.max_length else length


def _special_tokens(tokenizer: Any, generation_config: Any) -> SpecialTokens:
    """Special ids, preferring generation_config (what ``generate`` stops on)."""
    eos = generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = generation_config.pad_token_id
    if pad is None:
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [None])[0]
        )
    bos = generation_config.bos_token_id
    if bos is None:
        bos = tokenizer.bos_token_id
    probe = tokenizer("a")["input_ids"]
    return SpecialTokens(
        bos_token_id=bos,
        eos_token_ids=[int(i) for i in eos_ids],
        pad_token_id=pad,
        bos_token=tokenizer.convert_ids_to_tokens(bos) if bos is not None else None,
        eos_token=tokenizer.convert_ids_to_tokens(eos_ids[0]) if eos_ids else None,
        pad_token=tokenizer.convert_ids_to_tokens(pad) if pad is not None else None,
        add_bos_token=bool(bos is not None and probe and probe[0] == bos),
    )


def _generation_defaults(generation_config: Any) -> GenerationDefaults:
    """Only the settings the model's authors set explicitly."""
    given = generation_config.to_diff_dict()
    keys = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    values = {k: given[k] for k in keys if given.get(k) is not None}
    if given.get("max_new_tokens"):
        values["max_new_tokens"] = int(given["max_new_tokens"])
    return GenerationDefaults(**values)


def _onnx_export(hf_dir: Path, out: Path, opset: int | None) -> Path:
    """Run optimum's exporter: one graph for prefill and decode (text-generation-with-past)."""
    from optimum.exporters.onnx import main_export

    main_export(
        str(hf_dir),
        output=out,
        task="text-generation-with-past",
        opset=opset,
        do_validation=False,  # we validate ourselves, with the KV-cache loop of the runtime
        no_post_process=False,
    )
    model = out / "model.onnx"
    if not model.is_file():
        raise ExportError(f"optimum wrote no model.onnx in {out}")
    return model


def export_decoder(
    source: str,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    report: Reporter = silent_reporter,
) -> Path:
    """Export ``source`` (hub id, HF folder or .gguf file) to a bundle in ``out_dir``.

    The ONNX logits are validated against the torch model; the max difference goes
    into the manifest and an export over ``options.tolerance`` raises ValidationError
    without leaving a bundle behind.

    Returns:
        The bundle folder.
    """
    options = options or ExportOptions()
    out_dir = Path(out_dir)
    prepare_output(out_dir, options.overwrite)
    with tempfile.TemporaryDirectory(prefix="edge-slm-export-") as tmp:
        work = Path(tmp)
        with step(report, f"loading {source}"):
            loaded = load_source(source, work, allow_pickle=options.allow_pickle)
        architecture = decoder_architecture(loaded.model.config.model_type)
        if options.graph not in GRAPHS:
            raise ExportError(f"unknown graph {options.graph!r}; allowed: {list(GRAPHS)}")
        if options.graph == "auto":
            options = replace(options, graph="fused" if architecture.fused else "optimum")
        fused_io = None
        with step(report, f"exporting to ONNX ({options.graph} graph)"):
            if options.graph == "fused":
                fused = architecture.build_fused_graph(loaded.model, work / "onnx" / "model.onnx")
                onnx_path, fused_io = fused.path, fused.io
            else:
                onnx_path = _onnx_export(loaded.hf_dir, work / "onnx", options.opset)
        try:
            _assemble(loaded, onnx_path, out_dir, fused_io, options, report)
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)
            raise
    return out_dir


def _assemble(
    loaded: LoadedSource,
    onnx_path: Path,
    out_dir: Path,
    fused_io: DecoderIO | None,
    options: ExportOptions,
    report: Reporter,
) -> None:
    """Copy graph and tokenizer into the bundle, validate, write the manifest.

    ``fused_io`` is the fused graph's decoder section; None reads optimum's graph.
    """
    import onnx

    for path in onnx_path.parent.iterdir():
        if path.name == "model.onnx" or path.name.startswith("model.onnx"):
            shutil.copy2(path, out_dir / path.name)
    tokenizer_json = loaded.tokenizer.backend_tokenizer
    tokenizer_json.save(str(out_dir / "tokenizer.json"))
    graph = onnx.load(str(out_dir / "model.onnx"), load_external_data=False)
    config = loaded.model.config
    io = fused_io or _decoder_io(config, {i.name for i in graph.graph.input})
    with step(report, "validating ONNX against torch"):
        validation = validate_decoder(
            out_dir / "model.onnx", io, loaded.model, loaded.tokenizer, options.tolerance
        )
    report(
        f"  max |logit difference| = {validation.max_abs_logit_diff:.2e}, "
        f"greedy tokens match: {validation.greedy_tokens_match}"
    )
    special = _special_tokens(loaded.tokenizer, loaded.model.generation_config)
    template = loaded.tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: keep the default one
        template = template.get("default")
    special_strings = {
        k: v for k, v in loaded.tokenizer.special_tokens_map.items() if isinstance(v, str)
    }
    manifest = Manifest(
        task="text-generation",
        model_type=config.model_type,
        architecture=(config.architectures or [type(loaded.model).__name__])[0],
        vocab_size=int(config.vocab_size),
        context_length=_context_length(config, io),
        files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
        special_tokens=special,
        provenance=Provenance(
            source=loaded.source,
            source_kind=loaded.kind,
            revision=loaded.revision,
            source_sha256=loaded.source_sha256,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            tools=tool_versions(),
        ),
        decoder=io,
        chat_template=template,
        chat_format=compile_chat_template(template, special_strings) if template else None,
        generation_defaults=_generation_defaults(loaded.model.generation_config),
        validation=validation,
    )
    write_manifest(out_dir, manifest)
