"""Synchronous FedAvg: one update per registered site per round, example-weighted, with a round timeout."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from coordinator.aggregation.base import (
    Contribution,
    Strategy,
)
from coordinator.aggregation.robust import UpdateScreen
from coordinator.aggregation.server_optimizer import ServerOptimizer
from coordinator.aggregation.tensor_math import (
    Params,
    add_scaled,
    check_compatible,
    params_from_state,
    string_list_from_state,
    zeros_for,
)
from coordinator.errors import AggregationError
from coordinator.reasons import Reason


class SyncFedAvg(Strategy):
    """The synchronous baseline: each round waits for one update from every registered site on the current
    version, then steps with the example-weighted mean delta (plain FedAvg with the default SGD at rate 1,
    FedAdam/FedYogi with an adaptive server optimiser). A round older than ``round_timeout_seconds`` is
    aggregated with what it has, so one silent site does not stop training.
    """

    name: ClassVar[str] = "fedavg-sync"

    def __init__(
        self,
        *,
        sites: Iterable[str] = (),
        round_timeout_seconds: float | None = 600.0,
        min_updates: int = 1,
        server_optimizer: ServerOptimizer | None = None,
        screen: UpdateScreen | None = None,
    ) -> None:
        self.screen = screen  # clipping and anomaly scoring (Strategy.take)
        if round_timeout_seconds is not None and not round_timeout_seconds > 0:
            raise AggregationError(f"round_timeout_seconds must be > 0 or None, got {round_timeout_seconds}")
        if isinstance(min_updates, bool) or not isinstance(min_updates, int) or min_updates < 1:
            raise AggregationError(f"min_updates must be an integer >= 1, got {min_updates!r}")
        self.round_timeout_seconds = round_timeout_seconds
        self.min_updates = min_updates
        self.server_optimizer = server_optimizer if server_optimizer is not None else ServerOptimizer("sgd")
        self._sites: frozenset[str] = frozenset()
        self.set_sites(sites)
        self._round_version: int | None = None
        self._round_started_at: float | None = None
        self._weighted_delta_sum: Params = {}
        self._total_examples = 0
        self._update_ids: list[str] = []
        self._site_ids: list[str] = []

    @property
    def sites(self) -> frozenset[str]:
        """The registered sites a round waits for."""
        return self._sites

    @property
    def trains_on_same_version(self) -> bool:
        """A round takes one update per site and version, so a site waits for the next version."""
        return False

    @property
    def capacity(self) -> int:
        """A round waits for every registered site (1 when none is registered yet)."""
        return len(self._sites) or 1

    def set_sites(self, sites: Iterable[str]) -> None:
        """Replace the registered sites; a round already holding every remaining site completes at the next
        :meth:`flush`."""
        self._sites = frozenset(sites)

    def check(self, contribution: Contribution, version: int) -> Reason | None:
        """Refuse an unregistered site, a base version other than the current one, a second update from a site
        in this round, or an update with no examples to weight it by."""
        if contribution.site_id not in self._sites:
            return Reason.UNKNOWN_SITE
        if contribution.base_version != version:
            return Reason.WRONG_ROUND
        if self._round_version == version and contribution.site_id in self._site_ids:
            return Reason.ALREADY_IN_ROUND
        if contribution.num_examples <= 0:
            return Reason.NO_EXAMPLES
        return None

    def add(
        self, global_params: Params, version: int, contribution: Contribution, base_params: Params
    ) -> Params | None:
        """Add ``n_i * delta_i`` to the round; when every registered site is in, aggregate."""
        self._require_accepted(contribution, version)
        check_compatible(global_params, contribution.delta, "delta")
        self._start_round_if_new(version)
        accumulator = self._weighted_delta_sum or zeros_for(global_params)
        weighted_sum = add_scaled(accumulator, contribution.delta, float(contribution.num_examples))
        total_examples = self._total_examples + contribution.num_examples
        if self._sites.issubset([*self._site_ids, contribution.site_id]):
            return self._aggregate(global_params, weighted_sum, total_examples)
        self._weighted_delta_sum, self._total_examples = weighted_sum, total_examples
        self._update_ids.append(contribution.update_id)
        self._site_ids.append(contribution.site_id)
        return None

    def flush(self, global_params: Params, version: int, now: float) -> Params | None:
        """Aggregate a complete round, or one older than the timeout holding at least ``min_updates``.

        A round's clock starts at the first flush that sees its version (the service flushes on every tick),
        and is not checkpointed: after a restart a round gets a fresh timeout rather than an instant one.
        """
        self._start_round_if_new(version)
        if self._round_started_at is None:
            self._round_started_at = now
        if self._update_ids and self._sites.issubset(self._site_ids):
            return self._aggregate(global_params, self._weighted_delta_sum, self._total_examples)
        timed_out = (
            self.round_timeout_seconds is not None and now - self._round_started_at >= self.round_timeout_seconds
        )
        if timed_out and len(self._update_ids) >= self.min_updates:
            return self._aggregate(global_params, self._weighted_delta_sum, self._total_examples)
        return None

    def buffered_update_ids(self) -> list[str]:
        """Ids in the current round, in arrival order."""
        return list(self._update_ids)

    def state_dict(self) -> dict[str, Any]:
        """The round's example-weighted sum and who is in it (-1: no round open), plus the optimiser."""
        return {
            "strategy": self.name,
            "round_version": -1 if self._round_version is None else self._round_version,
            "weighted_delta_sum": dict(self._weighted_delta_sum),
            "total_examples": self._total_examples,
            "update_ids": list(self._update_ids),
            "site_ids": list(self._site_ids),
            "server_optimizer": self.server_optimizer.state_dict(),
            **self._screen_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume mid-round; the round's timeout clock restarts at the next :meth:`flush`."""
        self._check_state_owner(state)
        round_version = state.get("round_version")
        total_examples = state.get("total_examples")
        if not isinstance(round_version, int) or isinstance(round_version, bool) or round_version < -1:
            raise AggregationError(f"checkpoint field 'round_version' must be an integer >= -1, got {round_version!r}")
        if not isinstance(total_examples, int) or isinstance(total_examples, bool) or total_examples < 0:
            raise AggregationError(f"checkpoint field 'total_examples' must be >= 0, got {total_examples!r}")
        weighted_sum = params_from_state(state.get("weighted_delta_sum"), "weighted_delta_sum")
        update_ids = string_list_from_state(state.get("update_ids"), "update_ids")
        site_ids = string_list_from_state(state.get("site_ids"), "site_ids")
        if len(update_ids) != len(site_ids) or bool(update_ids) != bool(weighted_sum):
            raise AggregationError("checkpoint round is inconsistent: update_ids, site_ids and sum disagree")
        optimizer_state = state.get("server_optimizer")
        if not isinstance(optimizer_state, Mapping):
            raise AggregationError("checkpoint field 'server_optimizer' is missing")
        self.server_optimizer.load_state_dict(optimizer_state)
        self._load_screen_state(state)
        self._round_version = None if round_version == -1 else round_version
        self._round_started_at = None
        self._weighted_delta_sum, self._total_examples = weighted_sum, total_examples
        self._update_ids, self._site_ids = update_ids, site_ids

    def _start_round_if_new(self, version: int) -> None:
        if self._round_version == version:
            return
        if self._update_ids:
            raise AggregationError(
                f"the round for version {self._round_version} holds {len(self._update_ids)} updates, "
                f"but the global model is at version {version}"
            )
        self._round_version = version
        self._round_started_at = None

    def _aggregate(self, global_params: Params, weighted_delta_sum: Params, total_examples: int) -> Params:
        """Step with ``sum(n_i delta_i) / sum(n_i)``, then close the round (only once the step succeeded)."""
        mean_delta = add_scaled(zeros_for(weighted_delta_sum), weighted_delta_sum, 1.0 / total_examples)
        new_params = self.server_optimizer.step(global_params, mean_delta)
        self._round_version, self._round_started_at = None, None
        self._weighted_delta_sum, self._total_examples = {}, 0
        self._update_ids, self._site_ids = [], []
        return new_params
