"""Typed errors of the build stage."""

from __future__ import annotations

from edge_slm.errors import EdgeSlmError


class ExportError(EdgeSlmError):
    """The source could not be loaded or converted."""


class UnsupportedModelError(ExportError):
    """The source's architecture is not one the exporter supports."""


class ValidationError(ExportError):
    """The exported graph's outputs differ from the torch model's beyond tolerance."""
