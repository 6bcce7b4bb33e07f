"""The manifest's meaning checked against the graph and the tokenizer, at load.

The I/O names are checked where each graph is driven (``generation/plain_step.py``,
``generation/fused_step.py`` and ``encoders/encoder.py`` ``_check_graph``); this module
checks what those names alone cannot tell, each mismatch a :class:`BundleError` naming
it: the tokenizer's vocabulary against the graph's logits and the manifest's
``vocab_size``, the classifier's labels against its output width, the embedder's
``hidden_size``, the context length against what the graph covers (``max_length``,
the rotary cos/sin caches, a learned position table), the layer count and the KV
output names (swapped key/value templates), and the task against the graph's output
rank. The graph and the tokenizer are duck-typed (``get_inputs``/``get_outputs``,
``get_vocab_size``, ``get_added_tokens_decoder``): this module imports neither
onnxruntime nor tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_slm.bundle.files import initializer_dims
from edge_slm.bundle.manifest import Manifest
from edge_slm.errors import BundleError


def load_tokenizer(path: Path) -> Any:
    """``tokenizers.Tokenizer.from_file`` with every failure a BundleError (the Rust
    library raises plain Exceptions, and a panic is a BaseException)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"bundle tokenizer {path.name!r} cannot be read: {text}") from None


def _width(shape: Any) -> int | None:
    if not isinstance(shape, (list, tuple)) or not shape:
        return None
    last = shape[-1]
    return last if isinstance(last, int) and last > 0 else None


def _role(name: str) -> str | None:
    low = name.lower()
    key, value = "key" in low, "value" in low
    if key and not value:
        return "key"
    if value and not key:
        return "value"
    return None


def check_vocabulary(manifest: Manifest, tokenizer: Any) -> None:
    """The tokenizer's ids must all index the graph's embedding / logits.

    The ids span the model's vocabulary and the added tokens' ids:
    ``get_vocab_size(with_added_tokens=True)`` would build the whole vocabulary
    (49,152 strings for SmolLM2: 9-16 ms of every load) only to count it.
    """
    added = tokenizer.get_added_tokens_decoder()  # {id: AddedToken}, a few entries
    size = max(int(tokenizer.get_vocab_size(with_added_tokens=False)), max(added, default=-1) + 1)
    if size > manifest.vocab_size:
        raise BundleError(
            f"tokenizer vocabulary ({size} tokens) is larger than the manifest's vocab_size "
            f"{manifest.vocab_size}: ids past it have no embedding row (mismatched tokenizer?)"
        )


def check_decoder(manifest: Manifest, session: Any, tokenizer: Any, model_path: Path) -> None:
    """Vocabulary, layers, KV names and context length of a decoder bundle."""
    io = manifest.decoder
    if io is None:
        raise BundleError("a text-generation bundle needs a 'decoder' section")
    check_vocabulary(manifest, tokenizer)
    outputs = {o.name: o for o in session.get_outputs()}
    logits = outputs.get(io.logits)
    if logits is None:
        raise BundleError(f"the graph has no logits output {io.logits!r}")
    if isinstance(logits.shape, (list, tuple)) and len(logits.shape) != 3:
        raise BundleError(
            f"task text-generation needs logits [batch, seq, vocab]; the graph's {io.logits!r} "
            f"has shape {logits.shape} (an encoder graph?)"
        )
    width = _width(logits.shape)
    if width is not None and width != manifest.vocab_size:
        raise BundleError(
            f"graph logits width {width} != manifest vocab_size {manifest.vocab_size}"
        )
    for template, want in (
        (io.past_key, "key"),
        (io.present_key, "key"),
        (io.past_value, "value"),
        (io.present_value, "value"),
    ):
        role = _role(template)
        if role is not None and role != want:
            raise BundleError(
                f"KV name template {template!r} is given as the {want}s but names {role}s "
                "(swapped key/value names in the decoder section)"
            )
    inputs = {i.name: i for i in session.get_inputs()}
    for names in (inputs, outputs):
        for template in (io.past_key, io.present_key):
            if template.format(layer=io.num_layers) in names:
                raise BundleError(
                    f"the graph has more layers than decoder.num_layers = {io.num_layers} "
                    f"({template.format(layer=io.num_layers)!r} exists)"
                )
    for template in (io.present_key, io.present_value):
        for layer in range(io.num_layers):
            out = outputs.get(template.format(layer=layer))
            shape = getattr(out, "shape", None)
            if isinstance(shape, (list, tuple)) and len(shape) == 4:
                heads, dim = shape[1], shape[3]
                if (isinstance(heads, int) and heads != io.num_kv_heads) or (
                    isinstance(dim, int) and dim != io.head_dim
                ):
                    raise BundleError(
                        f"graph output {template.format(layer=layer)!r} shape {shape} disagrees with manifest "
                        f"(kv_heads={io.num_kv_heads}, head_dim={io.head_dim})"
                    )
    if io.layout == "gqa-shared" and io.max_length is not None:
        if manifest.context_length > io.max_length:
            raise BundleError(
                f"context_length {manifest.context_length} is larger than the graph's "
                f"max_length {io.max_length} (the positions its KV buffer and rotary cache cover)"
            )
        for name, dims in initializer_dims(model_path).items():
            if dims and dims[0] < io.max_length:
                raise BundleError(
                    f"decoder.max_length {io.max_length} is larger than the graph's {name!r} "
                    f"({dims[0]} positions)"
                )


def check_encoder(manifest: Manifest, session: Any, tokenizer: Any) -> None:
    """Vocabulary, label count / hidden size and output rank of an encoder bundle."""
    io = manifest.encoder
    if io is None:
        raise BundleError(f"a {manifest.task} bundle needs an 'encoder' section")
    check_vocabulary(manifest, tokenizer)
    outputs = {o.name: o for o in session.get_outputs()}
    out = outputs.get(io.output)
    shape = getattr(out, "shape", None)
    if not isinstance(shape, (list, tuple)):
        return
    if manifest.task == "token-classification":
        if len(shape) != 3:
            raise BundleError(
                f"task token-classification needs an output [batch, seq, labels]; the graph's "
                f"{io.output!r} has shape {shape}"
            )
    elif len(shape) != 2:
        raise BundleError(
            f"task {manifest.task} needs an output [batch, width]; the graph's {io.output!r} "
            f"has shape {shape} (a decoder graph?)"
        )
    width = _width(shape)
    if manifest.task in ("text-classification", "token-classification"):
        labels = len(manifest.labels or [])
        if width is not None and width != labels:
            raise BundleError(
                f"the classifier's output {io.output!r} has {width} classes but the manifest "
                f"lists {labels} labels"
            )
    elif io.hidden_size is not None and width is not None and width != io.hidden_size:
        raise BundleError(
            f"the embedder's output {io.output!r} has width {width} but encoder.hidden_size "
            f"is {io.hidden_size}"
        )
