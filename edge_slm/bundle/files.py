"""A bundle's files on disk: checksums, reading and writing ``manifest.json``.

:func:`read_bundle` is the runtime's way in: it parses the manifest, refuses unknown
format versions (via :class:`~edge_slm.bundle.manifest.Manifest`) and, with ``verify``,
checks every file's sha256 before anything is handed to onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, cast

from edge_slm.bundle.manifest import MANIFEST_FILE, Manifest
from edge_slm.errors import BundleError, ChecksumError

_HASH_CHUNK = 1 << 22  # 4 MiB


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(folder: Path) -> list[str]:
    """Every regular file of a bundle except the manifest, as sorted relative paths."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    )


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` into ``folder``, adding the sha256 of every other file.

    Call it last, once every file of the bundle is in place.
    """
    folder = Path(folder)
    data = manifest.to_dict()
    data["checksums"] = {name: sha256_file(folder / name) for name in bundle_files(folder)}
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def verify_checksums(folder: Path, checksums: Any) -> None:
    """Raise ChecksumError unless every listed file exists with its recorded sha256.

    Files present in the folder but absent from the list are refused too: a bundle is
    exactly what its manifest says.
    """
    if not isinstance(checksums, dict) or not checksums:
        raise BundleError("manifest has no 'checksums' object")
    for name, expected in checksums.items():
        path = (folder / name).resolve()
        if folder.resolve() not in path.parents:
            raise BundleError(f"checksum entry {name!r} points outside the bundle")
        if not path.is_file():
            raise ChecksumError(f"bundle file {name!r} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(
                f"bundle file {name!r} is corrupt or was modified: sha256 {actual} "
                f"!= {expected} recorded in the manifest"
            )
    extra = sorted(set(bundle_files(folder)) - set(checksums))
    if extra:
        raise ChecksumError(f"bundle holds files its manifest does not list: {extra}")


def read_manifest(folder: str | Path) -> tuple[Manifest, dict[str, str]]:
    """Parse ``manifest.json`` without checking files; returns (manifest, checksums)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise BundleError(f"bundle folder {str(folder)!r} does not exist")
    if not path.is_file():
        raise BundleError(f"{str(folder)!r} is not a bundle: it has no {MANIFEST_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object")
    data = dict(data)
    checksums = data.pop("checksums", None)
    manifest = Manifest.from_dict(data)
    return manifest, cast(dict[str, str], checksums)


def read_bundle(folder: str | Path, verify: bool = True) -> Manifest:
    """Read and validate a bundle's manifest and, if ``verify``, every file's sha256."""
    folder = Path(folder)
    manifest, checksums = read_manifest(folder)
    if verify:
        verify_checksums(folder, checksums)
    for role, name in manifest.files.items():
        if not (folder / name).is_file():
            raise BundleError(f"bundle {role} file {name!r} is missing")
    return manifest
