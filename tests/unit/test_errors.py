"""One exception root per package, and one vocabulary of rejection reasons."""

from __future__ import annotations

import pytest

from broker.errors import BrokerError
from broker.topology import TopologyError, validate_site_id
from coordinator.aggregation import AggregationError, FedBuff, SyncFedAvg
from coordinator.checkpoint import CheckpointError
from coordinator.errors import STORAGE_ERRORS, AuditError, CoordinatorError, StorageError
from coordinator.reasons import Reason
from tests.unit.test_aggregation import contribution, params


@pytest.mark.parametrize("error", [AggregationError, CheckpointError, AuditError, StorageError])
def test_every_coordinator_error_has_the_one_root(error: type[Exception]) -> None:
    assert issubclass(error, CoordinatorError)


def test_storage_errors_are_the_ones_a_handler_guard_lets_through() -> None:
    assert issubclass(CheckpointError, STORAGE_ERRORS) and issubclass(AuditError, STORAGE_ERRORS)
    assert issubclass(OSError, STORAGE_ERRORS)
    assert not issubclass(AggregationError, STORAGE_ERRORS)


def test_an_invalid_site_id_is_a_broker_error() -> None:
    with pytest.raises(BrokerError):
        validate_site_id("All Sites")
    assert issubclass(TopologyError, ValueError)


def test_strategies_refuse_with_the_shared_reasons() -> None:
    sync = SyncFedAvg(sites=["a"])
    weighted = FedBuff(buffer_size=2, example_weighted=True)

    stranger = sync.check(contribution(params(1.0, 1.0), site_id="zz"), 0)
    no_examples = weighted.check(contribution(params(1.0, 1.0), num_examples=0), 0)

    assert stranger is Reason.UNKNOWN_SITE
    assert no_examples is Reason.NO_EXAMPLES
