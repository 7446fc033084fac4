"""FedBuff (Nguyen et al. 2022): buffer K staleness-weighted deltas, then one server-optimiser step."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from coordinator.aggregation.base import Contribution, Strategy
from coordinator.aggregation.robust import UpdateScreen
from coordinator.aggregation.robust_math import AGGREGATORS, agreeing_mean, robust_mean, scaled
from coordinator.aggregation.server_optimizer import ServerOptimizer
from coordinator.aggregation.staleness import StalenessFunction
from coordinator.aggregation.tensor_math import (
    Params,
    accumulate_scaled,
    add_scaled,
    check_compatible,
    params_from_state,
    string_list_from_state,
    zeros_for,
)
from coordinator.errors import AggregationError
from coordinator.reasons import Reason


class FedBuff(Strategy):
    """Nguyen et al. 2022: buffer K weighted deltas, then step the server optimiser with their mean.

    ``example_weighted=True`` is our extension, off by default: each delta also counts in proportion to the
    site's ``num_examples``, as in FedAvg, and the pseudo-gradient is ``sum(n_i s(tau_i) delta_i) / sum(n_i)``.
    With equal ``n_i`` that is the paper's ``sum(s(tau_i) delta_i) / K`` exactly, and staleness still shrinks
    the step. Without it, a 30-patient hospital pulls the model as hard as a 200-patient one, so on unequal
    sites the published rule optimises a per-site (not per-patient) average of the losses.

    ``aggregator`` (robust aggregation, BASGD-style; ``mean`` is the paper's): ``median`` and ``trimmed-mean``
    replace ``sum / K`` by the coordinate-wise median or trimmed mean of the K buffered ``s(tau_i) delta_i``. They
    are unweighted (each buffered delta counts once, whatever ``num_examples`` says), so they refuse
    ``example_weighted``; they keep the K deltas instead of one running sum (K times the buffer's memory).
    ``min_agreement`` (mean only; -1: off): at K, a delta whose cosine to the buffer's coordinate-wise median is
    below it is left out of the mean (``robust.agreeing_mean``), which keeps its weighting among the others.
    ``screen`` clips each update and scores it (``robust.UpdateScreen``; applied by :meth:`Strategy.take`).
    ``max_site_share`` gives one site ``floor(share * K)`` places, at least 1: a cap that binds.
    """

    name: ClassVar[str] = "fedbuff"

    def __init__(
        self,
        *,
        buffer_size: int = 10,
        staleness: StalenessFunction | None = None,
        max_site_share: float = 1.0,
        server_optimizer: ServerOptimizer | None = None,
        example_weighted: bool = False,
        aggregator: str = "mean",
        trim_fraction: float = 0.2,
        min_agreement: float = -1.0,
        screen: UpdateScreen | None = None,
    ) -> None:
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise AggregationError(f"fedbuff buffer_size must be an integer >= 1, got {buffer_size!r}")
        if not (math.isfinite(max_site_share) and 0.0 < max_site_share <= 1.0):
            raise AggregationError(f"fedbuff max_site_share must be in (0, 1], got {max_site_share}")
        if not isinstance(example_weighted, bool):
            raise AggregationError(f"fedbuff example_weighted must be true or false, got {example_weighted!r}")
        if aggregator not in AGGREGATORS:
            raise AggregationError(f"fedbuff aggregator must be one of {AGGREGATORS}, got {aggregator!r}")
        if aggregator != "mean" and example_weighted:
            raise AggregationError(f"fedbuff aggregator {aggregator!r} is unweighted: it takes no example_weighted")
        if not (math.isfinite(trim_fraction) and 0.0 <= trim_fraction < 0.5):
            raise AggregationError(f"fedbuff trim_fraction must be in [0, 0.5), got {trim_fraction}")
        if not (math.isfinite(min_agreement) and -1.0 <= min_agreement <= 1.0):
            raise AggregationError(f"fedbuff min_agreement must be in [-1, 1], got {min_agreement}")
        if min_agreement > -1.0 and aggregator != "mean":
            raise AggregationError(f"fedbuff min_agreement filters the mean, not the {aggregator!r}")
        self.aggregator = aggregator
        self.trim_fraction = trim_fraction
        self.min_agreement = min_agreement
        self._keeps_deltas = aggregator != "mean" or min_agreement > -1.0
        self._delta_examples: list[int] = []
        self.screen = screen
        self._deltas: list[Params] = []  # the buffered s(tau) * delta, for the median and the trimmed mean
        self.buffer_size = buffer_size
        self.staleness = staleness if staleness is not None else StalenessFunction("polynomial", a=0.5)
        self.max_site_share = max_site_share
        # Floor, so that the share is a cap (0.67 of K = 3 is 2 places, not 3), and at least one place; rounded
        # first so that 0.29 * 100 (= 28.999999999999996 in floats) allows 29 updates, not 28.
        self.max_updates_per_site = max(1, math.floor(round(max_site_share * buffer_size, 9)))
        self.server_optimizer = server_optimizer if server_optimizer is not None else ServerOptimizer("sgd")
        self.example_weighted = example_weighted
        self._weighted_delta_sum: Params = {}
        self._buffered_examples = 0
        self._update_ids: list[str] = []
        self._site_ids: list[str] = []

    @property
    def capacity(self) -> int:
        """K: a version is made when the buffer holds this many updates."""
        return self.buffer_size

    def check(self, contribution: Contribution, version: int) -> Reason | None:
        """Refuse ``"site-share"`` once a site holds ``max(1, floor(max_site_share * K))`` places in the buffer,
        and, when example-weighted, ``"no-examples"`` for an update that has no examples to weight it by."""
        if self._site_ids.count(contribution.site_id) >= self.max_updates_per_site:
            return Reason.SITE_SHARE
        if self.example_weighted and contribution.num_examples <= 0:
            return Reason.NO_EXAMPLES
        return None

    def add(
        self, global_params: Params, version: int, contribution: Contribution, base_params: Params
    ) -> Params | None:
        """Buffer ``s(tau) * delta`` (times ``n`` when example-weighted); at K, step with the pseudo-gradient
        ``sum / K`` (``sum / sum(n)``) and empty the buffer."""
        self._require_accepted(contribution, version)
        check_compatible(global_params, contribution.delta, "delta")
        if self._keeps_deltas:
            return self._add_robust(global_params, contribution)
        examples = contribution.num_examples if self.example_weighted else 0
        weight = self.staleness(contribution.staleness) * (examples if self.example_weighted else 1)
        accumulator = self._weighted_delta_sum or zeros_for(global_params)
        if len(self._update_ids) + 1 < self.buffer_size:
            # in place, after every check that could refuse it: the one step here that changes the buffer
            accumulate_scaled(accumulator, contribution.delta, weight)
            self._weighted_delta_sum = accumulator
            self._buffered_examples += examples
            self._update_ids.append(contribution.update_id)
            self._site_ids.append(contribution.site_id)
            return None
        # The buffer is full: the sum with this update goes into new tensors (the same arithmetic as in place), so
        # a step that fails leaves the buffer as it was.
        weighted_sum = add_scaled(accumulator, contribution.delta, weight)
        normaliser = self._buffered_examples + examples if self.example_weighted else len(self._update_ids) + 1
        pseudo_gradient = add_scaled(zeros_for(weighted_sum), weighted_sum, 1.0 / normaliser)
        new_params = self.server_optimizer.step(global_params, pseudo_gradient)
        self._weighted_delta_sum, self._buffered_examples, self._update_ids, self._site_ids = {}, 0, [], []
        return new_params

    def _add_robust(self, global_params: Params, contribution: Contribution) -> Params | None:
        """Buffer ``s(tau) * delta``; at K, step with the coordinate-wise median or trimmed mean of the K, or the
        (example-weighted) mean of those agreeing with their median."""
        weighted = scaled(contribution.delta, self.staleness(contribution.staleness))
        examples = contribution.num_examples if self.example_weighted else 0
        if len(self._update_ids) + 1 < self.buffer_size:
            self._deltas.append(weighted)
            self._delta_examples.append(examples)
            self._buffered_examples += examples
            self._update_ids.append(contribution.update_id)
            self._site_ids.append(contribution.site_id)
            return None
        deltas = [*self._deltas, weighted]
        if self.aggregator == "mean":
            counts = [*self._delta_examples, examples]
            weights = [float(count) for count in counts] if self.example_weighted else [1.0] * len(deltas)
            centre, _ = agreeing_mean(deltas, weights, self.min_agreement)
        else:
            centre = robust_mean(deltas, self.aggregator, self.trim_fraction)
        pseudo_gradient = {name: centre[name] for name in global_params}
        new_params = self.server_optimizer.step(global_params, pseudo_gradient)
        self._deltas, self._delta_examples, self._update_ids, self._site_ids = [], [], [], []
        self._buffered_examples = 0
        return new_params

    def buffered_update_ids(self) -> list[str]:
        """Ids in the buffer, oldest first."""
        return list(self._update_ids)

    def state_dict(self) -> dict[str, Any]:
        """The weighted sum (not the deltas: K times smaller; a copy, as the live one is summed into in place),
        who is in the buffer, and the optimiser."""
        return {
            "strategy": self.name,
            "example_weighted": self.example_weighted,
            "aggregator": self.aggregator,
            "deltas": [dict(delta) for delta in self._deltas],
            "delta_examples": list(self._delta_examples),
            **self._screen_state(),
            "weighted_delta_sum": {name: tensor.clone() for name, tensor in self._weighted_delta_sum.items()},
            "buffered_examples": self._buffered_examples,
            "update_ids": list(self._update_ids),
            "site_ids": list(self._site_ids),
            "server_optimizer": self.server_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume mid-buffer; a buffer at or over a smaller new K is applied by the next :meth:`add`.

        The buffered sum means something else with and without example weighting, so a checkpoint written with
        the other setting is refused (one from before the option existed counts as unweighted).
        """
        self._check_state_owner(state)
        example_weighted = state.get("example_weighted", False)
        if example_weighted != self.example_weighted:
            raise AggregationError(
                f"checkpoint was written with example_weighted={example_weighted}, "
                f"the config says {self.example_weighted}"
            )
        aggregator = state.get("aggregator", "mean")
        if aggregator != self.aggregator:
            raise AggregationError(
                f"checkpoint was written with aggregator {aggregator!r}, the config says {self.aggregator!r}"
            )
        raw_deltas = state.get("deltas", [])
        if not isinstance(raw_deltas, list):
            raise AggregationError("checkpoint field 'deltas' is not a list")
        deltas = [params_from_state(delta, "deltas") for delta in raw_deltas]
        weighted_sum = params_from_state(state.get("weighted_delta_sum"), "weighted_delta_sum")
        update_ids = string_list_from_state(state.get("update_ids"), "update_ids")
        site_ids = string_list_from_state(state.get("site_ids"), "site_ids")
        delta_examples = state.get("delta_examples", [0] * len(deltas))
        if not isinstance(delta_examples, list) or not all(
            isinstance(count, int) and not isinstance(count, bool) and count >= 0 for count in delta_examples
        ):
            raise AggregationError("checkpoint field 'delta_examples' is not a list of counts >= 0")
        if not self._keeps_deltas:
            inconsistent = bool(update_ids) != bool(weighted_sum) or bool(deltas)
        else:
            inconsistent = len(deltas) != len(update_ids) or len(delta_examples) != len(deltas) or bool(weighted_sum)
        if len(update_ids) != len(site_ids) or inconsistent:
            raise AggregationError("checkpoint buffer is inconsistent: update_ids, site_ids and sum disagree")
        buffered_examples = state.get("buffered_examples", 0)
        if isinstance(buffered_examples, bool) or not isinstance(buffered_examples, int) or buffered_examples < 0:
            raise AggregationError(f"checkpoint field 'buffered_examples' must be >= 0, got {buffered_examples!r}")
        if self.example_weighted and bool(update_ids) != (buffered_examples > 0):
            raise AggregationError("checkpoint buffer is inconsistent: buffered_examples and update_ids disagree")
        optimizer_state = state.get("server_optimizer")
        if not isinstance(optimizer_state, Mapping):
            raise AggregationError("checkpoint field 'server_optimizer' is missing")
        self.server_optimizer.load_state_dict(optimizer_state)
        self._load_screen_state(state)
        self._deltas, self._delta_examples = deltas, delta_examples
        self._weighted_delta_sum, self._buffered_examples = weighted_sum, buffered_examples
        self._update_ids, self._site_ids = update_ids, site_ids
