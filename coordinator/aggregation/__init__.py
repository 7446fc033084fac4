"""Staleness-aware aggregation: pure tensor arithmetic with no broker, no clock and no I/O.

The service validates an update (schema, shapes, staleness bound, site identity), turns it into a
:class:`Contribution` and hands it to a :class:`Strategy`. The strategy says whether it refuses it (a
``coordinator.reasons.Reason`` that ends up in a metric, the audit log and the dead-letter queue) and, once it
takes it, whether a new global version results. Keeping this package free of pika and time lets every formula be
unit-tested against hand computations, the way Flower's ``strategy/aggregate.py`` is.

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

Errors: ``AggregationError`` (in ``coordinator.errors``, re-exported here): a bad configuration, a checkpoint from
another strategy, or tensors that do not line up with the model; the strategy's state is left unchanged.
"""

from coordinator.aggregation.base import Contribution, Strategy
from coordinator.aggregation.fedasync import FedAsync
from coordinator.aggregation.fedbuff import FedBuff
from coordinator.aggregation.server_optimizer import SERVER_OPTIMIZERS, ServerOptimizer
from coordinator.aggregation.staleness import STALENESS_KINDS, StalenessFunction, staleness_function
from coordinator.aggregation.sync_fedavg import SyncFedAvg
from coordinator.aggregation.tensor_math import (
    Params,
    accumulate_scaled,
    add_scaled,
    interpolate,
)
from coordinator.errors import AggregationError

__all__ = [
    "SERVER_OPTIMIZERS",
    "STALENESS_KINDS",
    "AggregationError",
    "Contribution",
    "FedAsync",
    "FedBuff",
    "Params",
    "ServerOptimizer",
    "StalenessFunction",
    "Strategy",
    "SyncFedAvg",
    "accumulate_scaled",
    "add_scaled",
    "interpolate",
    "staleness_function",
]
