"""The supported model families, one module each, found by ``config.model_type``.

``get_architecture("qwen2")`` imports ``edge_slm_export.architectures.qwen2`` and returns
its ``ARCHITECTURE`` (the module name is the ``model_type``, ``-`` spelled ``_``), as
mlx-lm finds ``mlx_lm.models.<model_type>``. Nothing registers itself at import time:
the folder is the registry.

Adding a family is one new file named after its ``model_type`` (Gemma 3's text model is
``gemma3_text``, so ``gemma3_text.py``), subclassing
:class:`~edge_slm_export.architectures.base.DecoderArchitecture` (or the closest family,
e.g. ``LlamaArchitecture``, overriding only what differs, as ``qwen3.py`` does) and
ending with ``ARCHITECTURE = ...Architecture()``, plus its tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import cast

from edge_slm_export.architectures.base import (
    Architecture,
    DecoderArchitecture,
    EncoderArchitecture,
    Kind,
)
from edge_slm_export.errors import UnsupportedModelError

__all__ = [
    "Architecture",
    "DecoderArchitecture",
    "EncoderArchitecture",
    "decoder_architecture",
    "encoder_architecture",
    "get_architecture",
    "supported",
]

_NOT_FAMILIES = frozenset({"base"})


def _module_name(model_type: str) -> str | None:
    name = model_type.replace("-", "_")
    return name if name.isidentifier() and name not in _NOT_FAMILIES else None


def _load(model_type: str) -> Architecture | None:
    name = _module_name(model_type)
    if name is None:
        return None
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{name}":
            return None
        raise
    return cast(Architecture | None, getattr(module, "ARCHITECTURE", None))


def supported(kind: Kind | None = None) -> tuple[str, ...]:
    """The ``model_type`` of every family module here (of one ``kind``), sorted."""
    types = []
    for info in pkgutil.iter_modules(__path__):
        architecture = _load(info.name)
        if architecture is not None and (kind is None or architecture.kind == kind):
            types.append(architecture.model_type)
    return tuple(sorted(types))


def get_architecture(model_type: str, kind: Kind | None = None) -> Architecture:
    """The family whose module is named ``model_type`` (of one ``kind`` if given).

    Raises:
        UnsupportedModelError: no such family (of that kind); the message lists the
            supported ``model_type`` values.
    """
    architecture = _load(model_type)
    if architecture is None or (kind is not None and architecture.kind != kind):
        what = f"{kind}s" if kind else "model types"
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported {what}: {list(supported(kind))}"
        )
    return architecture


def decoder_architecture(model_type: str) -> DecoderArchitecture:
    """The decoder family called ``model_type``; UnsupportedModelError names the others."""
    return cast(DecoderArchitecture, get_architecture(model_type, "decoder"))


def encoder_architecture(model_type: str) -> EncoderArchitecture:
    """The encoder family called ``model_type``; UnsupportedModelError names the others."""
    return cast(EncoderArchitecture, get_architecture(model_type, "encoder"))
