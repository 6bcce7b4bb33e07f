"""The prepared-session cache (edge_slm/engine/prepared_cache.py): hits, misses, repairs, fallbacks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_slm
from edge_slm.bundle import files as bundle_files_module
from edge_slm.bundle import hash_record, read_manifest, sha256_file
from edge_slm.engine import prepared_cache
from edge_slm.engine.prepared_cache import (
    CACHE_DIR_ENV,
    CACHE_ENV,
    DATA_FILE,
    ENTRY_FILE,
    GRAPH_FILE,
    SessionCacheWarning,
    align_external_data,
    default_cache_dir,
)
from edge_slm.engine.session import LoadOptions, bundle_model_sha256, open_session
from edge_slm.generation.decoders import open_decoder

IDS = np.asarray([[5, 17, 33, 90, 120, 7, 8, 41]], dtype=np.int64)
PROMPT = "Once upon a time"


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _logits(bundle: Path, cache: Any) -> tuple[np.ndarray, str]:
    manifest, _ = read_manifest(bundle)
    assert manifest.decoder is not None
    model = open_decoder(
        bundle / manifest.files["model"], manifest.decoder, LoadOptions(prepared_cache=cache)
    )
    return model.all_logits(IDS), model.session_source


@pytest.fixture
def fused(fused_bundles: dict[str, Path]) -> Path:
    return fused_bundles["llama"]


@pytest.mark.parametrize("layout", ["fused", "optimum"])
def test_second_load_hits_with_identical_logits_and_tokens(
    layout: str, fused_bundles: dict[str, Path], bundles: dict[str, Path], tmp_path: Path
) -> None:
    bundle = fused_bundles["qwen2"] if layout == "fused" else bundles["llama"]
    cold = edge_slm.load(bundle, cache=False)
    first = edge_slm.load(bundle, cache=tmp_path)
    second = edge_slm.load(bundle, cache=tmp_path)
    assert isinstance(cold, edge_slm.TextGenerator)
    assert isinstance(first, edge_slm.TextGenerator)
    assert isinstance(second, edge_slm.TextGenerator)
    assert cold.decoder.session_source == "prepared-session cache off"
    assert first.decoder.session_source.startswith("prepared-session cache built")
    assert second.decoder.session_source == "prepared-session cache hit"
    expected = cold.decoder.all_logits(IDS)
    assert np.array_equal(first.decoder.all_logits(IDS), expected)
    assert np.array_equal(second.decoder.all_logits(IDS), expected)  # bit-identical
    tokens = cold.generate(PROMPT, max_new_tokens=12, temperature=0.0).token_ids
    assert second.generate(PROMPT, max_new_tokens=12, temperature=0.0).token_ids == tokens
    (entry,) = _entries(tmp_path)
    assert b"prepacked_" in (entry / GRAPH_FILE).read_bytes()  # pre-packed weights reused
    record = json.loads((entry / ENTRY_FILE).read_text())
    assert record["key"]["model_sha256"] == bundle_model_sha256(bundle / "model.onnx")
    assert record["files"] == {
        name: (entry / name).stat().st_size for name in (GRAPH_FILE, DATA_FILE)
    }


@pytest.mark.parametrize("damage", ["truncate-data", "truncate-graph", "garble-graph", "json"])
def test_a_damaged_entry_is_detected_and_rebuilt(fused: Path, tmp_path: Path, damage: str) -> None:
    expected, _ = _logits(fused, False)
    _logits(fused, tmp_path)
    (entry,) = _entries(tmp_path)
    if damage == "truncate-data":
        with open(entry / DATA_FILE, "r+b") as data:
            data.truncate((entry / DATA_FILE).stat().st_size // 2)
    elif damage == "truncate-graph":
        (entry / GRAPH_FILE).write_bytes((entry / GRAPH_FILE).read_bytes()[:100])
    elif damage == "garble-graph":  # same size, so only the session creation can tell
        size = (entry / GRAPH_FILE).stat().st_size
        (entry / GRAPH_FILE).write_bytes(b"\xff" * size)
    else:
        (entry / ENTRY_FILE).write_text("{not json")
    with pytest.warns(SessionCacheWarning, match="entry refused and rebuilt"):
        logits, source = _logits(fused, tmp_path)
    assert source.startswith("prepared-session cache built"), source
    assert "the old entry was unusable" in source
    assert np.array_equal(logits, expected)
    logits, source = _logits(fused, tmp_path)
    assert source == "prepared-session cache hit"
    assert np.array_equal(logits, expected)


def test_a_different_key_misses(fused: Path, tmp_path: Path) -> None:
    model = fused / "model.onnx"
    assert open_session(model, cache=tmp_path).status == "built"
    assert open_session(model, cache=tmp_path).status == "hit"
    other = open_session(model, cache=tmp_path, model_sha256="0" * 64)
    assert other.status == "built"  # another model sha: another entry
    assert len(_entries(tmp_path)) == 1  # ... which replaced the stale one of this path
    stat = model.stat()
    try:  # the file changed under an unchanged manifest (a load with verify=False)
        os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert open_session(model, cache=tmp_path).status == "built"
    finally:
        os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_thread_count_shares_one_entry(fused: Path, tmp_path: Path) -> None:
    model = fused / "model.onnx"
    assert open_session(model, threads=1, spinning=False, cache=tmp_path).status == "built"
    assert open_session(model, threads=2, cache=tmp_path).status == "hit"


@pytest.mark.parametrize("how", ["not-a-directory", "full"])
def test_an_unwritable_cache_warns_and_loads_normally(
    fused: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    expected, _ = _logits(fused, False)
    if how == "not-a-directory":  # root may write anywhere, so a file stands in the way
        root = tmp_path / "file"
        root.write_text("")
    else:
        root = tmp_path / "cache"

        def full(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(prepared_cache, "_fsync", full)
    with pytest.warns(SessionCacheWarning, match="prepared-session cache not used") as caught:
        logits, source = _logits(fused, root)
    assert len(caught) == 1
    assert np.array_equal(logits, expected)
    assert "cache" in source and "hit" not in source
    if how == "full":
        assert [p.name for p in root.iterdir()] == [".secret"]  # the temporary folder was removed


def test_a_read_only_cache_still_serves_hits(
    fused: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _logits(fused, tmp_path)

    def read_only(*args: Any, **kwargs: Any) -> str:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(prepared_cache.tempfile, "mkdtemp", read_only)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _logits(fused, tmp_path)[1] == "prepared-session cache hit"


def test_a_lost_race_keeps_the_winners_entry(
    fused: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    winner = tmp_path / "winner"
    _logits(fused, winner)
    (_entry,) = _entries(winner)
    real_rename = os.rename

    def rename_after_the_other_process(src: Any, dst: Any) -> None:
        shutil.copytree(src, dst)  # the other process renamed its (identical) entry first
        real_rename(src, dst)

    monkeypatch.setattr(prepared_cache.os, "rename", rename_after_the_other_process)
    root = tmp_path / "raced"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, source = _logits(fused, root)
    assert source.startswith("prepared-session cache built")
    monkeypatch.undo()
    assert [p.name for p in _entries(root)] == [p.name for p in root.iterdir() if p.is_dir()]
    assert len(_entries(root)) == 1  # no temporary folder left
    assert _logits(fused, root)[1] == "prepared-session cache hit"


def test_an_entry_that_cannot_be_aligned_is_remembered(
    fused: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unknown_format(folder: Path) -> int:
        raise ValueError("unexpected pre-packed entry")

    monkeypatch.setattr(prepared_cache, "align_external_data", unknown_format)
    expected, source = _logits(fused, tmp_path)
    assert source.startswith("prepared-session cache off: cannot align")
    (entry,) = _entries(tmp_path)
    assert [p.name for p in entry.iterdir()] == [ENTRY_FILE]  # no 2x-the-model files kept
    monkeypatch.undo()
    logits, source = _logits(fused, tmp_path)  # not rebuilt on every load
    assert source.startswith("prepared-session cache off: cannot align")
    assert np.array_equal(logits, expected)


def test_environment_switches(fused: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(CACHE_ENV, "0")
    model = edge_slm.load(fused)
    assert isinstance(model, edge_slm.TextGenerator)
    assert model.decoder.session_source == "prepared-session cache off"
    assert not tmp_path.exists() or not list(tmp_path.iterdir())
    forced = edge_slm.load(fused, cache=True)  # an explicit argument beats the variable
    assert isinstance(forced, edge_slm.TextGenerator)
    assert forced.decoder.session_source.startswith("prepared-session cache built")
    monkeypatch.delenv(CACHE_ENV)
    again = edge_slm.load(fused)
    assert isinstance(again, edge_slm.TextGenerator)
    assert again.decoder.session_source == "prepared-session cache hit"
    # Build tools that open a graph directly get no cache unless they ask for one.
    manifest, _ = read_manifest(fused)
    assert manifest.decoder is not None
    direct = open_decoder(fused / "model.onnx", manifest.decoder)
    assert direct.session_source == "prepared-session cache off"


def test_default_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "edge-slm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "edge-slm"


def test_the_suite_never_writes_the_home_cache() -> None:
    assert Path(os.environ[CACHE_DIR_ENV]) != Path.home() / ".cache" / "edge-slm"


def test_misaligned_blobs_are_moved_and_their_offsets_rewritten(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    arrays = {name: rng.random(size, dtype=np.float32) for name, size in [("a", 37), ("b", 50)]}
    blob = rng.integers(0, 255, 301, dtype=np.uint8).tobytes()  # a pre-packed blob
    data = bytearray()
    initializers = []
    for name, array in arrays.items():
        offset = len(data)  # back to back: "b" starts at 148, not a multiple of 64
        data += array.tobytes()
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in [("location", DATA_FILE), ("offset", str(offset))]:
            tensor.external_data.add(key=key, value=value)
        tensor.external_data.add(key="length", value=str(array.nbytes))
        initializers.append(tensor)
    packed_at = len(data)
    data += blob
    initializers[0].external_data.add(key="prepacked_0", value=f"MatMul+1|{packed_at};301;0")
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "a"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [37])],
        initializers,
    )
    (tmp_path / GRAPH_FILE).write_bytes(helper.make_model(graph).SerializeToString())
    (tmp_path / DATA_FILE).write_bytes(bytes(data))

    assert align_external_data(tmp_path) == 2  # "b" and the pre-packed blob
    assert align_external_data(tmp_path) == 0
    model = onnx.load(str(tmp_path / GRAPH_FILE), load_external_data=False)
    moved = (tmp_path / DATA_FILE).read_bytes()
    for tensor in model.graph.initializer:
        entries = {e.key: e.value for e in tensor.external_data}
        offset, length = int(entries["offset"]), int(entries["length"])
        assert offset % 64 == 0
        assert moved[offset : offset + length] == arrays[tensor.name].tobytes()
    entries = {e.key: e.value for e in model.graph.initializer[0].external_data}
    head, packed = entries["prepacked_0"].split("|")
    offset, length, checksum = (int(x) for x in packed.split(";"))
    assert (head, length, checksum) == ("MatMul+1", 301, 0) and offset % 64 == 0
    assert moved[offset : offset + length] == blob


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="Linux only")
def test_release_file_pages_keeps_data_and_private_copies(tmp_path: Path) -> None:
    import mmap

    path = tmp_path / "blob"
    payload = np.arange(1 << 18, dtype=np.uint32).tobytes()  # 1 MiB
    path.write_bytes(payload)
    with open(path, "rb") as fh:
        clean = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # MAP_PRIVATE
    assert clean[:] == payload  # every page resident
    assert prepared_cache.release_file_pages(path) == len(payload)
    assert clean[:] == payload  # faults back in from the file
    clean[0:4] = b"edge"  # a private copy now: that mapping must not be released
    assert prepared_cache.release_file_pages(path) == 0
    assert clean[0:4] == b"edge" and clean[4:] == payload[4:]
    clean.close()


# ------------------------------------------------------------------ integrity (issue 11)


def _resign(entry: Path, record: dict[str, Any], secret: bytes | None) -> None:
    body = {k: v for k, v in record.items() if k != "mac"}
    if secret is not None:
        body["mac"] = prepared_cache._mac(secret, body)
    (entry / ENTRY_FILE).write_text(json.dumps(body))


def _edit_same_size(path: Path) -> None:
    """Change bytes of a cached data file without changing its size."""
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        chunk = fh.read(64)
        fh.seek(-len(chunk), os.SEEK_CUR)
        fh.write(bytes(b ^ 0x5A for b in chunk))


@pytest.mark.parametrize("attack", ["same-size-edit", "planted-unsigned", "planted-other-secret"])
def test_a_tampered_or_planted_entry_is_refused_never_run(
    fused: Path, fused_bundles: dict[str, Path], tmp_path: Path, attack: str
) -> None:
    expected, _ = _logits(fused, False)
    _logits(fused, tmp_path)
    (entry,) = _entries(tmp_path)
    record = json.loads((entry / ENTRY_FILE).read_text())
    if attack == "same-size-edit":  # sizes still match: only the sha256 tells
        _edit_same_size(entry / DATA_FILE)
    else:  # another model's prepared graph, with a record whose sizes and sha256 fit it
        other = tmp_path / "other"
        _logits(fused_bundles["qwen2"], other)
        (donor,) = _entries(other)
        for name in (GRAPH_FILE, DATA_FILE):
            shutil.copyfile(donor / name, entry / name)
        record["files"] = {n: (entry / n).stat().st_size for n in (GRAPH_FILE, DATA_FILE)}
        record["sha256"] = {n: sha256_file(entry / n) for n in (GRAPH_FILE, DATA_FILE)}
        _resign(entry, record, None if attack == "planted-unsigned" else os.urandom(32))
    with pytest.warns(SessionCacheWarning, match="entry refused and rebuilt"):
        logits, source = _logits(fused, tmp_path)
    assert source.startswith("prepared-session cache built"), source
    assert np.array_equal(logits, expected)  # the verified bundle's model, not the planted one
    assert _logits(fused, tmp_path)[1] == "prepared-session cache hit"


def test_entry_names_depend_on_a_private_secret(fused: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _logits(fused, a)
    _logits(fused, b)
    assert _entries(a)[0].name != _entries(b)[0].name  # a public key alone names nothing
    secret = a / prepared_cache.SECRET_FILE
    assert secret.stat().st_mode & 0o777 == 0o600
    secret.chmod(0o644)  # readable by others: not trusted, the cache is not used
    with pytest.warns(SessionCacheWarning, match="no usable secret"):
        source = _logits(fused, a)[1]
    assert "no usable secret" in source


def test_a_verified_bundle_in_a_new_folder_shares_its_entry_and_vanished_ones_are_pruned(
    fused: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = tmp_path / "boot1"
    shutil.copytree(fused, first)
    assert edge_slm.load(first, cache=cache).decoder.session_source.startswith(  # type: ignore[union-attr]
        "prepared-session cache built"
    )
    shutil.rmtree(first)
    second = tmp_path / "boot2"
    shutil.copytree(fused, second)  # unpacked again at the next boot: new path, new mtimes
    model = edge_slm.load(second, cache=cache)
    assert model.decoder.session_source == "prepared-session cache hit"  # type: ignore[union-attr]
    (entry,) = _entries(cache)
    record = json.loads((entry / ENTRY_FILE).read_text())
    assert record["bundle_paths"][0] == str(second.resolve())
    assert "model_path" not in record["key"]
    # An unverified entry of another bundle whose folder is gone is pruned at the next build.
    other = tmp_path / "gone"
    shutil.copytree(fused, other)
    open_session(other / "model.onnx", cache=cache)  # unverified: its own path-keyed entry
    assert len(_entries(cache)) == 2
    shutil.rmtree(other)
    open_session(second / "model.onnx", cache=cache, model_sha256="1" * 64)
    names = {json.loads((e / ENTRY_FILE).read_text())["bundle_paths"][0] for e in _entries(cache)}
    assert str(other.resolve()) not in names


def test_the_size_cap_evicts_least_recently_used_entries(
    fused: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fused / "model.onnx"
    open_session(model, cache=tmp_path / "c", model_sha256="1" * 64)
    open_session(
        model, cache=tmp_path / "c", model_sha256="2" * 64
    )  # same path: replaces the first
    assert len(_entries(tmp_path / "c")) == 1
    copy = tmp_path / "copy"
    shutil.copytree(fused, copy)
    monkeypatch.setenv(prepared_cache.MAX_BYTES_ENV, "1")
    open_session(copy / "model.onnx", cache=tmp_path / "c", model_sha256="3" * 64)
    (kept,) = _entries(tmp_path / "c")  # over the cap: only the entry just built stays
    assert json.loads((kept / ENTRY_FILE).read_text())["key"]["model_sha256"] == "3" * 64


# ------------------------------------------- signed stat facts: a verified hit without hashing


class _Hashed:
    """Counts the files read in full (hash_record.hash_file, used by the bundle check and
    the prepared-session cache alike, and sha256_file, used without a record)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        real_hash, real_sha = hash_record.hash_file, bundle_files_module.sha256_file

        def counted(path: Path) -> tuple[str, list[int] | None]:
            self.names.append(Path(path).name)
            return real_hash(path)

        def counted_sha(path: Path) -> str:
            self.names.append(Path(path).name)
            return real_sha(path)

        monkeypatch.setattr(hash_record, "hash_file", counted)
        monkeypatch.setattr(bundle_files_module, "sha256_file", counted_sha)

    def take(self) -> list[str]:
        names, self.names = sorted(self.names), []
        return names


def _load(bundle: Path, cache: Path, **options: Any) -> tuple[np.ndarray, str]:
    model = edge_slm.load(bundle, options=LoadOptions(prepared_cache=cache, **options))
    assert isinstance(model, edge_slm.TextGenerator)
    return model.decoder.all_logits(IDS), model.decoder.session_source


def _same_size_edit_keeping_mtime(path: Path) -> None:
    """Flip bytes without changing the size, then set the mtime back (os.utime)."""
    before = path.stat()
    _edit_same_size(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    assert after.st_ctime_ns != before.st_ctime_ns  # the one fact no process can set back


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Record files as soon as they are hashed (the 2 s racy-file margin would make every
    test wait), on this test's filesystem whatever it is."""
    monkeypatch.setattr(hash_record, "RACY_NS", 0)
    if not hash_record.trusted_filesystem(tmp_path.stat().st_dev):
        pytest.skip(f"{tmp_path} is not on a filesystem whose ctime the kernel keeps")


@pytest.fixture
def own_copy(fused: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(fused, copy)
    return copy


def _bundle_files(bundle: Path) -> list[str]:
    return sorted(read_manifest(bundle)[1])


def test_a_hit_whose_stat_facts_match_reads_no_file_again(
    own_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settled: None
) -> None:
    hashed = _Hashed(monkeypatch)
    cache = tmp_path / "cache"
    expected, source = _load(own_copy, cache)
    assert source.startswith("prepared-session cache built")
    assert hashed.take() == sorted([*_bundle_files(own_copy), DATA_FILE, GRAPH_FILE])
    logits, source = _load(own_copy, cache)
    assert source == "prepared-session cache hit"
    assert hashed.take() == []  # every stat fact matched its signed record
    assert np.array_equal(logits, expected)
    _load(own_copy, cache, rehash=True)  # the option that hashes everything again
    assert hashed.take() == sorted([*_bundle_files(own_copy), DATA_FILE, GRAPH_FILE])
    monkeypatch.setenv(prepared_cache.REHASH_ENV, "1")
    _load(own_copy, cache)
    assert hashed.take() == sorted([*_bundle_files(own_copy), DATA_FILE, GRAPH_FILE])


def test_a_same_size_edit_with_its_mtime_restored_is_caught_in_the_cache(
    own_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settled: None
) -> None:
    cache = tmp_path / "cache"
    expected, _ = _load(own_copy, cache)
    (entry,) = _entries(cache)
    assert json.loads((entry / ENTRY_FILE).read_text())["stat"][DATA_FILE] is not None
    _same_size_edit_keeping_mtime(entry / DATA_FILE)
    hashed = _Hashed(monkeypatch)
    with pytest.warns(SessionCacheWarning, match=f"{DATA_FILE} has sha256"):
        logits, source = _load(own_copy, cache)
    assert source.startswith("prepared-session cache built")
    assert DATA_FILE in hashed.take()
    assert np.array_equal(logits, expected)


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json"])
def test_a_same_size_edit_with_its_mtime_restored_is_caught_in_the_bundle(
    own_copy: Path, tmp_path: Path, settled: None, name: str
) -> None:
    cache = tmp_path / "cache"
    _load(own_copy, cache)
    recorded = json.loads((cache / prepared_cache.BUNDLE_RECORD).read_text())["files"]
    assert str((own_copy / name).resolve()) in recorded
    _same_size_edit_keeping_mtime(own_copy / name)
    with pytest.raises(edge_slm.ChecksumError, match=name):
        edge_slm.load(own_copy, cache=cache)


@pytest.mark.parametrize("forgery", ["unsigned", "other-secret"])
def test_a_planted_bundle_record_is_ignored(
    own_copy: Path, tmp_path: Path, settled: None, forgery: str
) -> None:
    """A record claiming the edited file's new stat facts carry the manifest's sha256."""
    cache = tmp_path / "cache"
    _load(own_copy, cache)
    path = own_copy / "tokenizer.json"
    _same_size_edit_keeping_mtime(path)
    record_path = cache / prepared_cache.BUNDLE_RECORD
    files = json.loads(record_path.read_text())["files"]
    expected_sha = read_manifest(own_copy)[1]["tokenizer.json"]
    files[str(path.resolve())] = [*hash_record.stat_facts(path.stat()), expected_sha]
    body: dict[str, Any] = {"files": files}
    if forgery == "other-secret":
        body["mac"] = hash_record.sign(os.urandom(32), body)
    record_path.write_text(json.dumps(body))
    with pytest.raises(edge_slm.ChecksumError, match="tokenizer.json"):
        edge_slm.load(own_copy, cache=cache)


def test_a_moved_bundle_is_hashed_again(
    own_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settled: None
) -> None:
    cache = tmp_path / "cache"
    _load(own_copy, cache)
    moved = tmp_path / "moved"
    own_copy.rename(moved)  # the files keep their inodes and ctimes; their paths change
    hashed = _Hashed(monkeypatch)
    _, source = _load(moved, cache)
    assert source == "prepared-session cache hit"
    assert hashed.take() == _bundle_files(moved)  # the bundle re-verified, the entry not
    _load(moved, cache)
    assert hashed.take() == []


def test_a_copied_entry_is_hashed_and_a_copied_foreign_one_refused(
    own_copy: Path,
    fused_bundles: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    settled: None,
) -> None:
    cache = tmp_path / "cache"
    expected, _ = _load(own_copy, cache)
    (entry,) = _entries(cache)
    # The same bytes copied over with their times (cp -p): new inodes, so hashed again.
    for name in (GRAPH_FILE, DATA_FILE):
        shutil.copy2(entry / name, tmp_path / name)
        os.replace(tmp_path / name, entry / name)
    hashed = _Hashed(monkeypatch)
    assert _load(own_copy, cache)[1] == "prepared-session cache hit"
    assert hashed.take() == sorted([DATA_FILE, GRAPH_FILE])
    assert _load(own_copy, cache)[1] == "prepared-session cache hit"
    assert hashed.take() == []  # the record was refreshed after the full check
    # A whole entry copied from another cache (its own signed record and stat facts).
    other = tmp_path / "other"
    _load(fused_bundles["qwen2"], other)
    (donor,) = _entries(other)
    shutil.rmtree(entry)
    shutil.copytree(donor, entry)
    logits, source = _load(own_copy, cache)
    assert source.startswith("prepared-session cache built")
    assert source.endswith("the old entry was unusable: key mismatch")
    assert np.array_equal(logits, expected)


def test_racy_and_untrusted_files_are_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    digest, facts = hash_record.hash_file(path)
    assert digest == sha256_file(path)
    assert facts is None  # written just now: a write in the same tick would go unseen
    monkeypatch.setattr(hash_record, "RACY_NS", 0)
    if hash_record.trusted_filesystem(path.stat().st_dev):
        _, facts = hash_record.hash_file(path)
        assert facts == hash_record.stat_facts(path.stat())
        assert hash_record.unchanged(path, facts)
    monkeypatch.setattr(hash_record, "filesystem_type", lambda device: "vfat")
    assert hash_record.hash_file(path)[1] is None  # FAT: any timestamp can be written
    assert not hash_record.unchanged(path, hash_record.stat_facts(path.stat()))


@pytest.mark.skipif(not Path("/proc/self/mountinfo").exists(), reason="Linux only")
def test_filesystem_type_reads_mountinfo(tmp_path: Path) -> None:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    kinds = {line.split(" - ", 1)[1].split()[0] for line in lines}
    assert hash_record.filesystem_type(tmp_path.stat().st_dev) in kinds
    assert hash_record.filesystem_type(os.makedev(4095, 4095)) == ""
