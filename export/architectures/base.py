"""What a model family tells the exporter: the base classes the family modules subclass.

A family module (``llama.py``, ``gpt2.py``, ``roberta.py``, ...) subclasses one of these,
overrides only what differs, and binds an instance to the module-level name
``ARCHITECTURE``; :mod:`edge_slm_export.architectures` finds it by ``model_type``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from edge_slm_export.errors import UnsupportedModelError
from edge_slm_export.fused_graph import FusedGraph

Kind = Literal["decoder", "encoder"]


class Architecture:
    """A model family, named by its transformers ``config.model_type``."""

    model_type: ClassVar[str]
    kind: ClassVar[Kind]


class DecoderArchitecture(Architecture):
    """A causal language model family.

    Every supported decoder exports through optimum's plain graph (``--graph optimum``);
    a family that can also write the fused graph (:mod:`edge_slm_export.fused_graph`)
    sets ``fused = True`` and implements :meth:`build_fused_graph`. ``--graph auto``
    picks the fused graph where ``fused`` is set.
    """

    kind: ClassVar[Kind] = "decoder"
    fused: ClassVar[bool] = False

    def build_fused_graph(
        self, model: Any, out_path: Path, max_length: int | None = None
    ) -> FusedGraph:
        """Write the fused ONNX graph of ``model`` (float32 torch) to ``out_path``.

        Args:
            model: the family's ``*ForCausalLM`` in float32.
            out_path: the ``.onnx`` file to write (external data beside it past 2 GiB).
            max_length: positions the graph covers; None = the config's maximum.

        Returns:
            The path, the manifest's decoder section and the node count.

        Raises:
            UnsupportedModelError: the family has no fused graph, or the model uses a
                feature the graph does not express.
        """
        raise UnsupportedModelError(
            f"the fused graph is not available for {self.model_type!r} (use --graph optimum)"
        )


class EncoderArchitecture(Architecture):
    """An encoder family (text classification, sentence embeddings), exported by optimum."""

    kind: ClassVar[Kind] = "encoder"

    def position_offset(self, config: Any) -> int:
        """Position-embedding rows reserved before the first real position (0 for BERT)."""
        return 0
