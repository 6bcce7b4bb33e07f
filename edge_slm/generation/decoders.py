"""Open a bundle's decoder graph as the runner its layout calls for."""

from __future__ import annotations

from pathlib import Path

from edge_slm.bundle import DecoderIO
from edge_slm.engine.session import LoadOptions
from edge_slm.errors import BundleError
from edge_slm.generation.fused_step import LAYOUT, FusedDecoder
from edge_slm.generation.plain_step import PlainDecoder

Decoder = PlainDecoder | FusedDecoder
"""The graph runner of either layout (both offer ``all_logits`` and ``bytes_per_position``)."""


def open_decoder(model_path: Path, io: DecoderIO, options: LoadOptions | None = None) -> Decoder:
    """The graph runner a decoder section calls for (optimum or gqa-shared layout).

    ``options`` sets threads, spinning and the prepared-session cache; None opens the
    graph with the machine's defaults and no cache (a graph outside a loaded bundle:
    build tools, scoring). :func:`edge_slm.load` passes its own.
    """
    if io.layout not in (LAYOUT, "optimum"):
        raise BundleError(f"unknown decoder layout {io.layout!r}; allowed: ['optimum', {LAYOUT!r}]")
    opened = (options or LoadOptions(prepared_cache=False)).open(model_path)
    if io.layout == LAYOUT:
        return FusedDecoder(opened.session, io, opened.detail)
    return PlainDecoder(opened.session, io, opened.detail)
