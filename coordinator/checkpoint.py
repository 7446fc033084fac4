"""Durable checkpoints: a small msgpack manifest plus raw tensor files, never pickle.

A checkpoint is any nested structure of dicts, lists, numbers, strings and tensors. Tensors are stored as raw
bytes in their own files under ``tensors/`` and referenced from the manifest by file name; a tensor object that
was already written (the same Python object: the federation logic never edits a tensor in place) is not written
again, so checkpointing after every update costs one write of what changed (the FedBuff buffer, or the new
model), not of the whole history.

Order of a save: new tensor files (fsync) -> manifest to a temp file (fsync) -> atomic rename -> fsync the
directory -> remove tensor files no manifest mentions. A crash at any point leaves the previous checkpoint or the
new one, never a mix.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import msgpack
import torch

from schemas.tensors import DTYPE_NAMES, DTYPES, raw_view

MANIFEST = "checkpoint.msgpack"
TENSOR_DIR = "tensors"
_TENSOR_TAG = "__tensor__"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read back."""


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


class CheckpointStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tensor_dir = directory / TENSOR_DIR
        self.tensor_dir.mkdir(parents=True, exist_ok=True)
        self._written: dict[int, tuple[torch.Tensor, str]] = {}  # id(tensor) -> (tensor kept alive, file name)
        existing = [int(path.stem) for path in self.tensor_dir.glob("*.bin") if path.stem.isdigit()]
        self._next_file = max(existing, default=0) + 1

    @property
    def exists(self) -> bool:
        return (self.directory / MANIFEST).exists()

    def save(self, state: dict[str, Any]) -> None:
        referenced: dict[int, tuple[torch.Tensor, str]] = {}
        new_files: list[Path] = []
        manifest = self._flatten(state, referenced, new_files)
        if new_files:
            _fsync_directory(self.tensor_dir)
        write_file_durably(self.directory / MANIFEST, msgpack.packb(manifest, use_bin_type=True))
        keep = {name for _, name in referenced.values()}
        for stale in set(name for _, name in self._written.values()) - keep:
            (self.tensor_dir / stale).unlink(missing_ok=True)
        self._written = referenced

    def _flatten(self, value: Any, referenced: dict[int, tuple[torch.Tensor, str]], new_files: list[Path]) -> Any:
        if isinstance(value, torch.Tensor):
            known = self._written.get(id(value)) or referenced.get(id(value))
            if known is not None and known[0] is value:
                name = known[1]
            else:
                name = f"{self._next_file:012d}.bin"
                self._next_file += 1
                tensor = value.detach().cpu().contiguous()
                path = self.tensor_dir / name
                with path.open("wb") as handle:
                    handle.write(raw_view(tensor))
                    handle.flush()
                    os.fsync(handle.fileno())
                new_files.append(path)
            referenced[id(value)] = (value, name)
            return {_TENSOR_TAG: name, "dtype": DTYPE_NAMES[value.dtype], "shape": list(value.shape)}
        if isinstance(value, dict):
            return {key: self._flatten(item, referenced, new_files) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._flatten(item, referenced, new_files) for item in value]
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
        referenced: dict[int, tuple[torch.Tensor, str]] = {}
        state = self._inflate(manifest, referenced)
        self._written = referenced
        keep = {name for _, name in referenced.values()}
        for orphan in self.tensor_dir.glob("*.bin"):  # written by a save that crashed before its manifest
            if orphan.name not in keep:
                orphan.unlink()
        return state

    def _inflate(self, value: Any, referenced: dict[int, tuple[torch.Tensor, str]]) -> Any:
        if isinstance(value, dict) and _TENSOR_TAG in value:
            name, dtype, shape = value[_TENSOR_TAG], DTYPES[value["dtype"]], value["shape"]
            data = bytearray((self.tensor_dir / name).read_bytes())
            expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if len(data) != expected:
                raise CheckpointError(f"tensor file {name} has {len(data)} bytes, expected {expected}")
            tensor = torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)
            referenced[id(tensor)] = (tensor, name)
            return tensor
        if isinstance(value, dict):
            return {key: self._inflate(item, referenced) for key, item in value.items()}
        if isinstance(value, list):
            return [self._inflate(item, referenced) for item in value]
        return value
