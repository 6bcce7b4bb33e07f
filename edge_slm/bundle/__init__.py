"""The bundle format: the manifest's typed sections and the files beside it.

* :mod:`edge_slm.bundle.manifest`: the manifest's dataclasses and their validation;
* :mod:`edge_slm.bundle.files`: checksums, :func:`read_bundle`, :func:`write_manifest`.
"""

from edge_slm.bundle.files import (
    BundleWarning,
    bundle_files,
    read_bundle,
    read_manifest,
    sha256_file,
    verify_checksums,
    write_manifest,
)
from edge_slm.bundle.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    DecoderIO,
    EncoderIO,
    GenerationDefaults,
    Manifest,
    ProblemType,
    Provenance,
    Quantization,
    SpecialTokens,
    Training,
    Validation,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "BundleWarning",
    "DecoderIO",
    "EncoderIO",
    "GenerationDefaults",
    "Manifest",
    "ProblemType",
    "Provenance",
    "Quantization",
    "SpecialTokens",
    "Training",
    "Validation",
    "bundle_files",
    "read_bundle",
    "read_manifest",
    "sha256_file",
    "verify_checksums",
    "write_manifest",
]
