"""Resolve an export SOURCE (hub id, local folder or .gguf file) to a torch model.

Whatever the source, the result is a local Hugging Face folder (config, weights,
tokenizer) that optimum can export, plus the loaded torch model and tokenizer used to
validate the export, and the provenance recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_slm.bundle import sha256_file
from edge_slm_export.errors import ExportError, UnsupportedModelError
from edge_slm_export.gguf_config import gguf_config_overrides

SourceKind = Literal["hub", "folder", "gguf"]


@dataclass
class LoadedSource:
    """A source loaded in torch, with a local HF folder optimum can read."""

    source: str
    kind: SourceKind
    hf_dir: Path
    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    revision: str | None
    source_sha256: str | None


def source_kind(source: str) -> SourceKind:
    """Tell a .gguf file, a local folder and a hub id apart."""
    path = Path(source)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ExportError(f"GGUF file {source!r} does not exist")
        return "gguf"
    if path.is_dir():
        return "folder"
    if path.exists():
        raise ExportError(f"{source!r} is neither a folder nor a .gguf file")
    if source.count("/") > 1 or source.startswith((".", "/", "~")):
        raise ExportError(f"{source!r} is not an existing path nor a hub id like 'org/name'")
    return "hub"


def _folder_sha256(folder: Path) -> str:
    """A digest of a HF folder's config and weight files (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.suffix in {".safetensors", ".bin", ".json"}):
            digest.update(path.name.encode())
            digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def weights_policy(allow_pickle: bool) -> dict[str, Any]:
    """``from_pretrained`` arguments that load only data: never remote code, and
    safetensors only unless ``allow_pickle`` (a ``.bin``/``.pt`` checkpoint is a pickle,
    which runs code when loaded)."""
    return {"trust_remote_code": False, "use_safetensors": None if allow_pickle else True}


def refusal(source: str, exc: Exception, allow_pickle: bool) -> ExportError | None:
    """The error for a source refused because it has pickle weights only, if that is it."""
    text = str(exc)
    missing = "does not appear to have" in text or "no file named" in text
    if not allow_pickle and ".safetensors" in text and missing:
        return ExportError(
            f"{source!r} has no safetensors weights, only a pickle checkpoint (.bin), which "
            "runs code when loaded; convert it to safetensors, or pass --allow-pickle "
            "(allow_pickle=True) if you trust where it came from"
        )
    return None


def load_source(
    source: str, work_dir: Path, task: str = "text-generation", allow_pickle: bool = False
) -> LoadedSource:
    """Load ``source`` in float32 for export and validation.

    A GGUF file is de-quantized by transformers and saved as a HF folder under
    ``work_dir``; folders and hub ids are exported from where they are, from their
    safetensors weights only unless ``allow_pickle`` (see :func:`weights_policy`).
    """
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    auto = AutoModelForCausalLM if task == "text-generation" else AutoModelForSequenceClassification
    kind = source_kind(source)
    try:
        if kind == "gguf":
            path = Path(source).resolve()
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            for key, value in gguf_config_overrides(path).items():
                setattr(config, key, value)  # what transformers' GGUF mapping drops
            model = auto.from_pretrained(
                path.parent, gguf_file=path.name, config=config, dtype=torch.float32
            )
            # A GGUF-loaded model refuses save_pretrained while it carries a quantizer.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            hf_dir = work_dir / "hf"
            model.save_pretrained(hf_dir)
            tokenizer.save_pretrained(hf_dir)
            revision, digest = None, sha256_file(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
            model = auto.from_pretrained(
                source, dtype=torch.float32, **weights_policy(allow_pickle)
            )
            if kind == "folder":
                hf_dir = Path(source).resolve()
                revision, digest = None, _folder_sha256(hf_dir)
            else:
                hf_dir = _hub_snapshot(source)
                revision, digest = getattr(model.config, "_commit_hash", None), None
    except (OSError, ValueError, KeyError) as exc:
        refused = refusal(source, exc, allow_pickle)
        if refused is not None:
            raise refused from None
        if "does not recognize this architecture" in str(exc) or "Unrecognized" in str(exc):
            raise UnsupportedModelError(f"cannot load {source!r}: {exc}") from exc
        raise ExportError(f"cannot load {source!r}: {exc}") from exc
    model.eval()
    return LoadedSource(source, kind, hf_dir, model, tokenizer, revision, digest)


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a hub model (downloaded by from_pretrained)."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in {"0", ""}
    return Path(snapshot_download(repo_id, local_files_only=offline))
