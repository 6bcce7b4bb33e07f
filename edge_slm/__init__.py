"""edge-slm runtime: run small language model bundles with numpy, onnxruntime and tokenizers.

    >>> import edge_slm
    >>> model = edge_slm.load("bundles/smollm2-int4")
    >>> print(model.chat([{"role": "user", "content": "What is the capital of France?"}]).text)

Nothing here imports torch, transformers or the build stage (``export``, ``quantize``).
"""

from __future__ import annotations

from pathlib import Path

from edge_slm.bundle import Manifest, read_bundle
from edge_slm.encoders.classify import Classification, TextClassifier
from edge_slm.encoders.embed import CosineIndex, Hit, TextEmbedder
from edge_slm.encoders.encoder import TruncationWarning
from edge_slm.errors import (
    BundleError,
    BundleVersionError,
    ChatTemplateError,
    ChecksumError,
    ContextLengthError,
    EdgeSlmError,
    InvalidArgumentError,
)
from edge_slm.generation.model import (
    Chunk,
    GenerationOptions,
    GenerationResult,
    TextGenerator,
    Timings,
    TokenStep,
)

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "BundleVersionError",
    "ChatTemplateError",
    "ChecksumError",
    "Chunk",
    "Classification",
    "ContextLengthError",
    "CosineIndex",
    "EdgeSlmError",
    "GenerationOptions",
    "GenerationResult",
    "Hit",
    "InvalidArgumentError",
    "Manifest",
    "TextClassifier",
    "TextEmbedder",
    "TextGenerator",
    "Timings",
    "TokenStep",
    "TruncationWarning",
    "load",
]


def load(
    path: str | Path,
    *,
    threads: int | None = None,
    spinning: bool | None = None,
    verify: bool = True,
    cache: bool | str | Path | None = None,
) -> TextGenerator | TextClassifier | TextEmbedder:
    """Load a bundle folder and return the object for its task.

    A text-generation bundle gives a :class:`TextGenerator`, a text-classification
    bundle a :class:`TextClassifier`, a feature-extraction bundle a :class:`TextEmbedder`.

    Args:
        path: the bundle folder (``manifest.json``, ``model.onnx``, ``tokenizer.json``).
        threads: onnxruntime intra-op threads; None uses every CPU this process may use.
        spinning: let idle onnxruntime threads spin (None keeps onnxruntime's default).
        verify: check every file's sha256 against the manifest before loading.
        cache: the prepared-session cache (:mod:`edge_slm.engine.prepared_cache`): a second
            load of the same bundle skips graph optimization and weight pre-packing.
            True: on, in the default folder; a path: on, in that folder; False: off;
            None: on unless ``EDGE_SLM_CACHE=0``.

    Raises:
        BundleError: the folder is not a valid bundle (BundleVersionError for an
            unknown format version, ChecksumError for a modified or missing file).
    """
    from edge_slm.engine import prepared_cache

    folder = Path(path)
    manifest = read_bundle(folder, verify=verify)
    setting = prepared_cache.env_enabled() if cache is None else cache
    if manifest.task == "text-generation":
        return TextGenerator(folder, manifest, threads=threads, spinning=spinning, cache=setting)
    if manifest.task == "text-classification":
        return TextClassifier(folder, manifest, threads=threads, spinning=spinning, cache=setting)
    if manifest.task == "feature-extraction":
        return TextEmbedder(folder, manifest, threads=threads, spinning=spinning, cache=setting)
    raise BundleError(f"bundle task {manifest.task!r} is not supported by this runtime yet")
