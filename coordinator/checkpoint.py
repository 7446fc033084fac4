"""Durable checkpoints: a small msgpack manifest plus raw tensor files, never pickle.

A checkpoint is any nested structure of dicts, lists, numbers, strings and tensors. Tensors are stored as raw
bytes under ``tensors/`` and referenced from the manifest by file and offset; a tensor object that was already
written (the same Python object: a tensor handed to a checkpoint is never edited in place) is not written again, so
checkpointing after every update costs one write of what changed (the FedBuff buffer, or the new model), not of
the whole history. All tensors new in one save go into one file, so a save costs one data fsync however many
tensors the model has.

Order of a save: the new tensor file (fsync) -> manifest to a temp file (fsync) -> atomic rename -> fsync the
directory -> remove tensor files no manifest entry points into any more. A crash at any point leaves the previous
checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

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


class CheckpointStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tensor_dir = directory / TENSOR_DIR
        self.tensor_dir.mkdir(parents=True, exist_ok=True)
        # id(tensor) -> (the tensor, kept alive so its id stays unique; where its bytes are)
        self._written: dict[int, tuple[torch.Tensor, Location]] = {}
        existing = [int(path.stem) for path in self.tensor_dir.glob("*.bin") if path.stem.isdigit()]
        self._next_file = max(existing, default=0) + 1

    @property
    def exists(self) -> bool:
        return (self.directory / MANIFEST).exists()

    def save(self, state: dict[str, Any]) -> None:
        referenced: dict[int, tuple[torch.Tensor, Location]] = {}
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
        keep = {location[0] for _, location in referenced.values()}
        for stale in {location[0] for _, location in self._written.values()} - keep:
            (self.tensor_dir / stale).unlink(missing_ok=True)
        self._written = referenced

    def _flatten(
        self,
        value: Any,
        referenced: dict[int, tuple[torch.Tensor, Location]],
        pending: list[torch.Tensor],
        new_file: str,
    ) -> Any:
        if isinstance(value, torch.Tensor):
            known = self._written.get(id(value)) or referenced.get(id(value))
            if known is not None and known[0] is value:
                location = known[1]
            else:
                tensor = value.detach().cpu().contiguous()
                offset = sum(item.numel() * item.element_size() for item in pending)
                pending.append(tensor)
                location = (new_file, offset)
            referenced[id(value)] = (value, location)
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
        referenced: dict[int, tuple[torch.Tensor, Location]] = {}
        files: dict[str, bytes] = {}
        state = self._inflate(manifest, referenced, files)
        self._written = referenced
        keep = {location[0] for _, location in referenced.values()}
        for orphan in self.tensor_dir.glob("*.bin"):  # written by a save that crashed before its manifest
            if orphan.name not in keep:
                orphan.unlink()
        return state

    def _inflate(
        self, value: Any, referenced: dict[int, tuple[torch.Tensor, Location]], files: dict[str, bytes]
    ) -> Any:
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
            referenced[id(tensor)] = (tensor, (name, offset))
            return tensor
        if isinstance(value, dict):
            return {key: self._inflate(item, referenced, files) for key, item in value.items()}
        if isinstance(value, list):
            return [self._inflate(item, referenced, files) for item in value]
        return value
