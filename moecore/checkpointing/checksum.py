"""CRC32 checksums of checkpoint files, written at save and verified at load.

Each shard file ``F`` gets a sidecar ``F.crc32`` holding ``{"crc32": int, "bytes": int}`` of
the file's bytes. The CRC is computed while ``torch.save`` streams the file out
(:class:`ChecksumWriter`), so saving reads nothing back; loading streams the file once more
(zlib's CRC32 runs at several GB/s, above most disks' read rate). The sidecar is written
(temp file + rename) after the shard file is fsynced, so its presence also marks the shard as
completely written (the ``--async-save`` abort path relies on that).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import BinaryIO

SUFFIX = ".crc32"
_CHUNK = 16 << 20


class ChecksumWriter:
    """A write-only file wrapper that keeps the CRC32 and length of everything written."""

    def __init__(self, f: BinaryIO):
        self.f, self.crc32, self.nbytes = f, 0, 0

    def write(self, data) -> int:
        self.crc32 = zlib.crc32(data, self.crc32)
        self.nbytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def record(self) -> str:
        """The sidecar's text for what was written."""
        return json.dumps({"crc32": self.crc32, "bytes": self.nbytes})


def sidecar(path: str) -> str:
    """The checksum file of the checkpoint file ``path``."""
    return path + SUFFIX


def file_crc32(path: str) -> tuple[int, int]:
    """(CRC32, length) of the file ``path``, read in 16 MiB chunks."""
    crc, n = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc, n = zlib.crc32(chunk, crc), n + len(chunk)
    return crc, n


def mismatch(path: str) -> str | None:
    """Why ``path`` does not match its sidecar (None when it does); the sidecar must exist
    (:func:`is_complete`)."""
    with open(sidecar(path)) as f:
        text = f.read()
    try:
        want = json.loads(text)
        want_crc, want_bytes = int(want["crc32"]), int(want["bytes"])
    except (ValueError, KeyError, TypeError):
        return f"its checksum file {sidecar(path)} is unreadable ({text[:40]!r})"
    crc, nbytes = file_crc32(path)
    if nbytes != want_bytes:
        return f"it has {nbytes} bytes but was saved with {want_bytes}"
    if crc != want_crc:
        return f"its CRC32 is {crc:08x} but was saved as {want_crc:08x}"
    return None


def is_complete(path: str) -> bool:
    """True when ``path`` was completely written (its sidecar exists)."""
    return os.path.isfile(sidecar(path))
