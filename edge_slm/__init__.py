"""edge-slm runtime: run small language model bundles with numpy, onnxruntime and tokenizers.

    >>> import edge_slm
    >>> model = edge_slm.load("bundles/smollm2-int4")
    >>> print(model.chat([{"role": "user", "content": "What is the capital of France?"}]).text)

Nothing here imports torch, transformers or the build stage (``export``, ``quantize``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edge_slm.bundle import Manifest
from edge_slm.bundle.files import read_bundle
from edge_slm.encoders.classify import Classification, TextClassifier
from edge_slm.encoders.embed import CosineIndex, Hit, TextEmbedder
from edge_slm.encoders.encoder import TruncationWarning
from edge_slm.encoders.entities import Entity
from edge_slm.encoders.token_classify import TokenClassification, TokenClassifier
from edge_slm.encoders.train_head import TrainedClassifier, read_examples, train_classifier
from edge_slm.engine.session import LoadOptions
from edge_slm.errors import (
    BundleError,
    BundleVersionError,
    BusyError,
    CapacityError,
    ChatTemplateError,
    ChecksumError,
    ConstraintError,
    ContextLengthError,
    DeadlineError,
    EdgeSlmError,
    InvalidArgumentError,
)
from edge_slm.generation.backends import Capacity
from edge_slm.generation.constraints import Grammar, JsonSchema, Regex
from edge_slm.generation.conversation import Conversation
from edge_slm.generation.model import TextGenerator
from edge_slm.generation.options import GenerationOptions
from edge_slm.generation.results import Chunk, GenerationResult, Timings, TokenStep
from edge_slm.generation.tools import Tool, ToolCall, ToolUse

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "BundleVersionError",
    "BusyError",
    "Capacity",
    "CapacityError",
    "ChatTemplateError",
    "ChecksumError",
    "Chunk",
    "Classification",
    "ConstraintError",
    "ContextLengthError",
    "Conversation",
    "CosineIndex",
    "DeadlineError",
    "EdgeSlmError",
    "Entity",
    "GenerationOptions",
    "GenerationResult",
    "Grammar",
    "Hit",
    "InvalidArgumentError",
    "JsonSchema",
    "LoadOptions",
    "Manifest",
    "Regex",
    "TextClassifier",
    "TextEmbedder",
    "TextGenerator",
    "Timings",
    "TokenClassification",
    "TokenClassifier",
    "TokenStep",
    "Tool",
    "ToolCall",
    "ToolUse",
    "TrainedClassifier",
    "TruncationWarning",
    "load",
    "read_examples",
    "train_classifier",
]


def load(
    path: str | Path,
    *,
    threads: int | None = None,
    spinning: bool | None = None,
    verify: bool = True,
    cache: bool | str | Path | None = None,
    options: LoadOptions | None = None,
) -> TextGenerator | TextClassifier | TokenClassifier | TextEmbedder:
    """Load a bundle folder and return the object for its task.

    A text-generation bundle gives a :class:`TextGenerator`, a text-classification
    bundle a :class:`TextClassifier`, a token-classification bundle a
    :class:`TokenClassifier`, a feature-extraction bundle a :class:`TextEmbedder`.
    Each is safe to share between threads.

    Args:
        path: the bundle folder (``manifest.json``, ``model.onnx``, ``tokenizer.json``).
        threads: onnxruntime intra-op threads; None uses every CPU this process may use.
        spinning: let idle onnxruntime threads spin (None keeps onnxruntime's default).
        verify: check every file's sha256 against the manifest before loading.
        cache: the prepared-session cache (:mod:`edge_slm.engine.prepared_cache`): a second
            load of the same bundle skips graph optimization and weight pre-packing.
            True: on, in the default folder; a path: on, in that folder; False: off;
            None: on unless ``EDGE_SLM_CACHE=0``.
        options: all load settings in one object (:class:`LoadOptions`, which also sets
            how many conversations a generator serves at once); the keyword arguments
            above, when given, override its fields.

    Raises:
        BundleError: the folder is not a valid bundle (BundleVersionError for an
            unknown format version, ChecksumError for a modified or missing file).
        InvalidArgumentError: a load setting is out of range.
    """
    settings = options or LoadOptions()
    overrides: dict[str, object] = {}
    if threads is not None:
        overrides["threads"] = threads
    if spinning is not None:
        overrides["spinning"] = spinning
    if verify is not True:
        overrides["verify"] = verify
    if cache is not None:
        overrides["prepared_cache"] = cache
    if overrides:
        settings = replace(settings, **overrides)  # type: ignore[arg-type]
    folder = Path(path)

    manifest = read_bundle(folder, verify=settings.verify, hashes=settings.bundle_hashes())
    if manifest.task == "text-generation":
        return TextGenerator(folder, manifest, settings)
    if manifest.task == "text-classification":
        return TextClassifier(folder, manifest, settings)
    if manifest.task == "token-classification":
        return TokenClassifier(folder, manifest, settings)
    if manifest.task == "feature-extraction":
        return TextEmbedder(folder, manifest, settings)
    raise BundleError(f"bundle task {manifest.task!r} is not supported by this runtime yet")
