"""Staleness-aware aggregation: pure tensor arithmetic with no broker, no clock and no I/O.

The service validates an update (schema, shapes, staleness bound, site identity), turns it into a
:class:`Contribution` and hands it to a :class:`Strategy`. The strategy says whether it refuses it (a reason
string that ends up in a metric, the audit log and the dead-letter queue) and, once it takes it, whether a new
global version results. Keeping this module free of pika and time lets every formula be unit-tested against
hand computations, the way Flower's ``strategy/aggregate.py`` is.

Algorithms, as published:

- FedAsync (Xie, Koyejo, Gupta 2019): ``x_t = (1 - alpha_t) x_{t-1} + alpha_t (x_base + delta)``,
  ``alpha_t = alpha * s(tau)``; every accepted update makes a version.
- FedBuff (Nguyen et al. 2022): buffer K deltas weighted ``s(tau) = 1 / sqrt(1 + tau)``; at K, the
  pseudo-gradient ``sum / K`` goes through a server optimiser (SGD, momentum, or FedOpt's Adam/Yogi/Adagrad
  from Reddi et al. 2021, without bias correction). Opt-in extension (not in the paper):
  ``example_weighted`` weights each delta by its site's example count too, ``sum(n_i s_i delta_i) / sum(n_i)``.
- Synchronous FedAvg: one update per registered site per round, example-weighted, with a round timeout.

Tensors handed in or out are never edited in place: inputs may be read-only views of a message body, and the
checkpoint skips tensors it has written before. The one exception is FedBuff's running sum, which only FedBuff
sees (it hands out copies) and which it adds each update into in place. Arithmetic runs in
float32 (float64 when the parameter is float64, or is an integer buffer such as BatchNorm's
``num_batches_tracked``) and results keep each global parameter's dtype.

Errors::

    AggregationError (ValueError)   a bad configuration, a checkpoint from another strategy, or tensors that
                                    do not line up with the model; the strategy's state is left unchanged
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

Params = dict[str, torch.Tensor]
"""Ordered parameter name -> tensor, as in a ``state_dict``."""

STALENESS_KINDS = ("constant", "polynomial", "hinge")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")
STRATEGY_NAMES = ("fedasync", "fedbuff", "fedavg-sync")

# Refusal reasons a strategy returns from ``check``; the service adds its own (e.g. "too-stale").
REFUSED_SITE_SHARE = "site-share"
REFUSED_WRONG_ROUND = "wrong-round"
REFUSED_ALREADY_IN_ROUND = "already-in-round"
REFUSED_UNKNOWN_SITE = "unknown-site"
REFUSED_NO_EXAMPLES = "no-examples"


class AggregationError(ValueError):
    """Aggregation cannot proceed; raised before any state changes, so nothing is half-applied."""


# ----------------------------------------------------------------------------------------------------
# Pure tensor helpers
# ----------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for speed; float64 keeps float64 models and integer counters exact."""
    if dtype == torch.float64 or not dtype.is_floating_point:
        return torch.float64
    return torch.float32


def _cast_like(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Back to the parameter's dtype; integer buffers are rounded rather than truncated."""
    if dtype.is_floating_point:
        return value.to(dtype)
    if dtype == torch.bool:
        return value != 0
    return torch.round(value).to(dtype)


def _check_compatible(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str) -> None:
    """Name the first mismatch so a rejection reason is readable in the audit log."""
    if reference.keys() != other.keys():
        missing = sorted(set(reference) - set(other))
        unexpected = sorted(set(other) - set(reference))
        raise AggregationError(f"{what} does not match the model: missing {missing}, unexpected {unexpected}")
    for name, tensor in reference.items():
        if other[name].shape != tensor.shape:
            raise AggregationError(
                f"{what}[{name!r}] has shape {tuple(other[name].shape)}, the model has {tuple(tensor.shape)}"
            )


def add_scaled(base: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor], scale: float) -> Params:
    """``base + scale * direction`` as new tensors in ``base``'s dtypes (a delta applied to a model)."""
    _check_compatible(base, direction, "direction")
    result: Params = {}
    for name, tensor in base.items():
        dtype = _compute_dtype(tensor.dtype)
        value = torch.add(tensor.detach().to(dtype), direction[name].detach().to(dtype), alpha=scale)
        result[name] = _cast_like(value, tensor.dtype)
    return result


def accumulate_scaled(accumulator: Params, direction: Mapping[str, torch.Tensor], scale: float) -> None:
    """``accumulator += scale * direction``, in place: only for a running sum its strategy owns and hands out
    as copies (``state_dict``), so no checkpoint or caller ever sees it change. Same result as ``add_scaled``
    into the accumulator's (compute) dtypes, without allocating a new model's worth of memory per update."""
    _check_compatible(accumulator, direction, "direction")
    for name, tensor in accumulator.items():
        tensor.add_(direction[name].detach().to(tensor.dtype), alpha=scale)


def interpolate(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], weight: float) -> Params:
    """``(1 - weight) * start + weight * end`` (FedAsync's mixing), in ``start``'s dtypes.

    ``torch.lerp`` is used because it returns ``start`` exactly where ``start == end``, so a weight in [0, 1]
    never leaves the segment between the two models through rounding.
    """
    _check_compatible(start, end, "end")
    result: Params = {}
    for name, tensor in start.items():
        dtype = _compute_dtype(tensor.dtype)
        value = torch.lerp(tensor.detach().to(dtype), end[name].detach().to(dtype), weight)
        result[name] = _cast_like(value, tensor.dtype)
    return result


def weighted_average(weighted_params: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> Params:
    """``sum(w_i * x_i) / sum(w_i)``, Flower's ``aggregate``; dtypes follow the first entry."""
    if not weighted_params:
        raise AggregationError("weighted_average needs at least one entry")
    weights = [float(weight) for _, weight in weighted_params]
    if any(not math.isfinite(weight) or weight < 0 for weight in weights):
        raise AggregationError(f"weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise AggregationError("weights sum to zero")
    reference = weighted_params[0][0]
    for index, (params, _) in enumerate(weighted_params):
        _check_compatible(reference, params, f"entry {index}")
    result: Params = {}
    for name, tensor in reference.items():
        dtype = _compute_dtype(tensor.dtype)
        accumulated = torch.zeros(tensor.shape, dtype=dtype)
        for (params, _), weight in zip(weighted_params, weights, strict=True):
            accumulated = torch.add(accumulated, params[name].detach().to(dtype), alpha=weight / total)
        result[name] = _cast_like(accumulated, tensor.dtype)
    return result


def l2_norm(params: Mapping[str, torch.Tensor]) -> float:
    """Euclidean norm over all tensors together (update-size metrics and sanity bounds), in float64."""
    squares = sum(float(torch.sum(tensor.detach().to(torch.float64) ** 2)) for tensor in params.values())
    return math.sqrt(squares)


def _zeros_for(params: Mapping[str, torch.Tensor]) -> Params:
    """An accumulator in compute precision, shaped like the model."""
    return {name: torch.zeros(tensor.shape, dtype=_compute_dtype(tensor.dtype)) for name, tensor in params.items()}


def _params_from_state(value: Any, key: str) -> Params:
    if not isinstance(value, Mapping) or not all(
        isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in value.items()
    ):
        raise AggregationError(f"checkpoint field {key!r} is not a map of name -> tensor")
    return {name: tensor.detach().clone() for name, tensor in value.items()}


def _string_list_from_state(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AggregationError(f"checkpoint field {key!r} is not a list of strings")
    return list(value)


# ----------------------------------------------------------------------------------------------------
# Staleness functions
# ----------------------------------------------------------------------------------------------------

_STALENESS_DEFAULTS: Mapping[str, Mapping[str, float]] = {
    "constant": {},
    "polynomial": {"a": 0.5},
    "hinge": {"a": 10.0, "b": 4.0},
}


@dataclass(frozen=True)
class StalenessFunction:
    """s(tau) of FedAsync: how much an update trained ``tau`` versions ago still counts.

    ``constant``: 1; ``polynomial``: ``(tau + 1) ** -a``; ``hinge``: 1 if ``tau <= b`` else
    ``1 / (a (tau - b) + 1)``. Missing parameters take the paper's values (polynomial a=0.5, hinge a=10, b=4);
    FedBuff's ``1 / sqrt(1 + tau)`` is polynomial with a=0.5.
    """

    kind: str = "constant"
    a: float | None = None
    b: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_KINDS:
            raise AggregationError(f"unknown staleness function {self.kind!r}; choose one of {STALENESS_KINDS}")
        defaults = _STALENESS_DEFAULTS[self.kind]
        for parameter in ("a", "b"):
            value = getattr(self, parameter)
            if parameter not in defaults:
                if value is not None:
                    raise AggregationError(f"staleness function {self.kind!r} takes no parameter {parameter!r}")
                continue
            if value is None:
                value = defaults[parameter]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AggregationError(f"staleness parameter {parameter} must be a finite number, got {value!r}")
            if value < 0:
                raise AggregationError(f"staleness parameter {parameter} must be >= 0, got {value}")
            object.__setattr__(self, parameter, float(value))

    def __call__(self, staleness: int) -> float:
        """The weight in (0, 1] for an update ``staleness`` versions behind."""
        if staleness < 0:
            raise AggregationError(f"staleness must be >= 0, got {staleness}")
        if self.kind == "constant":
            return 1.0
        assert self.a is not None  # set by __post_init__ for polynomial and hinge
        if self.kind == "polynomial":
            return float((staleness + 1) ** (-self.a))
        assert self.b is not None
        if staleness <= self.b:
            return 1.0
        return 1.0 / (self.a * (staleness - self.b) + 1.0)

    def __str__(self) -> str:
        parameters = ", ".join(f"{name}={getattr(self, name):g}" for name in _STALENESS_DEFAULTS[self.kind])
        return f"{self.kind}({parameters})"


def staleness_function(name: str, **params: float) -> StalenessFunction:
    """Build from config, e.g. ``staleness_function("hinge", a=10, b=4)``; unknown parameters are refused."""
    unexpected = sorted(set(params) - {"a", "b"})
    if unexpected:
        raise AggregationError(f"staleness function {name!r} takes no parameters {unexpected}")
    return StalenessFunction(name, a=params.get("a"), b=params.get("b"))


# ----------------------------------------------------------------------------------------------------
# Server optimiser (FedAvgM, FedOpt)
# ----------------------------------------------------------------------------------------------------

_DEFAULT_SERVER_LEARNING_RATES: Mapping[str, float] = {
    # Flower's defaults: plain and momentum steps apply the mean delta as is; adaptive steps are normalised
    # per coordinate, so a rate of 1 would move every weight by about 1.
    "sgd": 1.0,
    "momentum": 1.0,
    "adam": 0.1,
    "yogi": 0.01,
    "adagrad": 0.1,
}


class ServerOptimizer:
    """Turns a pseudo-gradient (a mean delta, pointing downhill) into a step: ``x <- x + eta * direction``.

    ``sgd``: direction g. ``momentum``: ``m <- beta m + g``. ``adam``/``yogi``/``adagrad`` (Reddi et al. 2021,
    Algorithm 2, no bias correction): ``m <- b1 m + (1 - b1) g``; ``v`` by Adam ``b2 v + (1 - b2) g^2``, Yogi
    ``v - (1 - b2) g^2 sign(v - g^2)`` or Adagrad ``v + g^2``, starting at ``tau^2``; direction
    ``m / (sqrt(v) + tau)``. Set ``beta1=0`` for Adagrad without momentum.
    """

    def __init__(
        self,
        kind: str = "sgd",
        *,
        learning_rate: float | None = None,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if kind not in SERVER_OPTIMIZERS:
            raise AggregationError(f"unknown server optimiser {kind!r}; choose one of {SERVER_OPTIMIZERS}")
        self.kind = kind
        self.learning_rate = _DEFAULT_SERVER_LEARNING_RATES[kind] if learning_rate is None else learning_rate
        self.momentum = momentum
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise AggregationError(f"server learning rate must be > 0, got {self.learning_rate}")
        for label, value in (("momentum", momentum), ("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise AggregationError(f"server {label} must be in [0, 1), got {value}")
        if not tau > 0:
            raise AggregationError(f"server tau must be > 0, got {tau}")
        self.steps = 0
        self._first_moment: Params = {}
        self._second_moment: Params = {}

    def step(self, params: Mapping[str, torch.Tensor], pseudo_gradient: Mapping[str, torch.Tensor]) -> Params:
        """The next parameters; the moments advance only if the whole step succeeds."""
        _check_compatible(params, pseudo_gradient, "pseudo-gradient")
        first_moment: Params = {}
        second_moment: Params = {}
        result: Params = {}
        for name, tensor in params.items():
            dtype = _compute_dtype(tensor.dtype)
            gradient = pseudo_gradient[name].detach().to(dtype)
            if self.kind == "sgd":
                direction = gradient
            elif self.kind == "momentum":
                previous = self._moment(self._first_moment, name, gradient, 0.0)
                first_moment[name] = self.momentum * previous + gradient
                direction = first_moment[name]
            else:
                previous_first = self._moment(self._first_moment, name, gradient, 0.0)
                previous_second = self._moment(self._second_moment, name, gradient, self.tau**2)
                first_moment[name] = self.beta1 * previous_first + (1.0 - self.beta1) * gradient
                squared = gradient * gradient
                if self.kind == "adam":
                    second = self.beta2 * previous_second + (1.0 - self.beta2) * squared
                elif self.kind == "yogi":
                    second = previous_second - (1.0 - self.beta2) * squared * torch.sign(previous_second - squared)
                else:
                    second = previous_second + squared
                second_moment[name] = second
                direction = first_moment[name] / (torch.sqrt(second) + self.tau)
            value = torch.add(tensor.detach().to(dtype), direction, alpha=self.learning_rate)
            result[name] = _cast_like(value, tensor.dtype)
        self._first_moment = first_moment
        self._second_moment = second_moment
        self.steps += 1
        return result

    @staticmethod
    def _moment(moments: Params, name: str, like: torch.Tensor, initial: float) -> torch.Tensor:
        if name in moments and moments[name].shape == like.shape:
            return moments[name].to(like.dtype)
        if moments:
            raise AggregationError(f"server optimiser state has no moment for {name!r} of shape {tuple(like.shape)}")
        return torch.full(like.shape, initial, dtype=like.dtype)

    def state_dict(self) -> dict[str, Any]:
        """Moments and step count, so a resumed run takes the identical next step."""
        return {
            "kind": self.kind,
            "steps": self.steps,
            "first_moment": dict(self._first_moment),
            "second_moment": dict(self._second_moment),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; another optimiser kind is refused, not reinterpreted."""
        if state.get("kind") != self.kind:
            raise AggregationError(
                f"checkpoint holds server optimiser {state.get('kind')!r}, the config says {self.kind!r}"
            )
        steps = state.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise AggregationError(f"checkpoint field 'steps' must be an integer >= 0, got {steps!r}")
        first_moment = _params_from_state(state.get("first_moment"), "first_moment")
        second_moment = _params_from_state(state.get("second_moment"), "second_moment")
        self.steps, self._first_moment, self._second_moment = steps, first_moment, second_moment


# ----------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Contribution:
    """One validated update, as a strategy sees it; ``staleness`` is ``current_version - base_version``."""

    site_id: str
    update_id: str
    base_version: int
    staleness: int
    num_examples: int
    delta: Params

    def __post_init__(self) -> None:
        if self.staleness < 0:
            raise AggregationError(f"update {self.update_id}: staleness must be >= 0, got {self.staleness}")
        if self.num_examples < 0:
            raise AggregationError(f"update {self.update_id}: num_examples must be >= 0, got {self.num_examples}")


class Strategy(ABC):
    """How accepted updates become global versions. One instance per run, called from one thread.

    The service calls :meth:`check`, then :meth:`add` for an accepted update, and :meth:`flush` on every timer
    tick. Before either call it reads :meth:`buffered_update_ids`: when the call returns parameters, the new
    version holds exactly those ids (plus the added one), which the audit log records.
    """

    name: ClassVar[str]

    def check(self, contribution: Contribution, version: int) -> str | None:
        """A strategy-specific refusal reason for an update at global ``version``, or None to accept it."""
        return None

    @abstractmethod
    def add(
        self, global_params: Params, version: int, contribution: Contribution, base_params: Params
    ) -> Params | None:
        """Take one accepted update; return the new global params when a new version results, else None."""

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
        return {"strategy": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` so the next version is the one an uninterrupted run would make."""
        self._check_state_owner(state)

    def _check_state_owner(self, state: Mapping[str, Any]) -> None:
        if state.get("strategy") != self.name:
            raise AggregationError(
                f"checkpoint was written by strategy {state.get('strategy')!r}, this run uses {self.name!r}"
            )

    def _require_accepted(self, contribution: Contribution, version: int) -> None:
        """Guard against a caller skipping :meth:`check`, which would double-count in a round."""
        reason = self.check(contribution, version)
        if reason is not None:
            raise AggregationError(f"update {contribution.update_id} was refused ({reason}); call check() first")


class FedAsync(Strategy):
    """Xie et al. 2019: mix each update into the model as it arrives, ``alpha_t = alpha * s(tau)``."""

    name: ClassVar[str] = "fedasync"

    def __init__(self, *, alpha: float = 0.6, staleness: StalenessFunction | None = None) -> None:
        if not (math.isfinite(alpha) and 0.0 < alpha <= 1.0):
            raise AggregationError(f"fedasync alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.staleness = staleness if staleness is not None else StalenessFunction("polynomial")

    def mixing_weight(self, staleness: int) -> float:
        """``alpha_t``, exposed for the audit log and metrics."""
        return self.alpha * self.staleness(staleness)

    def add(
        self, global_params: Params, version: int, contribution: Contribution, base_params: Params
    ) -> Params | None:
        """``x_t = (1 - alpha_t) x_{t-1} + alpha_t (x_base + delta)``; every update makes a version."""
        self._require_accepted(contribution, version)
        _check_compatible(global_params, base_params, "base parameters")
        local_model = add_scaled(base_params, contribution.delta, 1.0)
        return interpolate(global_params, local_model, self.mixing_weight(contribution.staleness))


class FedBuff(Strategy):
    """Nguyen et al. 2022: buffer K weighted deltas, then step the server optimiser with their mean.

    ``example_weighted=True`` is our extension, off by default: each delta also counts in proportion to the
    site's ``num_examples``, as in FedAvg, and the pseudo-gradient is ``sum(n_i s(tau_i) delta_i) / sum(n_i)``.
    With equal ``n_i`` that is the paper's ``sum(s(tau_i) delta_i) / K`` exactly, and staleness still shrinks
    the step. Without it, a 30-patient hospital pulls the model as hard as a 200-patient one, so on unequal
    sites the published rule optimises a per-site (not per-patient) average of the losses.
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
    ) -> None:
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise AggregationError(f"fedbuff buffer_size must be an integer >= 1, got {buffer_size!r}")
        if not (math.isfinite(max_site_share) and 0.0 < max_site_share <= 1.0):
            raise AggregationError(f"fedbuff max_site_share must be in (0, 1], got {max_site_share}")
        if not isinstance(example_weighted, bool):
            raise AggregationError(f"fedbuff example_weighted must be true or false, got {example_weighted!r}")
        self.buffer_size = buffer_size
        self.staleness = staleness if staleness is not None else StalenessFunction("polynomial", a=0.5)
        self.max_site_share = max_site_share
        # Rounded first so that 0.3 * 10 (= 3.0000000000000004 in floats) allows 3 updates, not 4.
        self.max_updates_per_site = math.ceil(round(max_site_share * buffer_size, 9))
        self.server_optimizer = server_optimizer if server_optimizer is not None else ServerOptimizer("sgd")
        self.example_weighted = example_weighted
        self._weighted_delta_sum: Params = {}
        self._buffered_examples = 0
        self._update_ids: list[str] = []
        self._site_ids: list[str] = []

    def check(self, contribution: Contribution, version: int) -> str | None:
        """Refuse ``"site-share"`` once a site holds ``ceil(max_site_share * K)`` places in the buffer, and, when
        example-weighted, ``"no-examples"`` for an update that has no examples to weight it by."""
        if self._site_ids.count(contribution.site_id) >= self.max_updates_per_site:
            return REFUSED_SITE_SHARE
        if self.example_weighted and contribution.num_examples <= 0:
            return REFUSED_NO_EXAMPLES
        return None

    def add(
        self, global_params: Params, version: int, contribution: Contribution, base_params: Params
    ) -> Params | None:
        """Buffer ``s(tau) * delta`` (times ``n`` when example-weighted); at K, step with the pseudo-gradient
        ``sum / K`` (``sum / sum(n)``) and empty the buffer."""
        self._require_accepted(contribution, version)
        _check_compatible(global_params, contribution.delta, "delta")
        if not self._weighted_delta_sum:
            self._weighted_delta_sum = _zeros_for(global_params)
        examples = contribution.num_examples if self.example_weighted else 0
        weight = self.staleness(contribution.staleness) * (examples if self.example_weighted else 1)
        accumulate_scaled(self._weighted_delta_sum, contribution.delta, weight)
        self._buffered_examples += examples
        if len(self._update_ids) + 1 < self.buffer_size:
            self._update_ids.append(contribution.update_id)
            self._site_ids.append(contribution.site_id)
            return None
        normaliser = self._buffered_examples if self.example_weighted else len(self._update_ids) + 1
        weighted_sum = self._weighted_delta_sum
        pseudo_gradient = add_scaled(_zeros_for(weighted_sum), weighted_sum, 1.0 / normaliser)
        new_params = self.server_optimizer.step(global_params, pseudo_gradient)
        self._weighted_delta_sum, self._buffered_examples, self._update_ids, self._site_ids = {}, 0, [], []
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
        weighted_sum = _params_from_state(state.get("weighted_delta_sum"), "weighted_delta_sum")
        update_ids = _string_list_from_state(state.get("update_ids"), "update_ids")
        site_ids = _string_list_from_state(state.get("site_ids"), "site_ids")
        if len(update_ids) != len(site_ids) or bool(update_ids) != bool(weighted_sum):
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
        self._weighted_delta_sum, self._buffered_examples = weighted_sum, buffered_examples
        self._update_ids, self._site_ids = update_ids, site_ids


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
    ) -> None:
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

    def set_sites(self, sites: Iterable[str]) -> None:
        """Replace the registered sites; a round already holding every remaining site completes at the next
        :meth:`flush`."""
        self._sites = frozenset(sites)

    def check(self, contribution: Contribution, version: int) -> str | None:
        """Refuse an unregistered site, a base version other than the current one, a second update from a site
        in this round, or an update with no examples to weight it by."""
        if contribution.site_id not in self._sites:
            return REFUSED_UNKNOWN_SITE
        if contribution.base_version != version:
            return REFUSED_WRONG_ROUND
        if self._round_version == version and contribution.site_id in self._site_ids:
            return REFUSED_ALREADY_IN_ROUND
        if contribution.num_examples <= 0:
            return REFUSED_NO_EXAMPLES
        return None

    def add(
        self, global_params: Params, version: int, contribution: Contribution, base_params: Params
    ) -> Params | None:
        """Add ``n_i * delta_i`` to the round; when every registered site is in, aggregate."""
        self._require_accepted(contribution, version)
        _check_compatible(global_params, contribution.delta, "delta")
        self._start_round_if_new(version)
        accumulator = self._weighted_delta_sum or _zeros_for(global_params)
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
        weighted_sum = _params_from_state(state.get("weighted_delta_sum"), "weighted_delta_sum")
        update_ids = _string_list_from_state(state.get("update_ids"), "update_ids")
        site_ids = _string_list_from_state(state.get("site_ids"), "site_ids")
        if len(update_ids) != len(site_ids) or bool(update_ids) != bool(weighted_sum):
            raise AggregationError("checkpoint round is inconsistent: update_ids, site_ids and sum disagree")
        optimizer_state = state.get("server_optimizer")
        if not isinstance(optimizer_state, Mapping):
            raise AggregationError("checkpoint field 'server_optimizer' is missing")
        self.server_optimizer.load_state_dict(optimizer_state)
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
        mean_delta = add_scaled(_zeros_for(weighted_delta_sum), weighted_delta_sum, 1.0 / total_examples)
        new_params = self.server_optimizer.step(global_params, mean_delta)
        self._round_version, self._round_started_at = None, None
        self._weighted_delta_sum, self._total_examples = {}, 0
        self._update_ids, self._site_ids = [], []
        return new_params


# ----------------------------------------------------------------------------------------------------
# Construction from flat config
# ----------------------------------------------------------------------------------------------------

_STALENESS_KEYS = ("staleness", "staleness_a", "staleness_b")
_OPTIMIZER_KEYS = (
    "server_optimizer",
    "server_learning_rate",
    "server_momentum",
    "server_beta1",
    "server_beta2",
    "server_tau",
)
_STRATEGY_KEYS: Mapping[str, tuple[str, ...]] = {
    "fedasync": ("alpha", *_STALENESS_KEYS),
    "fedbuff": ("buffer_size", "max_site_share", "example_weighted", *_STALENESS_KEYS, *_OPTIMIZER_KEYS),
    "fedavg-sync": ("sites", "round_timeout_seconds", "min_updates", *_OPTIMIZER_KEYS),
}


def build_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy from the flat keys of a config table, e.g.
    ``build_strategy("fedbuff", buffer_size=5, staleness="hinge", staleness_a=10, server_optimizer="adam")``.

    Unknown keys are refused by name, so a typo in the config fails at start-up rather than being ignored.
    """
    if name not in _STRATEGY_KEYS:
        raise AggregationError(f"unknown strategy {name!r}; choose one of {STRATEGY_NAMES}")
    unexpected = sorted(set(params) - set(_STRATEGY_KEYS[name]))
    if unexpected:
        raise AggregationError(f"strategy {name!r} takes no parameters {unexpected}")
    options = {key: value for key, value in params.items() if key not in _STALENESS_KEYS + _OPTIMIZER_KEYS}
    if name != "fedavg-sync":
        options["staleness"] = _staleness_from_params(params)
    if name != "fedasync":
        options["server_optimizer"] = _server_optimizer_from_params(params)
    try:
        if name == "fedasync":
            return FedAsync(**options)
        if name == "fedbuff":
            return FedBuff(**options)
        return SyncFedAvg(**options)
    except TypeError as exc:
        raise AggregationError(f"strategy {name!r}: {exc}") from exc


def _staleness_from_params(params: Mapping[str, Any]) -> StalenessFunction | None:
    chosen = params.get("staleness")
    if isinstance(chosen, StalenessFunction):
        if "staleness_a" in params or "staleness_b" in params:
            raise AggregationError("give staleness_a/staleness_b with a staleness name, not a StalenessFunction")
        return chosen
    if chosen is None:
        if "staleness_a" in params or "staleness_b" in params:
            raise AggregationError("staleness_a/staleness_b need a staleness function name")
        return None
    shape = {key: params[f"staleness_{key}"] for key in ("a", "b") if f"staleness_{key}" in params}
    return staleness_function(str(chosen), **shape)


def _server_optimizer_from_params(params: Mapping[str, Any]) -> ServerOptimizer | None:
    chosen = params.get("server_optimizer")
    settings = {
        keyword: params[key]
        for key, keyword in (
            ("server_learning_rate", "learning_rate"),
            ("server_momentum", "momentum"),
            ("server_beta1", "beta1"),
            ("server_beta2", "beta2"),
            ("server_tau", "tau"),
        )
        if key in params
    }
    if isinstance(chosen, ServerOptimizer):
        if settings:
            raise AggregationError("give server_* settings with a server optimiser name, not an instance")
        return chosen
    return ServerOptimizer("sgd" if chosen is None else str(chosen), **settings)
