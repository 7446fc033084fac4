"""The final model on disk as a safetensors file (the ``safetensors`` package): any safetensors reader loads it,
and nothing here pickles or unpickles.

The file is written as a whole to a temporary name, fsynced and renamed into place, so a crash leaves the
previous file or the new one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from coordinator.checkpoint import write_file_durably
from coordinator.errors import ModelFileError

__all__ = ["ModelFileError", "read_safetensors", "write_safetensors"]


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    # clone: safetensors refuses tensors that share memory (tied weights), and the file holds each one whole anyway
    owned = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()}
    write_file_durably(path, save(owned, metadata=dict(metadata)))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (by name) and metadata of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as model_file:
            metadata = model_file.metadata() or {}
            tensors = {name: model_file.get_tensor(name) for name in model_file.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as exc:
        raise ModelFileError(f"{path} is not a readable safetensors file: {exc}") from exc
    return tensors, dict(metadata)
