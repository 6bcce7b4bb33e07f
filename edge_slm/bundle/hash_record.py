"""Signed records of files already hashed, so a load re-hashes only what may have changed.

Hashing every file at every load is what ``verify=True`` promises, and it is most of a
warm load (SmolLM2-135M int4: the 85 MB bundle plus a 237 MiB prepared-session entry).
A record written when a file was hashed keeps its sha256 with its **stat facts**: size,
mtime, ctime, inode and device (:func:`stat_facts`). A later load whose stat of the file
gives the same facts takes the recorded sha256 instead of reading the file; any
difference, a file not recorded, or a record not signed by the cache's secret, hashes
the file in full.

Why the facts stand in for the content: every write to a file, and every ``chmod``,
``chown``, ``rename``, ``link`` and ``utime``, sets its ctime to the current time, and no
system call lets a process set ctime back. An edit that keeps the size and restores the
mtime (``os.utime``) still changes the ctime; a file replaced by another has another
inode (or, reusing the inode, a new ctime); a bundle moved or unpacked elsewhere is
under another path, which is not in the record.

What stays trusted (documented in ``docs/reliability.md``): root (which can set the
clock back before an edit, or write the block device underneath the filesystem); the
record's HMAC secret (whoever reads it can sign any record: the same account, which
could as well edit the bundle or edge_slm itself); and the storage itself: a bit that
flips on the medium changes no stat fact, so silent corruption is caught only by a full
hash (``LoadOptions(rehash=True)`` or ``EDGE_SLM_REHASH=1``).

Two guards keep the facts honest:

* **Kernel-kept ctime only** (:func:`trusted_filesystem`): facts are recorded only for
  files on a local POSIX filesystem (ext2/3/4, xfs, btrfs, f2fs, tmpfs, ...), found in
  ``/proc/self/mountinfo`` by device number. On FAT/exFAT/NTFS (a USB stick edited on
  another computer, which can set any timestamp), network and FUSE filesystems, a
  device no mount line names (overlay layers in containers, btrfs subvolumes), or
  without ``/proc``, every load hashes in full.
* **Racy files** (as git's index does): a file whose ctime is less than
  :data:`RACY_NS` before the moment it was hashed is not recorded, since a write in the
  same timestamp tick right after the hash would leave every fact unchanged. It is
  hashed again at the next load and recorded then. The facts must also be the same
  before and after hashing (a file written while it was read is not recorded).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

RACY_NS = 2_000_000_000
"""A file changed this recently when hashed is not recorded (coarsest timestamp tick of
the trusted filesystems: 1 s on ext2/3 and small-inode ext4, rounded up)."""

TRUSTED_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs", "zfs", "bcachefs", "jfs"}
)
"""Local filesystems whose ctime only the kernel sets (see the module docstring)."""

_HASH_CHUNK = 1 << 22  # 4 MiB
MAX_RECORDED_FILES = 4096
"""Files one bundle record keeps (the most recently hashed); older ones are re-hashed."""

Facts = list[int]
"""``[size, mtime_ns, ctime_ns, inode, device]``."""


def stat_facts(stat: os.stat_result) -> Facts:
    """The facts of a stat that any change of the file's content or identity changes."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def filesystem_type(device: int) -> str:
    """The type of the filesystem mounted from ``device`` (``/proc/self/mountinfo``), or
    ``""`` when unknown (no ``/proc``, a device no mount line names). Read at each call,
    not remembered: a USB stick may be replaced by another filesystem while a kiosk runs."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[2] == wanted and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except (OSError, IndexError):
        pass
    return ""


def trusted_filesystem(device: int) -> bool:
    """True when files on ``device`` have a ctime only the kernel sets."""
    return filesystem_type(device) in TRUSTED_FILESYSTEMS


def hash_file(path: Path) -> tuple[str, Facts | None]:
    """``(sha256 hex, facts worth recording or None)`` of one file, read in 4 MiB chunks.

    The facts are None when the file changed while it was read, changed within
    :data:`RACY_NS` of the hash, or lives on an untrusted filesystem.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        before = os.fstat(fh.fileno())
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
        after = os.fstat(fh.fileno())
    facts = stat_facts(after)
    settled = time.time_ns() - after.st_ctime_ns >= RACY_NS
    keep = facts == stat_facts(before) and settled and trusted_filesystem(after.st_dev)
    return digest.hexdigest(), facts if keep else None


def unchanged(path: Path, recorded: Any) -> bool:
    """True when ``path`` (not followed if a symlink) still has the ``recorded`` facts."""
    if not isinstance(recorded, list) or len(recorded) != 5:
        return False
    try:
        stat = path.lstat()
    except OSError:
        return False
    return stat_facts(stat) == recorded and trusted_filesystem(stat.st_dev)


def sign(secret: bytes, body: Any) -> str:
    """HMAC-SHA256 (hex) of ``body`` as canonical JSON."""
    text = json.dumps(body, sort_keys=True).encode()
    return hmac.new(secret, text, hashlib.sha256).hexdigest()


def signed_body(secret: bytes, record: Any) -> dict[str, Any] | None:
    """``record`` without its ``mac`` when the mac is this secret's, else None."""
    if not isinstance(record, dict):
        return None
    body = {k: v for k, v in record.items() if k != "mac"}
    mac = record.get("mac")
    if not isinstance(mac, str) or not hmac.compare_digest(mac, sign(secret, body)):
        return None
    return body


class FileHashes:
    """sha256 of files by resolved path, taken from a signed record when their stat facts
    match (see the module docstring), else hashed and recorded.

    One JSON file (``path``) signed with ``secret``; :meth:`save` writes what was hashed
    (best effort: an unwritable cache only means hashing again next time). Safe for one
    thread; separate processes may race, and the loser's additions are hashed again.
    """

    def __init__(self, path: Path, secret: bytes) -> None:
        self.path = path
        self._secret = secret
        self._recorded = self._read()
        self._new: dict[str, list[Any]] = {}
        self.hashed: list[str] = []
        """Paths read in full by this object (tests and ``edge-slm bench`` count them)."""

    def _read(self) -> dict[str, list[Any]]:
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        body = signed_body(self._secret, record)  # planted or edited: ignored, all hashed
        files = body.get("files") if body is not None else None
        return files if isinstance(files, dict) else {}

    def sha256(self, path: Path, expected: str | None = None) -> str:
        """The sha256 of ``path`` (already resolved): recorded, or hashed now. A recorded
        sha256 other than ``expected`` is hashed again: a mismatch is never reported
        from a record alone."""
        entry = self._recorded.get(str(path))
        if isinstance(entry, list) and len(entry) == 6:
            facts, digest = entry[:5], entry[5]
            if isinstance(digest, str) and expected in (None, digest) and unchanged(path, facts):
                return digest
        return self.rehash(path)

    def rehash(self, path: Path) -> str:
        """The sha256 of ``path`` read in full (recorded for next time when settled)."""
        digest, facts = hash_file(path)
        self.hashed.append(str(path))
        self._recorded.pop(str(path), None)
        if facts is not None:
            self._new[str(path)] = [*facts, digest]
        return digest

    def save(self) -> None:
        """Write the record with what was hashed (merged with the file's current
        content, so other processes' additions survive); nothing when nothing new."""
        if not self._new:
            return
        with contextlib.suppress(OSError):
            files = {p: e for p, e in self._read().items() if p not in self._new}
            files.update(self._new)
            kept = [p for p in files if os.path.exists(p)][-MAX_RECORDED_FILES:]
            body = {"files": {p: files[p] for p in kept}}
            text = json.dumps({**body, "mac": sign(self._secret, body)}) + "\n"
            fd, tmp = tempfile.mkstemp(prefix=f"{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    out.write(text)
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._new = {}
