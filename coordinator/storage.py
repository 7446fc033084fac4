"""The state dir as storage: writes that fail by meaning, directories made durable, and the free space a commit needs.

Classify by meaning, not by type (STYLE rule 23): an ``OSError`` from a write of the checkpoint, the audit log or
the results means "nothing of this is durable", which is a ``StorageError``, never "the connection dropped". The
transport treats ``OSError`` from a socket as a lost connection and reconnects in the same process; a storage
error must instead stop the process, so that no ack follows and the next start rebuilds its memory from the disk
(``coordinator.commit``). ``storage_writes`` is the boundary that translates one into the other.

A file's data is durable after its fsync; its *name* (a create, a rename) only after the directory holding it is
fsynced too. ``fsync_directory`` and ``make_directory`` do that for the state dir's directories.

Disk space: ``DiskSpace`` tells whether the state dir has room for a commit (its checkpoint files, audit records
and a reserve) before the commit starts, so that a full disk defers a commit (the batch stays unacked, the
broker keeps the updates) instead of failing it halfway.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coordinator.errors import StorageError

log = logging.getLogger(__name__)

BLOCK_BYTES = 4096  # what one more file or directory entry may cost beyond its bytes (filesystem block rounding)


@contextmanager
def storage_writes(what: str) -> Iterator[None]:
    """An ``OSError`` inside becomes a ``StorageError`` naming ``what`` was being written."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"could not write {what}: {exc}") from exc


def fsync_directory(path: Path) -> None:
    """Make the names in ``path`` (created, renamed, removed files) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_directory(path: Path) -> None:
    """``mkdir -p``, each directory it creates made durable in its parent."""
    missing = [directory for directory in (path, *path.parents) if not directory.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_directory(created.parent)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


@dataclass
class DiskSpace:
    """Whether the state dir has room for a commit, keeping ``reserve_bytes`` free for everything else."""

    directory: Path
    reserve_bytes: int
    free: Callable[[Path], int] = free_bytes

    def free_now(self) -> float:
        """Free bytes now, NaN when the filesystem cannot be asked (for the scrape-time gauge)."""
        try:
            return float(self.free(self.directory))
        except OSError:
            return float("nan")

    def shortfall(self, needed_bytes: int) -> int:
        """How many bytes are missing for a commit needing ``needed_bytes`` (0: it may start)."""
        return max(0, needed_bytes + self.reserve_bytes - self.free(self.directory))
