"""The topology's names and the permission regexes RabbitMQ will enforce, checked without a broker.

RabbitMQ matches permission regexes with "search" semantics (``re.search``), so the anchors in topology.py
are what keeps hospital-a from matching hospital-ab; these tests apply the regexes the way the broker does.
"""

from __future__ import annotations

import re

import pytest

from broker import topology
from broker.topology import Exchange, Kind, Queue


def allowed(pattern: str, name: str) -> bool:
    """``re.search`` as RabbitMQ's PCRE would: PCRE's ``\\z`` (the very end) is spelled ``\\Z`` in Python."""
    return re.search(pattern.replace(r"\z", r"\Z"), name) is not None


def test_site_may_write_only_to_the_update_and_status_exchanges() -> None:
    # Execute
    permissions = topology.site_permissions("hospital-a")

    # Assert
    writable = {exchange for exchange in Exchange if allowed(permissions.write, exchange.value)}
    assert writable == {Exchange.UPDATES, Exchange.STATUS}
    assert set(permissions.topic_write) == {Exchange.UPDATES.value, Exchange.STATUS.value}


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("site.hospital-a.update", True),
        ("site.hospital-a.heartbeat", True),
        ("site.hospital-a.eval", True),
        ("site.hospital-b.update", False),
        ("site.hospital-ab.update", False),
        ("site.all.update", False),
        ("site.hospital-a.update.extra", False),
        ("xsite.hospital-a.update", False),
        ("site.hospital-a", False),
        ("site.hospital-a.update\n", False),
    ],
)
def test_site_routing_keys_are_limited_to_its_own_id(key: str, expected: bool) -> None:
    # Execute
    rules = topology.site_permissions("hospital-a").topic_write

    # Assert
    assert all(allowed(pattern, key) == expected for pattern in rules.values())


@pytest.mark.parametrize(
    ("queue", "expected"),
    [
        (topology.site_inbox("hospital-a"), True),
        (topology.site_control_queue("hospital-a"), True),
        (topology.site_inbox("hospital-b"), False),
        (topology.site_inbox("hospital-ab"), False),
        (topology.site_update_queue("hospital-a"), False),
        (topology.site_inbox("hospital-a") + "\n", False),
        (Queue.COORDINATOR_STATUS.value, False),
        (Queue.DEAD_LETTERS.value, False),
        (Exchange.MODELS.value, False),
    ],
)
def test_site_may_read_only_its_own_queues(queue: str, expected: bool) -> None:
    assert allowed(topology.site_permissions("hospital-a").read, queue) == expected


def test_site_may_configure_nothing() -> None:
    # Prepare
    names = [exchange.value for exchange in Exchange] + [queue.value for queue in Queue]
    names += [topology.site_inbox("hospital-a"), "fedmq.site.hospital-a.sneaky", "amq.gen-abc", "\n"]

    # Execute
    configure = topology.site_permissions("hospital-a").configure

    # Assert
    assert not any(allowed(configure, name) for name in names)


def test_coordinator_may_configure_write_and_read_every_fedmq_name() -> None:
    # Prepare
    names = [exchange.name for exchange in topology.EXCHANGES] + [queue.name for queue in topology.SHARED_QUEUES]
    names += [queue.name for queue in topology.site_queues("hospital-a")]

    # Execute
    permissions = topology.coordinator_permissions()

    # Assert
    for pattern in (permissions.configure, permissions.write, permissions.read):
        assert all(allowed(pattern, name) for name in names)
        assert not allowed(pattern, "amq.direct")


def test_every_binding_joins_a_declared_queue_to_a_declared_exchange() -> None:
    # Prepare
    exchanges = {exchange.name for exchange in topology.EXCHANGES}
    queues = {queue.name for queue in topology.SHARED_QUEUES} | {
        queue.name for queue in topology.site_queues("hospital-a")
    }

    # Execute
    bindings = topology.SHARED_BINDINGS + topology.site_bindings("hospital-a")

    # Assert
    assert all(binding.exchange in exchanges and binding.queue in queues for binding in bindings)
    assert {binding.queue for binding in bindings} == queues


def test_a_site_inbox_receives_its_own_and_broadcast_models_only() -> None:
    # Execute
    keys = {
        binding.routing_key
        for binding in topology.site_bindings("hospital-a")
        if binding.queue == topology.site_inbox("hospital-a")
    }

    # Assert
    assert keys == {topology.routing_key("hospital-a", Kind.MODEL), topology.routing_key("all", Kind.MODEL)}


def test_routing_keys_have_the_documented_form() -> None:
    assert topology.routing_key("hospital-a", Kind.UPDATE) == "site.hospital-a.update"


@pytest.mark.parametrize("site_id", ["", "Hospital-A", "hospital_a", "hospital.a", "-a", "all", "guest", "a" * 64])
def test_unusable_site_ids_are_rejected_with_the_reason(site_id: str) -> None:
    with pytest.raises(topology.TopologyError, match="invalid site id"):
        topology.site_permissions(site_id)


def test_each_site_has_a_bounded_update_queue_bound_by_its_own_key_only() -> None:
    # Execute
    (queue,) = [spec for spec in topology.site_queues("hospital-a") if spec.name == "fedmq.updates.hospital-a"]
    keys = {
        (binding.exchange, binding.routing_key)
        for binding in topology.site_bindings("hospital-a")
        if binding.queue == queue.name
    }

    # Assert: what does not fit is refused to its publisher (a nack), never dropped in silence
    assert keys == {(Exchange.UPDATES.value, "site.hospital-a.update")}
    assert queue.arguments["x-max-length"] == topology.SITE_UPDATE_QUEUE_LENGTH
    assert queue.arguments["x-max-length-bytes"] == topology.SITE_UPDATE_QUEUE_BYTES
    assert queue.arguments["x-overflow"] == "reject-publish"
    assert queue.arguments["x-queue-type"] == "quorum"


def test_no_shared_queue_takes_every_sites_updates() -> None:
    assert not [binding for binding in topology.SHARED_BINDINGS if binding.exchange == Exchange.UPDATES.value]


def test_the_dead_letter_queue_is_bounded_and_keeps_the_newest() -> None:
    (queue,) = [spec for spec in topology.SHARED_QUEUES if spec.name == Queue.DEAD_LETTERS.value]
    assert queue.arguments["x-max-length"] == topology.DEAD_LETTER_MAX_LENGTH
    assert queue.arguments["x-max-length-bytes"] == topology.DEAD_LETTER_MAX_BYTES
    assert queue.arguments["x-overflow"] == "drop-head"


def test_the_update_queue_sets_its_delivery_limit_explicitly_and_out_of_reach_of_a_crash_loop() -> None:
    # Prepare
    (updates,) = [spec for spec in topology.site_queues("hospital-a") if spec.name == "fedmq.updates.hospital-a"]

    # Assert: explicit (RabbitMQ 3.x has no default limit, 4.x one of 20; 3.x refuses -1), and no restart loop
    # returns an update a million times, so the broker never dead-letters a valid update for crashes
    limit = updates.arguments["x-delivery-limit"]
    assert isinstance(limit, int) and limit >= 1_000_000
    assert updates.arguments["x-queue-type"] == "quorum"
