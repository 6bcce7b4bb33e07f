"""Build stage: make an fp32 decoder bundle small with weight-only quantization.

Needs the ``build`` extra (onnx, onnxruntime's quantization tools with onnx-ir). The
runtime never imports this package.

    >>> from edge_slm_quantize import quantize_bundle
    >>> quantize_bundle("bundles/smollm2", "bundles/smollm2-int4", "int4-search", eval_text="prose.txt")

Methods: one module per family in ``quantize/methods/`` (see :mod:`edge_slm_quantize.methods`).
"""

from edge_slm.generation.perplexity import PerplexityResult, bundle_perplexity, perplexity
from edge_slm_quantize.bundle import quantize_bundle
from edge_slm_quantize.errors import AlreadyQuantizedError, QuantizationError, UnknownMethodError
from edge_slm_quantize.methods import ALIASES, METHODS, Method, get_method
from edge_slm_quantize.weight_only import WeightOnlySettings

__all__ = [
    "ALIASES",
    "METHODS",
    "AlreadyQuantizedError",
    "Method",
    "PerplexityResult",
    "QuantizationError",
    "UnknownMethodError",
    "WeightOnlySettings",
    "bundle_perplexity",
    "get_method",
    "perplexity",
    "quantize_bundle",
]
