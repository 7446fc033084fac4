"""Durable checkpoints: a small msgpack manifest plus raw tensor files, never pickle.

A checkpoint is any nested structure of dicts, lists, numbers, strings and tensors. Tensors are stored as raw
bytes under ``tensors/`` and referenced from the manifest by file and offset; a tensor that was already written is
not written again, so checkpointing after every update costs one write of what changed (the FedBuff buffer, or the
new model), not of the whole history (1M parameters with ten base versions kept: 13 ms a save instead of 48 ms).
"Already written" means the same Python object *and* the same ``tensor._version``, torch's count of in-place edits
(shared with its views): a tensor edited in place since (``add_``, an optimiser step) is written again. Edits torch
does not count (through ``.data`` or a NumPy view) are not seen; the federation logic makes new tensors instead.
A torch without ``_version`` makes every save write everything (correct, slower), and a unit test fails loudly.
All tensors new in one save go into one file, so a save costs one data fsync however many tensors the model has.

Order of a save: the new tensor file (fsync, then fsync ``tensors/`` for its name) -> manifest to a temp file
(fsync) -> atomic rename -> fsync the directory -> remove tensor files no manifest entry points into any more. A
crash at any point leaves the previous checkpoint or the new one, never a mix. A save is prepared first
(``prepare``: what it will write, ``bytes_needed``) and written second (``write``), so the commit can see whether the
disk has room before it starts; any ``OSError`` of a write is raised as a ``StorageError``.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import torch

from coordinator.errors import CheckpointError
from coordinator.storage import BLOCK_BYTES, fsync_directory, make_directory, storage_writes
from schemas.tensors import DTYPE_NAMES, DTYPES, raw_view

MANIFEST = "checkpoint.msgpack"
TENSOR_DIR = "tensors"
_TENSOR_TAG = "__tensor__"


def write_file_durably(path: Path, data: bytes | memoryview) -> None:
    """Write to a temp file, fsync, rename over ``path``, fsync the directory; a failure is a ``StorageError``."""
    with storage_writes(str(path)):
        temporary = path.with_name(f".{path.name}.tmp")
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)


Location = tuple[str, int]  # tensor file name, byte offset in it


class _Written(NamedTuple):
    tensor: torch.Tensor  # kept alive so its id() stays unique
    location: Location
    edits: int | None  # tensor._version when its bytes were taken


def _edit_count(tensor: torch.Tensor) -> int | None:
    """torch's count of in-place edits of this tensor's memory, or None when this torch does not expose it."""
    version = getattr(tensor, "_version", None)
    return version if isinstance(version, int) else None


def _unchanged(known: _Written, tensor: torch.Tensor) -> bool:
    """The same object, not edited in place since its bytes were written."""
    return known.tensor is tensor and known.edits is not None and known.edits == _edit_count(tensor)


class PreparedSave(NamedTuple):
    """A save worked out but not written: the manifest's bytes and the tensors new in it."""

    manifest: bytes
    pending: list[torch.Tensor]
    new_file: str
    referenced: dict[int, _Written]

    @property
    def bytes_needed(self) -> int:
        """Disk space the save takes before it frees anything: its tensor file, the manifest's temp file (the old
        manifest is still there) and a block of rounding for each."""
        tensor_bytes = sum(tensor.numel() * tensor.element_size() for tensor in self.pending)
        return tensor_bytes + len(self.manifest) + 2 * BLOCK_BYTES


class CheckpointStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tensor_dir = directory / TENSOR_DIR
        with storage_writes(str(self.tensor_dir)):
            make_directory(self.tensor_dir)
        self.size_bytes = 0  # on disk after the last save or load: manifest + the tensor files it points into
        # id(tensor) -> what was written for it (where, and how often torch had seen it edited then)
        self._written: dict[int, _Written] = {}
        existing = [int(path.stem) for path in self.tensor_dir.glob("*.bin") if path.stem.isdigit()]
        self._next_file = max(existing, default=0) + 1

    @property
    def exists(self) -> bool:
        return (self.directory / MANIFEST).exists()

    def save(self, state: dict[str, Any]) -> None:
        self.write(self.prepare(state))

    def prepare(self, state: dict[str, Any]) -> PreparedSave:
        """Work out what saving ``state`` writes, without writing (nor changing this store)."""
        referenced: dict[int, _Written] = {}
        pending: list[torch.Tensor] = []
        new_file = f"{self._next_file:012d}.bin"
        manifest = self._flatten(state, referenced, pending, new_file)
        return PreparedSave(msgpack.packb(manifest, use_bin_type=True), pending, new_file, referenced)

    def write(self, prepared: PreparedSave) -> None:
        """Write a prepared save durably (see the module's order); an ``OSError`` is raised as ``StorageError``."""
        with storage_writes(f"the checkpoint in {self.directory}"):
            if prepared.pending:
                self._next_file += 1
                with (self.tensor_dir / prepared.new_file).open("wb") as handle:
                    for tensor in prepared.pending:
                        handle.write(raw_view(tensor))
                    handle.flush()
                    os.fsync(handle.fileno())
                fsync_directory(self.tensor_dir)
        write_file_durably(self.directory / MANIFEST, prepared.manifest)
        keep = {written.location[0] for written in prepared.referenced.values()}
        for stale in {written.location[0] for written in self._written.values()} - keep:
            (self.tensor_dir / stale).unlink(missing_ok=True)  # not fsynced: an orphan is removed by the next load
        self._written = prepared.referenced
        self.size_bytes = len(prepared.manifest) + self._tensor_bytes(keep)

    def _tensor_bytes(self, names: set[str]) -> int:
        total = 0
        for name in names:
            with contextlib.suppress(OSError):  # only a figure for a gauge
                total += (self.tensor_dir / name).stat().st_size
        return total

    def _flatten(
        self,
        value: Any,
        referenced: dict[int, _Written],
        pending: list[torch.Tensor],
        new_file: str,
    ) -> Any:
        if isinstance(value, torch.Tensor):
            known = referenced.get(id(value)) or self._written.get(id(value))
            if known is not None and _unchanged(known, value):
                location = known.location
            else:
                tensor = value.detach().cpu().contiguous()
                offset = sum(item.numel() * item.element_size() for item in pending)
                pending.append(tensor)
                location = (new_file, offset)
            referenced[id(value)] = _Written(value, location, _edit_count(value))
            return {
                _TENSOR_TAG: location[0],
                "offset": location[1],
                "dtype": DTYPE_NAMES[value.dtype],
                "shape": list(value.shape),
            }
        if isinstance(value, dict):
            return {key: self._flatten(item, referenced, pending, new_file) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._flatten(item, referenced, pending, new_file) for item in value]
        return value

    def load(self) -> dict[str, Any] | None:
        """The last saved state, or None when there is no checkpoint yet."""
        path = self.directory / MANIFEST
        if not path.exists():
            return None
        try:
            manifest = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
        except Exception as exc:
            raise CheckpointError(f"{path} is unreadable: {exc}") from exc
        referenced: dict[int, _Written] = {}
        files: dict[str, bytes] = {}
        state = self._inflate(manifest, referenced, files)
        self._written = referenced
        keep = {written.location[0] for written in referenced.values()}
        for orphan in self.tensor_dir.glob("*.bin"):  # written by a save that crashed before its manifest
            if orphan.name not in keep:
                orphan.unlink()
        self.size_bytes = path.stat().st_size + self._tensor_bytes(keep)
        return state

    def _inflate(self, value: Any, referenced: dict[int, _Written], files: dict[str, bytes]) -> Any:
        if isinstance(value, dict) and _TENSOR_TAG in value:
            name, offset = value[_TENSOR_TAG], int(value.get("offset", 0))
            dtype, shape = DTYPES[value["dtype"]], value["shape"]
            if name not in files:
                files[name] = (self.tensor_dir / name).read_bytes()
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            data = bytearray(files[name][offset : offset + size])
            if len(data) != size:
                raise CheckpointError(f"tensor file {name} ends before the {size} bytes at offset {offset}")
            tensor = torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)
            referenced[id(tensor)] = _Written(tensor, (name, offset), _edit_count(tensor))
            return tensor
        if isinstance(value, dict):
            return {key: self._inflate(item, referenced, files) for key, item in value.items()}
        if isinstance(value, list):
            return [self._inflate(item, referenced, files) for item in value]
        return value
