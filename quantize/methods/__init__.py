"""The registry of decoder quantization methods: a name on the CLI and in the manifest -> how.

One module per method family, each with a module-level tuple ``METHODS`` of
:class:`~edge_slm_quantize.methods.base.Method`:

* ``rtn.py``: round-to-nearest (onnxruntime's quantizer): ``int8``, ``int8-shared``,
  ``int4-rtn``, ``int4-rtn-shared``, ``int4-rtn-emb8``;
* ``searched.py``: searched per-block scales: ``int4-search``;
* ``gguf.py``: a GGUF source's own blocks: ``gguf``, ``gguf-small``, ``gguf-head4``.

The shared passes stay outside this folder (``weight_only.py``, ``search.py``,
``gguf.py``, ``shared_embedding.py``, ``graph_passes.py``, ``blocks.py``). A new method
is a ``Method`` in a new (or its family's) module here: no change in
:mod:`edge_slm_quantize.bundle` or the CLI. A renamed method lists its old name in
``aliases``: still accepted, with a FutureWarning (once per name and process), and the
manifest records the new name. Encoder bundles have their own methods
(:mod:`edge_slm_quantize.encoder`).
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings

from edge_slm_quantize.errors import UnknownMethodError
from edge_slm_quantize.methods.base import Method, MethodContext, QuantizedGraph

__all__ = ["ALIASES", "METHODS", "Method", "MethodContext", "QuantizedGraph", "get_method"]


def _collect() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for method in getattr(module, "METHODS", ()):
            if method.name in found:
                raise RuntimeError(f"quantization method {method.name!r} is defined twice")
            found[method.name] = method
    return found


# name -> method; old name -> new name
METHODS: dict[str, Method] = _collect()
ALIASES: dict[str, str] = {alias: m.name for m in METHODS.values() for alias in m.aliases}
_WARNED: set[str] = set()


def get_method(name: str) -> Method:
    """The registered method called ``name`` (or formerly called so: warns once).

    Raises:
        UnknownMethodError: ``name`` is neither a method nor an alias; the message
            lists the methods.
    """
    if name in ALIASES:
        new = ALIASES[name]
        if name not in _WARNED:
            _WARNED.add(name)
            warnings.warn(
                f"quantization method {name!r} is now called {new!r}; the old name still "
                "works for now and gives the same graph",
                FutureWarning,
                stacklevel=2,
            )
        name = new
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown quantization method {name!r}; allowed: {sorted(METHODS)}"
        ) from None
