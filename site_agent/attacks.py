"""Poisoning attackers, a test and demo facility: ``[agent] attack = "sign-flip:10"`` makes this agent misbehave.

An attacker here follows every rule the coordinator checks: it sends from its own site, with its own credentials,
well-formed finite updates of the right shapes on a recent model, each with a fresh ``update_id`` and ``seq``. Only
what the coordinator cannot verify is forged: the delta's direction and size, and the claimed ``num_examples``.
It runs inside the real agent process, on the update the honest training just produced, so the benchmark
(``fedmq bench poisoning``) and ``fedmq demo --attack`` measure the defences against the real wire. Never set it
on a hospital's production agent.

Kinds (``KIND[:SCALE]``):

- ``sign-flip:S``: send ``-S * delta`` (default S = 1);
- ``scale:S``: send ``S * delta`` (default 10);
- ``noise:S``: send Gaussian noise with S times the honest delta's norm (default 1: at the honest norm);
- ``inflate-examples:N``: the honest delta, claiming N examples (default 10**12);
- ``flood:N``: the honest delta sent N times, each a new update with its own id and seq (default 50).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from schemas import ModelUpdate

ATTACK_KINDS: dict[str, float] = {
    "sign-flip": 1.0,
    "scale": 10.0,
    "noise": 1.0,
    "inflate-examples": 1e12,
    "flood": 50.0,
}
MAX_NUM_EXAMPLES_CLAIM = 2**63 - 1  # the wire's integer range


@dataclass(frozen=True)
class Attack:
    """One attacker: what it forges (``kind``) and by how much (``scale``)."""

    kind: str
    scale: float

    @classmethod
    def parse(cls, text: str) -> Attack:
        """``KIND[:SCALE]``, e.g. ``sign-flip:10``; a ValueError names what is wrong."""
        kind, _, scale_text = text.strip().partition(":")
        if kind not in ATTACK_KINDS:
            raise ValueError(f"unknown attack {kind!r}; choose one of {', '.join(ATTACK_KINDS)}")
        try:
            scale = float(scale_text) if scale_text else ATTACK_KINDS[kind]
        except ValueError:
            raise ValueError(f"attack {text!r}: the scale must be a number") from None
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"attack {text!r}: the scale must be a finite number > 0")
        if kind == "flood" and not 1 <= scale <= 100_000:
            raise ValueError(f"attack {text!r}: a flood sends 1 to 100000 copies")
        return cls(kind, scale)

    def __str__(self) -> str:
        return f"{self.kind}:{self.scale:g}"

    def apply(self, update: ModelUpdate, next_seq: Callable[[], int], generator: torch.Generator) -> list[ModelUpdate]:
        """The updates sent instead of the honest ``update`` (which keeps its own id and seq)."""
        if self.kind == "flood":
            copies = [update]
            for _ in range(int(self.scale) - 1):
                copies.append(replace(update, update_id=ModelUpdate.new_id(), seq=next_seq()))
            return copies
        if self.kind == "inflate-examples":
            return [replace(update, num_examples=min(int(self.scale), MAX_NUM_EXAMPLES_CLAIM))]
        if self.kind == "noise":
            return [replace(update, delta=_noise_like(update.delta, self.scale, generator))]
        factor = -self.scale if self.kind == "sign-flip" else self.scale
        delta = {
            name: (tensor * factor).contiguous() if tensor.is_floating_point() else tensor
            for name, tensor in update.delta.items()
        }
        return [replace(update, delta=delta)]


def _noise_like(delta: dict[str, torch.Tensor], scale: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Gaussian noise of ``scale`` times the norm of ``delta`` (floating-point tensors; others kept)."""
    floating = {name: tensor for name, tensor in delta.items() if tensor.is_floating_point()}
    norm = math.sqrt(sum(float(tensor.double().square().sum()) for tensor in floating.values()))
    noise = {
        name: torch.randn(tensor.shape, generator=generator, dtype=torch.float64) for name, tensor in floating.items()
    }
    noise_norm = math.sqrt(sum(float(tensor.square().sum()) for tensor in noise.values())) or 1.0
    return {
        name: (noise[name] * (scale * norm / noise_norm)).to(tensor.dtype) if name in noise else tensor
        for name, tensor in delta.items()
    }
