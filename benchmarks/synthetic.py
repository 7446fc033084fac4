"""A model of any size for the coordinator benchmarks, and update messages that cost nothing to vary.

``SyntheticTask`` is an ordinary task found by its dotted path (``[task] name =
"benchmarks.synthetic:SyntheticTask"``, ``num_parameters = 1000000``): the coordinator builds version 0 from it
like from any task. Its tensors are a ResNet-18's layers in order, cut at ``num_parameters`` (the same shapes as
``fedmq bench codec``). It has no data: the benchmarks drive it with scripted sites, never with agents.

``UpdateTemplate`` encodes one valid ``ModelUpdate`` once and then stamps a fresh ``update_id`` and ``seq``
into a copy of the bytes for every message, so scripted sites can publish thousands of distinct, valid updates
of 44 MB without re-encoding each one.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from benchmarks.codec import resnet18_layer_shapes
from schemas import ModelUpdate, TrainingMetrics
from tasks.base import SiteData, Task
from tasks.errors import TaskDataError

PLACEHOLDER_UPDATE_ID = "00000000-0000-4000-8000-00000000b0b0"
FIRST_SEQ = 1 << 16  # from here to 2**32 - 1 msgpack writes every seq as uint32 (0xce + 4 bytes): fixed width
_SEQ_FIELD = b"\xa3seq\xce"


def layer_shapes(num_parameters: int) -> list[tuple[int, ...]]:
    """ResNet-18 layer shapes in order until ``num_parameters``; the last one is cut short and flattened."""
    shapes: list[tuple[int, ...]] = []
    remaining = num_parameters
    for _, shape in resnet18_layer_shapes():
        if remaining <= 0:
            break
        size = torch.Size(shape).numel()
        shapes.append(shape if size <= remaining else (remaining,))
        remaining -= min(size, remaining)
    if remaining > 0:
        shapes.append((remaining,))
    return shapes


class SyntheticModel(nn.Module):
    """Just parameters: ``layers.0``, ``layers.1``, ... shaped like a ResNet-18's."""

    def __init__(self, num_parameters: int) -> None:
        super().__init__()
        self.layers = nn.ParameterList(
            [nn.Parameter(torch.randn(shape) * 0.01) for shape in layer_shapes(num_parameters)]
        )

    def forward(self, features: Tensor) -> Tensor:
        return features


class SyntheticTask(Task):
    """A model of ``num_parameters`` float32 values and no data (coordinator benchmarks only)."""

    name: ClassVar[str] = "bench-synthetic"

    def __init__(self, *, num_parameters: int = 1_000_000) -> None:
        if type(num_parameters) is not int or num_parameters < 1:
            raise ValueError(f"num_parameters must be a positive integer, got {num_parameters!r}")
        self.num_parameters = num_parameters

    def build_model(self) -> nn.Module:
        return SyntheticModel(self.num_parameters)

    def load_data(self, site_id: str, options: Mapping[str, Any]) -> SiteData:
        raise TaskDataError("the synthetic benchmark task has no data: drive it with scripted sites")

    def loss(self, model: nn.Module, features: Tensor, labels: Tensor) -> Tensor:
        raise TaskDataError("the synthetic benchmark task has no data: drive it with scripted sites")


def synthetic_task_options(num_parameters: int) -> dict[str, Any]:
    """The ``[task]`` table naming this task by its dotted path."""
    return {"name": f"{__name__}:SyntheticTask", "num_parameters": num_parameters}


def model_tensors(num_parameters: int, seed: int = 0) -> dict[str, Tensor]:
    """The synthetic model's state dict as the coordinator builds it (seeded)."""
    torch.manual_seed(seed)
    return {name: tensor.detach() for name, tensor in SyntheticModel(num_parameters).state_dict().items()}


class UpdateTemplate:
    """One encoded update for ``site_id``; ``body(index)`` is a copy with its own update_id and seq."""

    def __init__(
        self,
        site_id: str,
        shapes: Mapping[str, torch.Size],
        *,
        base_version: int = 0,
        scale: float = 1e-3,
        seed: int = 0,
        compression: str = "none",
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        delta = {name: torch.randn(shape, generator=generator) * scale for name, shape in shapes.items()}
        update = ModelUpdate(
            update_id=PLACEHOLDER_UPDATE_ID,
            site_id=site_id,
            seq=FIRST_SEQ,
            base_version=base_version,
            num_examples=100,
            delta=delta,
            metrics=TrainingMetrics(loss=0.5, steps=10, seconds=1.0),
        )
        self.site_id = site_id
        self.raw_bytes = sum(tensor.numel() * tensor.element_size() for tensor in delta.values())
        self.encoded = update.encode(compression)
        self._id_offset = self._unique_offset(PLACEHOLDER_UPDATE_ID.encode())
        self._seq_offset = self._unique_offset(_SEQ_FIELD + FIRST_SEQ.to_bytes(4, "big")) + len(_SEQ_FIELD)

    def _unique_offset(self, needle: bytes) -> int:
        offset = self.encoded.find(needle)
        if offset < 0 or self.encoded.find(needle, offset + 1) >= 0:
            raise RuntimeError(f"cannot locate {needle!r} exactly once in the encoded update")
        return offset

    def body(self, index: int) -> tuple[str, bytes]:
        """The ``index``-th message of this site (index >= 0): a new update id and seq ``FIRST_SEQ + index``."""
        seq = FIRST_SEQ + index
        if seq >= 1 << 32:
            raise ValueError(f"index {index} is beyond the template's fixed-width seq")
        update_id = str(uuid.uuid4())
        patched = bytearray(self.encoded)
        patched[self._id_offset : self._id_offset + 36] = update_id.encode()
        patched[self._seq_offset : self._seq_offset + 4] = seq.to_bytes(4, "big")
        return update_id, bytes(patched)


def synthetic_coordinator_toml(
    *,
    num_parameters: int,
    sites: list[str],
    broker_url: str,
    state_dir: str,
    metrics_port: int,
    buffer_size: int = 10,
    prefetch: int | None = None,
) -> str:
    """A coordinator.toml for the synthetic task: FedBuff (server SGD) with a staleness bound no scripted site
    reaches (they all train on version 0), liveness that never marks a scripted site down, no stopping rule."""
    import json

    from coordinator.config import CoordinatorConfig

    return f"""# written by fedmq bench
sites = {json.dumps(sites)}
state_dir = {json.dumps(state_dir)}
update_prefetch = {prefetch or CoordinatorConfig().update_prefetch}

[task]
name = {json.dumps(synthetic_task_options(num_parameters)["name"])}
num_parameters = {num_parameters}

[broker]
url = {json.dumps(broker_url)}

[strategy]
name = "fedbuff"
max_staleness = 1000000000
buffer_size = {buffer_size}

[validation]
max_update_norm = 1e12
max_message_mb = 1024

[liveness]
site_timeout_seconds = 3600

[metrics]
host = "127.0.0.1"
port = {metrics_port}

[signing]
# the scripted sites replay one pre-encoded body with patched ids (benchmarks.synthetic): it cannot carry a
# signature, so this coordinator measures everything but the signature check (one sha256 pass per update)
required = false
"""


def write_synthetic_coordinator(
    work_dir: Path, *, broker_url: str, num_parameters: int, sites: list[str], buffer_size: int = 10
) -> tuple[Path, Path]:
    """Write a benchmark coordinator's config (on a free metrics port) into ``work_dir``: (config path, state dir)."""
    from benchmarks.harness import free_tcp_ports

    (metrics_port,) = free_tcp_ports(1)
    config_path = work_dir / "coordinator.toml"
    state_dir = work_dir / "coordinator"
    config_path.write_text(
        synthetic_coordinator_toml(
            num_parameters=num_parameters,
            sites=sites,
            broker_url=broker_url,
            state_dir=str(state_dir),
            metrics_port=metrics_port,
            buffer_size=buffer_size,
        )
    )
    return config_path, state_dir
