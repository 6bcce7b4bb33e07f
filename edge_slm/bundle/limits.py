"""Limits on what a bundle may declare, checked before anything is allocated or read.

A bundle is copied by hand onto a device that runs unattended; a manifest that declares
a million layers, a name template with a ten-million-character format width, or a
tokenizer.json of several gigabytes must be refused in one line, not discovered by
running out of memory. Every limit is far above any model this runtime is meant for
(SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, 8192 positions, 49152 tokens, a
3.5 MB tokenizer.json). Documented in ``docs/reliability.md``.
"""

from __future__ import annotations

MAX_MANIFEST_BYTES = 4 << 20
"""``manifest.json`` (chat templates included) is read only below this size."""

MAX_TOKENIZER_BYTES = 64 << 20
"""``tokenizer.json`` larger than this is refused by its size, before it is hashed."""

MAX_JSON_DEPTH = 64
"""Nesting depth of the manifest's JSON (a deeper one is refused before it is parsed)."""

MAX_LAYERS = 512
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_CONTEXT_LENGTH = 1 << 20
MAX_VOCAB_SIZE = 1 << 22
MAX_LABELS = 100_000
MAX_HIDDEN_SIZE = 1 << 16
MAX_EOS_IDS = 64
MAX_NAME_LENGTH = 255
"""Graph I/O names, name templates and file names."""

MAX_FILES = 1024
"""Entries of ``checksums``."""

MAX_CHAT_TEMPLATE_CHARS = 256 << 10
