"""Static files from one folder (``--static DIR``), never outside it."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from urllib.parse import unquote

TEXT_TYPES = ("text/", "application/javascript", "application/json", "image/svg+xml")
EXTRA_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".webmanifest": "application/manifest+json",
    ".wasm": "application/wasm",
    ".woff2": "font/woff2",
    ".ico": "image/x-icon",
}


def resolve(root: Path, url_path: str) -> Path | None:
    """The file ``url_path`` names under ``root`` (a folder gives its index.html), or
    None when it does not exist or would lie outside ``root`` (``..``, absolute paths,
    symbolic links leading out)."""
    raw = unquote(url_path)
    if "\x00" in raw or "\\" in raw:
        return None
    base = root.resolve()
    target = (base / raw.lstrip("/")).resolve()
    if not target.is_relative_to(base):
        return None
    if target.is_dir():
        target = target / "index.html"
    return target if target.is_file() else None


def content_type(path: Path) -> str:
    """The Content-Type of ``path`` (UTF-8 for text)."""
    kind = EXTRA_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0]
    kind = kind or "application/octet-stream"
    if kind.startswith(TEXT_TYPES):
        kind += "; charset=utf-8"
    return kind
