"""BERT (and MiniLM, which is a BERT): the encoder family everything else refines."""

from __future__ import annotations

from edge_slm_export.architectures.base import EncoderArchitecture


class BertArchitecture(EncoderArchitecture):
    """BERT: absolute positions from 0, token type ids; optimum's graph as it is."""

    model_type = "bert"


ARCHITECTURE = BertArchitecture()
