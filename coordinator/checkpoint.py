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

Order of a save: the new tensor file (fsync) -> manifest to a temp file (fsync) -> atomic rename -> fsync the
directory -> remove tensor files no manifest entry points into any more. A crash at any point leaves the previous
checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import torch

from coordinator.errors import CheckpointError
from schemas.tensors import DTYPE_NAMES, DTYPES, raw_view

MANIFEST = "checkpoint.msgpack"
TENSOR_DIR = "tensors"
_TENSOR_TAG = "__tensor__"


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_file_durably(path: Path, data: bytes | memoryview) -> None:
    """Write to a temp file, fsync, rename over ``path``, fsync the directory."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


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


class CheckpointStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tensor_dir = directory / TENSOR_DIR
        self.tensor_dir.mkdir(parents=True, exist_ok=True)
        # id(tensor) -> what was written for it (where, and how often torch had seen it edited then)
        self._written: dict[int, _Written] = {}
        existing = [int(path.stem) for path in self.tensor_dir.glob("*.bin") if path.stem.isdigit()]
        self._next_file = max(existing, default=0) + 1

    @property
    def exists(self) -> bool:
        return (self.directory / MANIFEST).exists()

    def save(self, state: dict[str, Any]) -> None:
        referenced: dict[int, _Written] = {}
        pending: list[torch.Tensor] = []
        new_file = f"{self._next_file:012d}.bin"
        manifest = self._flatten(state, referenced, pending, new_file)
        if pending:
            self._next_file += 1
            with (self.tensor_dir / new_file).open("wb") as handle:
                for tensor in pending:
                    handle.write(raw_view(tensor))
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_directory(self.tensor_dir)
        write_file_durably(self.directory / MANIFEST, msgpack.packb(manifest, use_bin_type=True))
        keep = {written.location[0] for written in referenced.values()}
        for stale in {written.location[0] for written in self._written.values()} - keep:
            (self.tensor_dir / stale).unlink(missing_ok=True)
        self._written = referenced

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
