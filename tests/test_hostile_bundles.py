"""A corpus of hostile bundles and prefix caches, generated here: every one refused with
an EdgeSlmError subclass, never a crash, a hang or a raw library error.

The loads run in a subprocess (``_run_corpus``) so that a segfault or an abort in a
native library fails the test by exit status instead of killing pytest. Property-based
tests (hypothesis) drive the manifest reader with mutated and random manifests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edge_slm
from edge_slm.bundle import MANIFEST_FILE, Manifest, read_manifest, write_manifest
from edge_slm.bundle.files import sha256_file
from edge_slm.errors import BundleError, EdgeSlmError

Mutation = Callable[[Path], None]


def _data(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / MANIFEST_FILE).read_text()))


def _put(folder: Path, data: dict[str, Any]) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


def _set(path: tuple[str, ...], value: Any) -> Mutation:
    def mutate(folder: Path) -> None:
        data = _data(folder)
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        _put(folder, data)

    return mutate


def _drop(*path: str) -> Mutation:
    def mutate(folder: Path) -> None:
        data = _data(folder)
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        _put(folder, data)

    return mutate


def _resum(folder: Path) -> None:
    """Record the current files' sha256 (a consistent but hostile bundle)."""
    data = _data(folder)
    data["checksums"] = {
        n: sha256_file(folder / n) for n in data["checksums"] if (folder / n).exists()
    }
    _put(folder, data)


def _truncate(name: str, keep: float, resum: bool) -> Mutation:
    def mutate(folder: Path) -> None:
        path = folder / name
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * keep)])
        if resum and name != MANIFEST_FILE:
            _resum(folder)

    return mutate


def _flip(name: str, where: float) -> Mutation:
    def mutate(folder: Path) -> None:
        path = folder / name
        raw = bytearray(path.read_bytes())
        raw[int(len(raw) * where)] ^= 0xFF
        path.write_bytes(bytes(raw))

    return mutate


def _replace_file(name: str, content: bytes, resum: bool = True) -> Mutation:
    def mutate(folder: Path) -> None:
        (folder / name).write_bytes(content)
        if resum:
            _resum(folder)

    return mutate


def _symlink_out(name: str) -> Mutation:
    def mutate(folder: Path) -> None:
        outside = folder.parent / f"{folder.name}-outside-{name}"
        shutil.copyfile(folder / name, outside)
        (folder / name).unlink()
        (folder / name).symlink_to(outside)

    return mutate


def _sparse_tokenizer(folder: Path) -> None:
    with open(folder / "tokenizer.json", "r+b") as fh:
        fh.truncate(65 << 20)  # sparse: no disk used; refused by size before hashing


def _extra_tokens(folder: Path) -> None:
    from tokenizers import Tokenizer

    manifest, _ = read_manifest(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    grow = manifest.vocab_size - tok.get_vocab_size(with_added_tokens=True) + 5
    tok.add_tokens([f"<x{i}>" for i in range(max(grow, 5))])
    tok.save(str(folder / "tokenizer.json"))
    _resum(folder)


def _swap_tokenizer(other: Path) -> Mutation:
    def mutate(folder: Path) -> None:
        shutil.copyfile(other / "tokenizer.json", folder / "tokenizer.json")
        _resum(folder)

    return mutate


def _deep(folder: Path) -> None:
    data = _data(folder)
    (folder / MANIFEST_FILE).write_text(
        json.dumps(data)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )


def _manifest_text(text: str | bytes) -> Mutation:
    def mutate(folder: Path) -> None:
        raw = text.encode() if isinstance(text, str) else text
        (folder / MANIFEST_FILE).write_bytes(raw)

    return mutate


def _decoder_case(**changes: Any) -> Mutation:
    def mutate(folder: Path) -> None:
        manifest, _ = read_manifest(folder)
        assert manifest.decoder is not None
        write_manifest(folder, replace(manifest, decoder=replace(manifest.decoder, **changes)))

    return mutate


def _manifest_case(**changes: Any) -> Mutation:
    def mutate(folder: Path) -> None:
        manifest, _ = read_manifest(folder)
        write_manifest(folder, replace(manifest, **changes))

    return mutate


def hostile_cases(base: Path, other_family: Path, fused: bool) -> dict[str, Mutation]:
    """name -> a change that makes a good bundle hostile."""
    cases: dict[str, Mutation] = {}
    for keep in (0.0, 0.1, 0.5, 0.9, 0.99):
        cases[f"truncated-manifest-{keep}"] = _truncate(MANIFEST_FILE, keep, False)
        cases[f"truncated-model-{keep}"] = _truncate("model.onnx", keep, False)
        cases[f"truncated-model-resummed-{keep}"] = _truncate("model.onnx", keep, True)
        cases[f"truncated-tokenizer-resummed-{keep}"] = _truncate("tokenizer.json", keep, True)
    for where in (0.0, 0.01, 0.3, 0.5, 0.97):
        cases[f"flipped-model-{where}"] = _flip("model.onnx", where)
        cases[f"flipped-tokenizer-{where}"] = _flip("tokenizer.json", where)
    for where in (0.0, 0.2, 0.5, 0.8, 0.999):
        cases[f"flipped-manifest-{where}"] = _flip(MANIFEST_FILE, where)
    for version in (0, 2, 99, "1", 1.0, True, None, [1]):
        cases[f"version-{version!r}"] = _set(("format_version",), version)
    cases["format-name"] = _set(("format",), "onnx-bundle")
    for name in ("../model.onnx", "/etc/passwd", "sub/model.onnx", "..", "", "a\\b", "x\x00"):
        cases[f"files-model-{name!r}"] = _set(("files", "model"), name)
        cases[f"files-tokenizer-{name!r}"] = _set(("files", "tokenizer"), name)
    cases["checksum-escape"] = _set(("checksums", "../../etc/passwd"), "0" * 64)
    cases["checksum-absolute"] = _set(("checksums", "/etc/hostname"), "0" * 64)
    cases["checksum-not-hex"] = _set(("checksums", "model.onnx"), "z" * 64)
    cases["checksums-list"] = _set(("checksums",), ["model.onnx"])
    cases["no-checksums"] = _drop("checksums")
    cases["symlink-model-out"] = _symlink_out("model.onnx")
    cases["symlink-tokenizer-out"] = _symlink_out("tokenizer.json")
    for key, value in (
        ("num_layers", 10**9),
        ("num_layers", 0),
        ("num_layers", -1),
        ("num_kv_heads", 10**6),
        ("head_dim", 10**7),
        ("max_length", 10**12),
        ("past_key", "past_key_values.{layer:>999999999}.key"),
        ("past_key", "past.{layer!r}.key"),
        ("present_key", "present.{0}.key"),
        ("present_value", "present.{layer.__class__}.value"),
        ("past_value", "no-placeholder"),
        ("logits", "x" * 10_000),
        ("layout", "mystery"),
    ):
        cases[f"decoder-{key}-{str(value)[:20]}"] = _set(("decoder", key), value)
    for key, value in (
        ("context_length", 10**12),
        ("context_length", 0),
        ("vocab_size", 10**10),
        ("vocab_size", "8"),
        ("task", "text-to-speech"),
        ("files", ["model.onnx"]),
        ("labels", 5),
        ("chat_template", "{{" * 200_000),
        ("special_tokens", {"eos_token_ids": ["a"]}),
        ("decoder", None),
        ("generation_defaults", {"max_new_tokens": "many"}),
    ):
        cases[f"field-{key}-{str(value)[:20]}"] = _set((key,), value)
    cases["eos-out-of-vocab"] = _set(("special_tokens", "eos_token_ids"), [10**9])
    cases["unknown-key"] = _set(("colour",), "blue")
    cases["deep-json"] = _deep
    cases["manifest-not-utf8"] = _manifest_text(b"\xff\xfe{")
    cases["manifest-array"] = _manifest_text("[]")
    cases["manifest-huge"] = _manifest_text('{"x": "' + "a" * (5 << 20) + '"}')
    cases["manifest-nan"] = _manifest_text('{"format": NaN}')
    cases["tokenizer-sparse-65MiB"] = _sparse_tokenizer
    cases["tokenizer-garbage"] = _replace_file("tokenizer.json", b"\x00\x01garbage")
    cases["tokenizer-wrong-json"] = _replace_file("tokenizer.json", b'{"model": {"type": "Nope"}}')
    cases["tokenizer-extra-tokens"] = _extra_tokens
    if sha256_file(other_family / "tokenizer.json") != sha256_file(
        base / "tokenizer.json"
    ):  # the tiny test families may share one tokenizer: then it is no mismatch
        cases["tokenizer-other-family"] = _swap_tokenizer(other_family)
    cases["model-garbage"] = _replace_file("model.onnx", os.urandom(4096))
    cases["model-empty"] = _replace_file("model.onnx", b"")
    cases["model-is-json"] = _replace_file("model.onnx", b"{}")
    cases["swapped-kv"] = _decoder_case(
        present_key="present.{layer}.value", present_value="present.{layer}.key"
    )
    cases["fewer-layers"] = _decoder_case(num_layers=1)
    cases["wrong-heads"] = _decoder_case(num_kv_heads=3)
    cases["vocab-mismatch"] = _manifest_case(vocab_size=77)
    if fused:  # the optimum graph computes rotary positions: no bound to check
        cases["context-over-graph"] = _manifest_case(context_length=10**6)
    return cases


_RUNNER = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import edge_slm
from edge_slm.errors import EdgeSlmError
results = {}
for name, path in json.loads(sys.stdin.read()):
    try:
        model = edge_slm.load(path, cache=False)
        if hasattr(model, "generate"):
            model.generate("Hello", max_new_tokens=2, temperature=0.0)
        results[name] = "LOADED"
    except EdgeSlmError as exc:
        results[name] = type(exc).__name__ + ": " + str(exc)[:160]
    except BaseException as exc:  # noqa: BLE001
        results[name] = "RAW " + type(exc).__module__ + "." + type(exc).__name__ + ": " + str(exc)[:160]
print(json.dumps(results))
"""


def _run_corpus(cases: list[tuple[str, str]], timeout: float = 600) -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "EDGE_SLM_THREADS": "1"},
    )
    assert proc.returncode == 0, (
        f"the loader crashed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    )
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_every_hostile_bundle_is_refused_with_a_typed_error(
    fused_bundles: dict[str, Path], bundles: dict[str, Path], tmp_path: Path
) -> None:
    corpus: list[tuple[str, str]] = []
    for label, base, other in (
        ("fused", fused_bundles["llama"], bundles["gpt2"]),
        ("plain", bundles["llama"], bundles["gpt2"]),
    ):
        for name, mutate in hostile_cases(base, other, label == "fused").items():
            folder = tmp_path / f"{label}-{len(corpus)}"
            shutil.copytree(base, folder)
            mutate(folder)
            corpus.append((f"{label}:{name}", str(folder)))
    results = _run_corpus(corpus)
    assert len(results) == len(corpus) >= 200
    bad = {n: r for n, r in results.items() if r.startswith(("RAW", "LOADED"))}
    assert not bad, json.dumps(bad, indent=1)
    assert all(r.split(":")[0].endswith("Error") for r in results.values())


def _prefix_cases(good: Path, tmp_path: Path) -> dict[str, Path]:
    cases: dict[str, Path] = {}

    def write(name: str, arrays: dict[str, Any], compressed: bool = False) -> None:
        path = tmp_path / f"{name}.npz"
        (np.savez_compressed if compressed else np.savez)(path, **arrays)
        cases[name] = path

    with np.load(good) as data:
        arrays = {k: data[k] for k in data.files}
    raw = good.read_bytes()
    for keep in (0.0, 0.05, 0.5, 0.95):
        path = tmp_path / f"truncated-{keep}.npz"
        path.write_bytes(raw[: int(len(raw) * keep)])
        cases[f"truncated-{keep}"] = path
    for where in (0.0, 0.3, 0.6):  # (a flip in the zip trailer changes no array)
        flipped = bytearray(raw)
        flipped[int(len(raw) * where)] ^= 0xFF
        path = tmp_path / f"flipped-{where}.npz"
        path.write_bytes(bytes(flipped))
        cases[f"flipped-{where}"] = path
    n = arrays["tokens"].shape[1]
    # A few kilobytes that decompress to 4 GiB of zeros: refused from the headers.
    bomb = dict(arrays)
    bomb["key_0"] = np.zeros((1, 1, 1, 1), dtype=np.float32)
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, value in bomb.items():
            if name == "key_0":
                header = np.lib.format.header_data_from_array_1_0(value)
                header["shape"] = (1, 1 << 15, 1 << 15, 1)
                with archive.open("key_0.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(member, header)
                    chunk = bytes(1 << 20)
                    for _ in range(64):
                        member.write(chunk)
            else:
                with archive.open(f"{name}.npy", "w") as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
    cases["decompression-bomb"] = path
    write("wrong-dtype", {**arrays, "key_0": arrays["key_0"].astype(np.float64)})
    write("wrong-shape", {**arrays, "value_0": arrays["value_0"][:, :, :1]})
    write("extra-array", {**arrays, "extra": np.zeros(3)})
    write("missing-array", {k: v for k, v in arrays.items() if k != "value_0"})
    write("negative-token", {**arrays, "tokens": -np.ones_like(arrays["tokens"])})
    write("tokens-float", {**arrays, "tokens": arrays["tokens"].astype(np.float32)})
    write("tokens-too-long", {**arrays, "tokens": np.zeros((1, 10**6), dtype=np.int64)})
    write("sha-array", {**arrays, "model_sha256": np.zeros(64)})
    write("other-model", {**arrays, "model_sha256": np.asarray("0" * 64)})
    write("compressed-wrong-shape", {**arrays, "key_0": np.zeros((1, 1, n, 1), np.float32)}, True)
    obj = tmp_path / "object.npz"
    np.savez(obj, **{**arrays, "tokens": np.asarray([[1, "a"]], dtype=object)})
    cases["object-array"] = obj
    (tmp_path / "not-a-zip.npz").write_bytes(b"PK\x03\x04" + os.urandom(512))
    cases["not-a-zip"] = tmp_path / "not-a-zip.npz"
    return cases


_PREFIX_RUNNER = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import edge_slm
from edge_slm.errors import EdgeSlmError
bundle, cases = json.loads(sys.stdin.read())
model = edge_slm.load(bundle, cache=False)
results = {}
for name, path in cases:
    try:
        model.load_prefix_cache(path)
        results[name] = "LOADED"
    except EdgeSlmError as exc:
        results[name] = type(exc).__name__ + ": " + str(exc)[:160]
    except BaseException as exc:  # noqa: BLE001
        results[name] = "RAW " + type(exc).__name__ + ": " + str(exc)[:160]
print(json.dumps(results))
"""


def test_every_poisoned_prefix_cache_is_refused(
    fused_bundles: dict[str, Path], tmp_path: Path
) -> None:
    bundle = fused_bundles["llama"]
    model = edge_slm.load(bundle, cache=False)
    assert isinstance(model, edge_slm.TextGenerator)
    good = model.save_prefix_cache(tmp_path / "good.npz", "You are a kiosk assistant.")
    cases = _prefix_cases(Path(good), tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _PREFIX_RUNNER],
        input=json.dumps([str(bundle), [(n, str(p)) for n, p in cases.items()]]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {n: r for n, r in results.items() if not r.startswith("BundleError")}
    assert not bad, json.dumps(bad, indent=1)
    assert (
        "uncompressed" in results["decompression-bomb"] or "shapes" in results["decompression-bomb"]
    )


# ----------------------------------------------------------- property-based: the reader

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def good_manifest(bundles: dict[str, Path]) -> dict[str, Any]:
    data = json.loads((bundles["llama"] / MANIFEST_FILE).read_text())
    data.pop("checksums")
    return dict(data)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            out += _paths(value, (*prefix, key))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_manifest_reader_never_raises_anything_but_bundle_errors(
    good_manifest: dict[str, Any], data: st.DataObject
) -> None:
    manifest = json.loads(json.dumps(good_manifest))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(manifest)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        node = manifest
        for key in path[:-1]:
            node = node[key]
        if data.draw(st.booleans()):
            node[path[-1]] = data.draw(JSON)
        else:
            del node[path[-1]]
    try:
        parsed = Manifest.from_dict(manifest)
    except BundleError:
        return
    assert isinstance(parsed, Manifest)  # accepted: then it is a consistent manifest
    assert Manifest.from_dict(json.loads(json.dumps(parsed.to_dict()))) == parsed


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=400) | JSON.map(lambda v: json.dumps(v).encode()))
def test_read_manifest_on_any_bytes_is_a_bundle_error(raw: bytes, tmp_path_factory: Any) -> None:
    folder = tmp_path_factory.mktemp("raw")
    (folder / MANIFEST_FILE).write_bytes(raw)
    with pytest.raises(BundleError):
        read_manifest(folder)


def test_the_corpus_is_refused_through_the_public_error_type(tmp_path: Path) -> None:
    with pytest.raises(EdgeSlmError):
        edge_slm.load(tmp_path)
