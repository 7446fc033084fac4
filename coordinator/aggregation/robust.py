"""Robust aggregation pieces that work one update at a time: pure tensor arithmetic, no broker, no clock.

An asynchronous coordinator never holds every site's update at once, so the defences here are the ones that work
on a stream (BASGD, Yang & Li 2021: buffered asynchronous SGD with robust aggregation needs no server data):

- **Adaptive norm clipping** (:class:`AdaptiveClip`): each accepted update is scaled down to at most
  ``multiplier * median(last window accepted norms)``. Until ``min_norms`` norms have been seen (the warm-up) the
  bound is ``warmup_bound`` (``inf``: no bound beyond the validation's ``max_update_norm``). The norm recorded for
  an update is its norm *after* clipping, so a site that keeps sending huge updates cannot walk the median up.
- **Coordinate-wise median and trimmed mean** over a buffer (:func:`coordinate_median`, :func:`trimmed_mean`):
  for each coordinate, the median of the K values, or the mean of what is left after dropping the
  ``floor(trim_fraction * K)`` smallest and as many largest. Both are unweighted: every buffered delta counts
  once, whatever ``num_examples`` its site claims (a claim the coordinator cannot check).
- **An anomaly score** (:class:`AnomalyTracker`): the cosine similarity of an update to a running mean of the unit
  directions of recent accepted updates (``reference <- (1 - decay) reference + decay * delta / |delta|``). Unit
  directions, so a large update does not make itself the reference. Honest sites score well above 0; a
  sign-flipped update scores below 0. The score is exported and alerted on; with a gate (``min_anomaly_score``)
  an update scoring below it is refused (``UpdateScreen``).

The state of both stateful pieces goes into the strategy's checkpoint (``state_dict`` / ``load_state_dict``).

The statistics themselves are pure functions in ``coordinator.aggregation.robust_math``.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from coordinator.aggregation.robust_math import (
    cosine_similarity,
    delta_norm,
    scaled,
)
from coordinator.aggregation.tensor_math import Params, params_from_state
from coordinator.errors import AggregationError

# ------------------------------------------------------------------------------------------------ clipping


@dataclass(frozen=True)
class ClipDecision:
    """What clipping made of one update: its norm, the bound in force, and the factor applied (1: untouched)."""

    norm: float
    bound: float
    factor: float

    @property
    def clipped(self) -> bool:
        return self.factor < 1.0


class AdaptiveClip:
    """Clip to ``multiplier * median`` of the last ``window`` accepted norms, after a warm-up of ``min_norms``
    norms during which the bound is ``warmup_bound`` (``inf``: none)."""

    def __init__(
        self,
        *,
        multiplier: float = 3.0,
        window: int = 50,
        min_norms: int = 3,
        warmup_bound: float = math.inf,
    ) -> None:
        if not (math.isfinite(multiplier) and multiplier >= 1.0):
            raise AggregationError(f"clip multiplier must be >= 1, got {multiplier}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise AggregationError(f"clip window must be an integer >= 1, got {window!r}")
        if isinstance(min_norms, bool) or not isinstance(min_norms, int) or not 1 <= min_norms <= window:
            raise AggregationError(f"clip min_norms must be an integer in [1, window], got {min_norms!r}")
        if not warmup_bound > 0:
            raise AggregationError(f"clip warmup_bound must be > 0, got {warmup_bound}")
        self.multiplier = multiplier
        self.window = window
        self.min_norms = min_norms
        self.warmup_bound = warmup_bound
        self.norms: deque[float] = deque(maxlen=window)

    def bound(self) -> float:
        """The bound the next update is clipped to."""
        if len(self.norms) < self.min_norms:
            return self.warmup_bound
        return self.multiplier * statistics.median(self.norms)

    def decide(self, norm: float) -> ClipDecision:
        """Pure: the decision for an update of this norm (nothing is recorded until :meth:`record`)."""
        bound = self.bound()
        return ClipDecision(norm=norm, bound=bound, factor=bound / norm if norm > bound else 1.0)

    def record(self, decision: ClipDecision) -> None:
        """Remember an accepted update's norm after clipping."""
        self.norms.append(min(decision.norm, decision.bound))

    def state_dict(self) -> dict[str, Any]:
        return {"norms": list(self.norms)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        norms = state.get("norms")
        if not isinstance(norms, list) or not all(
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
            for value in norms
        ):
            raise AggregationError("checkpoint field 'clip.norms' is not a list of finite norms >= 0")
        self.norms = deque((float(value) for value in norms), maxlen=self.window)


# ------------------------------------------------------------------------------------------------- anomaly


class AnomalyTracker:
    """Cosine of each update to a decaying mean of recent accepted update directions (see the module docstring)."""

    def __init__(self, *, decay: float = 0.2) -> None:
        if not (math.isfinite(decay) and 0.0 < decay <= 1.0):
            raise AggregationError(f"anomaly decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.reference: Params = {}

    def score(self, delta: Mapping[str, torch.Tensor]) -> float | None:
        """Pure: the update's cosine to the reference; None for the first update or a zero one."""
        if not self.reference:
            return None
        return cosine_similarity(delta, self.reference)

    def record(self, delta: Mapping[str, torch.Tensor], norm: float) -> None:
        """Fold an accepted update's direction into the reference (a new dict: checkpointed tensors stay as
        they were written)."""
        if not norm > 0:
            return
        direction = {name: tensor for name, tensor in delta.items() if tensor.is_floating_point()}
        if not self.reference:
            self.reference = {
                name: tensor.detach().to(torch.float32) / float(norm) for name, tensor in direction.items()
            }
            return
        self.reference = {
            name: torch.add(
                self.reference[name] * (1.0 - self.decay),
                tensor.detach().to(torch.float32),
                alpha=self.decay / float(norm),
            )
            for name, tensor in direction.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {"reference": dict(self.reference)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reference = params_from_state(state.get("reference", {}), "anomaly.reference")


# ------------------------------------------------------------------------------------------------ screening


@dataclass(frozen=True)
class Screening:
    """What the robust options made of one accepted update, for the audit record and the metrics."""

    norm: float | None = None
    clip_bound: float | None = None
    clip_factor: float = 1.0
    anomaly_score: float | None = None


@dataclass(frozen=True, eq=False)
class Screened:
    """An update as the strategy takes it: the delta after clipping, what was decided, and why."""

    delta: Params
    screening: Screening
    decision: ClipDecision | None = None


class UpdateScreen:
    """Clipping and anomaly scoring of a strategy's incoming updates; either may be off (None).

    With ``min_anomaly_score`` (None: off), an update scoring below it is refused as ``anomalous`` once the
    reference has seen ``gate_after`` updates. A refused update's direction still joins the reference (its
    clipped norm does not join the clipping window), so a reference that started from an attacker's update is
    pulled back to the honest majority's within a few updates instead of refusing them for ever.
    """

    def __init__(
        self,
        *,
        clip: AdaptiveClip | None = None,
        anomaly: AnomalyTracker | None = None,
        min_anomaly_score: float | None = None,
        gate_after: int = 4,
    ) -> None:
        if min_anomaly_score is not None and anomaly is None:
            raise AggregationError("min_anomaly_score needs the anomaly score")
        if min_anomaly_score is not None and not -1.0 <= min_anomaly_score <= 1.0:
            raise AggregationError(f"min_anomaly_score must be in [-1, 1], got {min_anomaly_score}")
        self.clip = clip
        self.anomaly = anomaly
        self.min_anomaly_score = min_anomaly_score
        self.gate_after = gate_after
        self.seen = 0  # updates whose direction joined the reference

    def refuses(self, screened: Screened) -> bool:
        """Pure: whether the gate refuses this screened update."""
        score = screened.screening.anomaly_score
        return (
            self.min_anomaly_score is not None
            and score is not None
            and self.seen >= self.gate_after
            and score < self.min_anomaly_score
        )

    def record_refused(self, screened: Screened) -> None:
        """A refused update's direction joins the reference (see the class docstring)."""
        norm = screened.screening.norm
        if self.anomaly is not None and norm is not None:
            self.anomaly.record(screened.delta, norm * screened.screening.clip_factor)
            self.seen += 1

    def screen(self, delta: Mapping[str, torch.Tensor], norm: float | None) -> Screened:
        """Pure: the (clipped) delta and its screening; nothing is remembered until :meth:`record`."""
        if self.clip is None and self.anomaly is None:
            return Screened(dict(delta), Screening(norm=norm))
        norm = delta_norm(delta) if norm is None else norm
        decision = self.clip.decide(norm) if self.clip is not None else None
        clipped = scaled(delta, decision.factor) if decision is not None and decision.clipped else dict(delta)
        score = self.anomaly.score(clipped) if self.anomaly is not None else None
        screening = Screening(
            norm=norm,
            clip_bound=None if decision is None or math.isinf(decision.bound) else decision.bound,
            clip_factor=1.0 if decision is None else decision.factor,
            anomaly_score=score,
        )
        return Screened(clipped, screening, decision)

    def record(self, screened: Screened) -> None:
        """Remember an update the strategy took: its clipped norm, its direction."""
        norm = screened.screening.norm
        if norm is None:
            return
        if self.clip is not None and screened.decision is not None:
            self.clip.record(screened.decision)
        if self.anomaly is not None:
            self.anomaly.record(screened.delta, norm * screened.screening.clip_factor)
            self.seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "clip": None if self.clip is None else self.clip.state_dict(),
            "anomaly": None if self.anomaly is None else self.anomaly.state_dict(),
            "seen": self.seen,
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """A checkpoint from before the robust options (None, or a part missing) starts that part afresh."""
        state = state or {}
        seen = state.get("seen", 0)
        self.seen = seen if isinstance(seen, int) and not isinstance(seen, bool) and seen >= 0 else 0
        if self.clip is not None and isinstance(state.get("clip"), Mapping):
            self.clip.load_state_dict(state["clip"])
        if self.anomaly is not None and isinstance(state.get("anomaly"), Mapping):
            self.anomaly.load_state_dict(state["anomaly"])
