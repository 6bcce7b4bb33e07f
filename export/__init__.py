"""Build stage: convert Hugging Face models (hub id, folder, .gguf) to edge-slm bundles.

Needs the ``build`` extra (torch, transformers, optimum-onnx). The runtime never
imports this package.
"""

from edge_slm_export.decoder import ExportOptions, export_decoder

__all__ = ["ExportOptions", "export_decoder"]
