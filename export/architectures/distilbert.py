"""DistilBERT: BERT without token type ids (the graph simply has no such input)."""

from __future__ import annotations

from edge_slm_export.architectures.base import EncoderArchitecture


class DistilBertArchitecture(EncoderArchitecture):
    """DistilBERT: what differs (no ``token_type_ids``) is read off the exported graph."""

    model_type = "distilbert"


ARCHITECTURE = DistilBertArchitecture()
