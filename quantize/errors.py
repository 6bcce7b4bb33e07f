"""Typed errors of the quantization stage."""

from __future__ import annotations

from edge_slm.errors import EdgeSlmError


class QuantizationError(EdgeSlmError):
    """A bundle cannot be quantized as asked (bad source, settings or output folder)."""


class UnknownMethodError(QuantizationError, ValueError):
    """The quantization method is not one of the registered methods."""


class AlreadyQuantizedError(QuantizationError):
    """The source bundle is already quantized; quantizing twice loses quality twice."""
