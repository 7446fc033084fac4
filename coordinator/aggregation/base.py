"""The strategy abstraction: what the service hands a strategy (a ``Contribution``) and what it may ask of it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from coordinator.aggregation.robust import Screened, Screening, UpdateScreen
from coordinator.aggregation.tensor_math import Params
from coordinator.errors import AggregationError
from coordinator.reasons import Reason


@dataclass(frozen=True)
class Taken:
    """What :meth:`Strategy.take` did with an update: the new parameters when a version resulted, and what the
    robust screen (clipping, anomaly score) made of it."""

    new_params: Params | None
    screening: Screening


@dataclass(frozen=True, eq=False)
class Contribution:
    """One validated update, as a strategy sees it; ``staleness`` is ``current_version - base_version``."""

    site_id: str
    update_id: str
    base_version: int
    staleness: int
    num_examples: int
    delta: Params
    norm: float | None = None  # the delta's L2 norm when the caller measured it already (validation does)

    def __post_init__(self) -> None:
        if self.staleness < 0:
            raise AggregationError(f"update {self.update_id}: staleness must be >= 0, got {self.staleness}")
        if self.num_examples < 0:
            raise AggregationError(f"update {self.update_id}: num_examples must be >= 0, got {self.num_examples}")


class Strategy(ABC):
    """How accepted updates become global versions. One instance per run, called from one thread.

    The service calls :meth:`admit` (:meth:`check` and the screen's gate), then :meth:`take` (the screen, then
    :meth:`add`) for an accepted update, and :meth:`flush` on every timer
    tick. Before either call it reads :meth:`buffered_update_ids`: when the call returns parameters, the new
    version holds exactly those ids (plus the added one), which the audit log records. What else the service
    needs to know (``keeps_base_history``, ``trains_on_same_version``, ``capacity``, the sites) it asks here; it
    never looks at the concrete class.
    """

    name: ClassVar[str]
    screen: UpdateScreen | None = None  # clipping and anomaly scoring, set by a strategy's constructor
    _admitted: tuple[Contribution, Screened] | None = None  # the update admit() screened, for take()

    @property
    def keeps_base_history(self) -> bool:
        """Whether :meth:`add` reads ``base_params``, so the service must keep the versions updates are based on."""
        return False

    @property
    def trains_on_same_version(self) -> bool:
        """Whether a site may train again on a version it already trained on (not in a synchronous round)."""
        return True

    @property
    def capacity(self) -> int:
        """How many updates the next version needs (a buffer's K, a round's sites), for a gauge and the log."""
        return 1

    def set_sites(self, sites: Iterable[str]) -> None:
        """The registered sites; only a strategy that waits for sites needs them."""
        return None

    def check(self, contribution: Contribution, version: int) -> Reason | None:
        """A strategy-specific refusal reason for an update at global ``version``, or None to accept it."""
        return None

    @abstractmethod
    def add(
        self, global_params: Params, version: int, contribution: Contribution, base_params: Params
    ) -> Params | None:
        """Take one accepted update; return the new global params when a new version results, else None.

        All or nothing: either the update is taken, or the call raises and leaves the strategy as it was (the
        service then rejects the update as ``internal-error`` and keeps serving)."""

    def admit(self, contribution: Contribution, version: int) -> Reason | None:
        """What the service asks of an update: :meth:`check`, then the screen's anomaly gate (``anomalous``).

        A refusal by the gate is remembered by the screen (the update's direction joins its reference); the
        screening is kept for :meth:`take` of the same update, so it is computed once."""
        reason = self.check(contribution, version)
        if reason is not None or self.screen is None:
            return reason
        screened = self.screen.screen(contribution.delta, contribution.norm)
        if self.screen.refuses(screened):
            self.screen.record_refused(screened)
            self._admitted = None
            return Reason.ANOMALOUS
        self._admitted = (contribution, screened)
        return None

    def take(self, global_params: Params, version: int, contribution: Contribution, base_params: Params) -> Taken:
        """What the service calls for an accepted update: the robust screen (clip to the adaptive bound, score
        against recent updates), then :meth:`add` with the clipped delta; the screen remembers the update only
        once ``add`` took it. Without a screen this is ``add`` exactly, so the published formulas hold."""
        if self.screen is None:
            new_params = self.add(global_params, version, contribution, base_params)
            return Taken(new_params, Screening(norm=contribution.norm))
        admitted, self._admitted = self._admitted, None
        screened: Screened = (
            admitted[1]
            if admitted is not None and admitted[0] is contribution
            else self.screen.screen(contribution.delta, contribution.norm)
        )
        clipped = contribution if screened.screening.clip_factor == 1.0 else replace(contribution, delta=screened.delta)
        new_params = self.add(global_params, version, clipped, base_params)
        self.screen.record(screened)
        return Taken(new_params, screened.screening)

    def flush(self, global_params: Params, version: int, now: float) -> Params | None:
        """Time-driven aggregation (a synchronous round's timeout); ``now`` is any monotonic clock."""
        return None

    def buffered_update_ids(self) -> list[str]:
        """Ids taken by :meth:`add` and not yet in a version, oldest first."""
        return []

    def buffered(self) -> int:
        """How many updates are held (a FedBuff buffer's or a synchronous round's fill), for a gauge."""
        return len(self.buffered_update_ids())

    def state_dict(self) -> dict[str, Any]:
        """Buffer and optimiser state for the checkpoint: tensors, numbers, strings, lists and dicts only.

        Tensors are shared, not copied, unless the strategy edits them in place: the checkpoint store skips
        rewriting a tensor it has already written (the optimiser moments between buffer flushes, say)."""
        return {"strategy": self.name, **self._screen_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` so the next version is the one an uninterrupted run would make."""
        self._check_state_owner(state)
        self._load_screen_state(state)

    def _screen_state(self) -> dict[str, Any]:
        """The screen's part of a checkpoint (the recent norms, the reference direction); empty without one."""
        return {} if self.screen is None else {"screen": self.screen.state_dict()}

    def _load_screen_state(self, state: Mapping[str, Any]) -> None:
        if self.screen is not None:
            screen_state = state.get("screen")
            self.screen.load_state_dict(screen_state if isinstance(screen_state, Mapping) else None)

    def _check_state_owner(self, state: Mapping[str, Any]) -> None:
        if state.get("strategy") != self.name:
            raise AggregationError(
                f"checkpoint was written by strategy {state.get('strategy')!r}, this run uses {self.name!r}"
            )

    def _require_accepted(self, contribution: Contribution, version: int) -> None:
        """Guard against a caller skipping :meth:`check`, which would double-count in a round."""
        reason = self.check(contribution, version)
        if reason is not None:
            raise AggregationError(f"update {contribution.update_id} was refused ({reason.value}); call check() first")
