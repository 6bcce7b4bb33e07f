"""RoBERTa: BERT whose position embeddings start after ``padding_idx + 1`` reserved rows."""

from __future__ import annotations

from typing import Any

from edge_slm_export.architectures.base import EncoderArchitecture


class RobertaArchitecture(EncoderArchitecture):
    """RoBERTa: positions count from ``pad_token_id + 1``, so fewer fit the table."""

    model_type = "roberta"

    def position_offset(self, config: Any) -> int:
        return int(config.pad_token_id) + 1


ARCHITECTURE = RobertaArchitecture()
