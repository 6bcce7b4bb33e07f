"""Writing ONNX graphs of any size (the build stage's one place for it)."""

from __future__ import annotations

from pathlib import Path

import onnx

# protobuf cannot serialize a message of 2 GiB or more: larger graphs keep external data.
_PROTOBUF_LIMIT = (1 << 31) - 1


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Save ``model`` as one file when it fits in protobuf's 2 GiB, else with ``<name>.data``."""
    try:
        fits = model.ByteSize() < _PROTOBUF_LIMIT
    except ValueError:  # some protobuf builds refuse to size a message over the limit
        fits = False
    if fits:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
            size_threshold=1024,
        )
