"""Flood control without a broker: each site's update queue is bounded and consumed beside the others' queues."""

from __future__ import annotations

from pathlib import Path

from broker import topology
from broker.topology import Exchange, Kind, routing_key
from broker.transport import PublishRefused
from coordinator.service import update_prefetch_per_site
from tests.unit.test_coordinator_service import fedbuff, make_update, rejection_counts, start_federation


def test_a_flood_stays_in_the_flooding_sites_queue_and_honest_updates_are_not_stale(tmp_path: Path) -> None:
    # Prepare: every update makes a version (K = 1); staleness above 20 is refused
    federation = start_federation(tmp_path, fedbuff(buffer_size=1), max_staleness=20)
    flooder = federation.broker.connect("a")
    refused = 0

    # Execute: site a publishes 40 valid updates while the coordinator is busy, then b sends one on the same version
    for seq in range(1, 41):
        body = make_update("a", seq=seq, base_version=0).encode()
        try:
            flooder.publish(Exchange.UPDATES.value, routing_key("a", Kind.UPDATE), body, user_id="a")
        except PublishRefused:
            refused += 1
    honest = make_update("b", seq=1, base_version=0)
    federation.broker.connect("b").publish(
        Exchange.UPDATES.value, routing_key("b", Kind.UPDATE), honest.encode(), user_id="b"
    )
    for _ in range(10):
        federation.transport.poll(0)
        federation.coordinator.commit()

    # Assert: the excess was refused to its sender, and b's update was applied, not refused as stale
    assert refused == 40 - topology.SITE_UPDATE_QUEUE_LENGTH
    assert rejection_counts(federation.registry) == {}
    applied = [record for record in federation.audit() if record["outcome"] == "accepted"]
    assert [record["site"] for record in applied].count("a") == topology.SITE_UPDATE_QUEUE_LENGTH
    (honest_record,) = [record for record in applied if record["site"] == "b"]
    assert honest_record["staleness"] <= update_prefetch_per_site(16, 3)


def test_each_site_gets_its_share_of_the_prefetch_window() -> None:
    assert update_prefetch_per_site(16, 3) == 6
    assert update_prefetch_per_site(16, 100) == 1
    assert update_prefetch_per_site(4, 0) == 4
