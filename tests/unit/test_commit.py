"""Group commit and crash safety: nothing is acked before it is durable, and a restart resumes where it left off.

Driven through the coordinator and the in-memory broker, like ``test_coordinator_service``; a crash is a dropped
connection plus a new process built from the same state directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from broker.memory import MemoryBroker, MemoryTransport
from broker.topology import Exchange, Kind, Queue, routing_key, site_inbox, site_update_queue
from coordinator.audit import read_records, verify_chain
from coordinator.commit import COMMIT_MAX_DELAY_SECONDS
from coordinator.config import CoordinatorConfig
from coordinator.errors import StorageError
from coordinator.runner import build_coordinator
from coordinator.service import Coordinator
from schemas import GlobalModel, ModelUpdate
from tests.unit.test_coordinator_service import (
    COORDINATOR_LOGIN,
    SITES,
    Federation,
    fedbuff,
    make_update,
    rejection_counts,
    start_federation,
    sync_fedavg,
)

# ------------------------------------------------------------------------------------------- crash safety


StrategyChoice = tuple[str, dict[str, Any]]
FEDBUFF_ADAM: StrategyChoice = ("fedbuff", {"buffer_size": 3, "server_optimizer": {"name": "adam"}})


def heart_config(state_dir: Path, strategy: StrategyChoice = FEDBUFF_ADAM, max_staleness: int = 5) -> CoordinatorConfig:
    name, params = strategy
    return CoordinatorConfig(
        task="heart-disease",
        sites=SITES,
        state_dir=state_dir,
        strategy={"name": name, "max_staleness": max_staleness, **params},
        signing={"required": False},  # these updates are unsigned; signatures are tested in test_signing.py
    )


def fedbuff_bases(index: int) -> int:
    """With K = 3 the model is at version index // 3; every other update is one version behind."""
    return max(0, index // 3 - index % 2)


def heart_updates(count: int, base_version: Callable[[int], int] = fedbuff_bases) -> list[ModelUpdate]:
    """Seeded deltas for the heart-disease model (13 weights + 1 bias), round-robin over the sites."""
    generator = torch.Generator().manual_seed(7)
    updates = []
    for index in range(count):
        update_delta = {
            "linear.weight": torch.randn(1, 13, generator=generator) * 0.1,
            "linear.bias": torch.randn(1, generator=generator) * 0.1,
        }
        site = SITES[index % len(SITES)]
        updates.append(
            make_update(
                site, seq=index + 1, base_version=base_version(index), update_delta=update_delta, num_examples=20
            )
        )
    return updates


@dataclass
class Run:
    """A coordinator process, as far as a crash test cares: it holds a connection and an open audit log."""

    coordinator: Coordinator
    transport: MemoryTransport
    registry: CollectorRegistry

    def crash(self) -> None:
        """Like SIGKILL: the connection drops (unacked deliveries return) and nothing else happens."""
        self.transport.close()
        self.coordinator.audit.close()


def start_run(config: CoordinatorConfig, broker: MemoryBroker) -> Run:
    registry = CollectorRegistry()
    coordinator = build_coordinator(config, registry)
    transport = broker.connect(COORDINATOR_LOGIN)
    coordinator.attach(transport)
    return Run(coordinator, transport, registry)


def publish_update(broker: MemoryBroker, update: ModelUpdate, body: bytes | None = None) -> None:
    broker.connect(update.site_id).publish(
        Exchange.UPDATES.value,
        routing_key(update.site_id, Kind.UPDATE),
        update.encode() if body is None else body,
        user_id=update.site_id,
    )


def new_broker() -> MemoryBroker:
    broker = MemoryBroker()
    broker.declare(SITES)
    return broker


def test_a_restarted_coordinator_resumes_version_params_buffer_and_duplicate_memory(tmp_path: Path) -> None:
    # Prepare: four updates with K = 3: one version made, one update buffered
    broker = new_broker()
    config = heart_config(tmp_path)
    first = start_run(config, broker)
    updates = heart_updates(4)
    for update in updates:
        publish_update(broker, update)
    first.transport.poll(0)
    first.coordinator.commit()
    assert first.coordinator.state.version == 1
    params_before = {name: tensor.clone() for name, tensor in first.coordinator.state.params.items()}
    first.crash()

    # Execute
    second = start_run(config, broker)

    # Assert: the same model, version and buffer
    assert second.coordinator.state.version == 1
    assert second.registry.get_sample_value("fedmq_model_version") == 1
    assert second.registry.get_sample_value("fedmq_buffer_fill") == 1
    assert second.coordinator.strategy.buffered_update_ids() == [updates[3].update_id]
    assert second.coordinator.state.params.keys() == params_before.keys()
    for name, tensor in params_before.items():
        assert torch.equal(second.coordinator.state.params[name], tensor)
    assert GlobalModel.decode(broker.queues[site_inbox("a")].messages[-1].body).version == 1
    # ... and an applied update and a buffered one, sent again, are both copies of applied updates (acked, not
    # applied again), while a new update reusing an applied seq is a duplicate
    publish_update(broker, updates[0])
    publish_update(broker, updates[3])
    publish_update(broker, replace(updates[3], update_id=ModelUpdate.new_id()))
    second.transport.poll(0)
    second.coordinator.commit()
    assert rejection_counts(second.registry) == {("a", "duplicate"): 1.0}
    assert second.registry.get_sample_value("fedmq_updates_redelivered_total", {"site": "a"}) == 2
    assert second.coordinator.state.version == 1
    assert second.coordinator.strategy.buffered_update_ids() == [updates[3].update_id]


INTERRUPTED_RUNS: dict[str, tuple[StrategyChoice, Callable[[int], int], int]] = {
    # strategy, how far behind each update's base is, the version the updates lead to
    "fedbuff-adam": (FEDBUFF_ADAM, fedbuff_bases, 3),
    "fedasync": (("fedasync", {"alpha": 0.6, "staleness": {"function": "hinge"}}), lambda index: index - index % 3, 10),
    "fedavg-sync-adam": (("fedavg-sync", {"server_optimizer": {"name": "adam"}}), lambda index: index // 3, 3),
}


@pytest.mark.parametrize("run_name", list(INTERRUPTED_RUNS))
def test_a_run_interrupted_after_every_update_ends_with_the_uninterrupted_model(tmp_path: Path, run_name: str) -> None:
    # Prepare
    strategy, bases, final_version = INTERRUPTED_RUNS[run_name]
    updates = heart_updates(10, bases)
    steady_broker = new_broker()
    steady = start_run(heart_config(tmp_path / "steady", strategy), steady_broker)
    crashing_broker = new_broker()
    crashing_config = heart_config(tmp_path / "crashing", strategy)

    # Execute: one process for the whole run vs. a new process for each update
    for update in updates:
        publish_update(steady_broker, update)
        steady.transport.poll(0)
        steady.coordinator.commit()
    for update in updates:
        run = start_run(crashing_config, crashing_broker)
        publish_update(crashing_broker, update)
        run.transport.poll(0)
        run.coordinator.commit()
        run.crash()
    resumed = start_run(crashing_config, crashing_broker)

    # Assert: bit-identical models (server optimiser moments, history, buffer included), both audit trails intact
    assert steady.coordinator.state.version == resumed.coordinator.state.version == final_version
    for name, tensor in steady.coordinator.state.params.items():
        assert torch.equal(resumed.coordinator.state.params[name], tensor)
    assert resumed.coordinator.strategy.buffered_update_ids() == steady.coordinator.strategy.buffered_update_ids()
    for state_dir in (tmp_path / "steady", tmp_path / "crashing"):
        report = verify_chain(state_dir / "audit.jsonl")
        assert report.ok and report.records == len(updates)
        records = list(read_records(state_dir / "audit.jsonl"))
        assert [record["update_id"] for record in records] == [update.update_id for update in updates]
        assert {record["outcome"] for record in records} == {"accepted"}


class SimulatedCrash(Exception):
    pass


def test_a_crash_between_checkpoint_and_audit_append_is_repaired_on_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: one update goes through; the second one's audit append never happens
    broker = new_broker()
    config = heart_config(tmp_path)
    first = start_run(config, broker)
    updates = heart_updates(2)
    publish_update(broker, updates[0])
    first.transport.poll(0)
    first.coordinator.commit()

    def crash(record: dict[str, Any]) -> None:
        raise SimulatedCrash

    monkeypatch.setattr(first.coordinator.audit, "append_sealed_batch", crash)
    publish_update(broker, updates[1])
    with pytest.raises(SimulatedCrash):
        first.transport.poll(0)
        first.coordinator.commit()
    first.crash()
    audit_path = tmp_path / "audit.jsonl"
    assert verify_chain(audit_path).records == 1

    # Execute: the restart restores the sealed record, then meets the redelivered (unacked) update
    second = start_run(config, broker)
    second.transport.poll(0)
    second.coordinator.commit()

    # Assert
    assert verify_chain(audit_path).ok
    records = list(read_records(audit_path))
    accepted = [record for record in records if record["update_id"] == updates[1].update_id]
    assert [(record["outcome"], record["reason"]) for record in accepted] == [
        ("accepted", ""),
        ("already-applied", ""),
    ]
    assert accepted[1]["redelivered"] is True
    assert second.coordinator.strategy.buffered_update_ids() == [update.update_id for update in updates]
    assert not broker.queued_updates()
    # not the site's doing: acked and counted apart, neither a rejection nor a dead letter
    assert rejection_counts(second.registry) == {}
    assert second.registry.get_sample_value("fedmq_updates_redelivered_total", {"site": updates[1].site_id}) == 1
    assert not broker.queues[Queue.DEAD_LETTERS.value].messages


def fail_fsync_of(monkeypatch: pytest.MonkeyPatch, part: str) -> None:
    """The disk fills up under ``part`` of the state dir: every fsync of a file there fails with ENOSPC."""
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if part in os.readlink(f"/proc/self/fd/{descriptor}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)


def one_site_updates(count: int, site: str = "a") -> list[ModelUpdate]:
    """``count`` seeded updates from one site, seq 1..count, all on version 0 (K = 3 keeps them within bounds)."""
    generator = torch.Generator().manual_seed(11)
    return [
        make_update(
            site,
            seq=seq,
            base_version=0,
            update_delta={
                "linear.weight": torch.randn(1, 13, generator=generator) * 0.1,
                "linear.bias": torch.randn(1, generator=generator) * 0.1,
            },
            num_examples=20,
        )
        for seq in range(1, count + 1)
    ]


def outcomes_by_update(state_dir: Path) -> dict[str, list[str]]:
    outcomes: dict[str, list[str]] = {}
    for record in read_records(state_dir / "audit.jsonl"):
        outcomes.setdefault(str(record["update_id"]), []).append(str(record["outcome"]))
    return outcomes


@pytest.mark.parametrize("failing", ["checkpoint", "audit.jsonl"])
def test_a_commit_whose_write_fails_acks_nothing_and_the_restart_applies_the_batch_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    # Prepare: two updates committed; then the disk under the checkpoint (or the audit log) fills up
    updates = one_site_updates(6)
    steady_broker = new_broker()
    steady = start_run(heart_config(tmp_path / "steady"), steady_broker)
    for update in updates:
        publish_update(steady_broker, update)
    steady.transport.poll(0)
    steady.coordinator.commit()
    broker = new_broker()
    config = heart_config(tmp_path / "run")
    first = start_run(config, broker)
    for update in updates[:2]:
        publish_update(broker, update)
    first.transport.poll(0)
    first.coordinator.commit()
    fail_fsync_of(monkeypatch, failing)
    for update in updates[2:]:
        publish_update(broker, update)

    # Execute: the commit fails; the process stops (a crash: its connection drops) and a new one starts from disk
    first.transport.poll(0)
    with pytest.raises(StorageError, match="No space left"):
        first.coordinator.commit()
    unacked_after_failure = len(first.transport.unacked)
    first.crash()
    monkeypatch.undo()
    second = start_run(config, broker)
    second.transport.poll(0)
    second.coordinator.commit()

    # Assert: nothing of the failed batch was acked; after the restart every update is applied exactly once (a copy
    # of one the failed commit's checkpoint did hold is acked as already applied) and the model is the steady one
    assert unacked_after_failure == 4
    outcomes = outcomes_by_update(tmp_path / "run")
    assert set(outcomes) == {update.update_id for update in updates}
    assert all(outcome.count("accepted") == 1 for outcome in outcomes.values())
    copies = sum(outcome.count("already-applied") for outcome in outcomes.values())
    assert copies == (4 if failing == "audit.jsonl" else 0)
    assert rejection_counts(second.registry) == {}
    assert second.coordinator.state.version == steady.coordinator.state.version == 2
    for name, tensor in steady.coordinator.state.params.items():
        assert torch.equal(second.coordinator.state.params[name], tensor)
    assert not broker.queued_updates() and not second.transport.unacked
    assert verify_chain(tmp_path / "run" / "audit.jsonl").ok


def test_redeliveries_in_any_order_across_crashes_apply_every_update_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: seqs 1-3 of one site are handled, but their commit fails: none is durable
    updates = one_site_updates(5)
    broker = new_broker()
    config = heart_config(tmp_path)
    first = start_run(config, broker)
    for update in updates[:3]:
        publish_update(broker, update)
    fail_fsync_of(monkeypatch, "checkpoint")
    first.transport.poll(0)
    with pytest.raises(StorageError):
        first.coordinator.commit()
    first.crash()
    monkeypatch.undo()
    for update in updates[3:]:
        publish_update(broker, update)
    queue = broker.queues[site_update_queue("a")].messages
    queue.rotate(-1)  # the broker returns the site's newer updates (seq 2-5) before the redelivered seq 1

    # Execute: a restart handles them in that order; then a crash loses every ack of the next run, and the broker
    # returns all five, newest first, to a third run
    second = start_run(config, broker)
    monkeypatch.setattr(second.transport, "ack", lambda delivery: None)
    second.transport.poll(0)
    second.coordinator.commit()
    version_after_second = second.coordinator.state.version
    second.crash()
    queue.reverse()
    third = start_run(config, broker)
    third.transport.poll(0)
    third.coordinator.commit()

    # Assert: each update accepted once (seq 1 too, though the site's seq 5 came first), each copy acked as applied
    outcomes = outcomes_by_update(tmp_path)
    assert outcomes == {update.update_id: ["accepted", "already-applied"] for update in updates}
    assert rejection_counts(second.registry) == rejection_counts(third.registry) == {}
    assert third.registry.get_sample_value("fedmq_updates_redelivered_total", {"site": "a"}) == 5
    assert third.coordinator.state.version == version_after_second == 1
    assert third.coordinator.state.accepted_total == 5
    assert not queue and not broker.queues[Queue.DEAD_LETTERS.value].messages


# ----------------------------------------------------------------------------------------------- group commit


def arrive(federation: Federation, site: str) -> None:
    """A valid update from ``site`` reaches the queue; the coordinator has not polled yet."""
    update = make_update(site, seq=federation.next_seq(site), base_version=federation.coordinator.state.version)
    federation.broker.connect(site).publish(
        Exchange.UPDATES.value, routing_key(site, Kind.UPDATE), update.encode(), user_id=site
    )


def poll_and_tick(federation: Federation) -> None:
    """One turn of the service loop: deliver what is there, then the between-polls work."""
    federation.transport.poll(0)
    federation.coordinator.tick()


def test_each_update_of_a_batch_is_audited_with_the_digest_of_its_own_bytes(tmp_path: Path) -> None:
    # Prepare: K = 2 and a third update, so the batch holds a new version and a buffered update
    federation = start_federation(tmp_path, fedbuff(buffer_size=2), update_prefetch=8)
    for site in ("a", "b", "c"):
        arrive(federation, site)
    bodies = [delivery.body for delivery in federation.broker.queued_updates()]

    # Execute
    poll_and_tick(federation)

    # Assert: three records in arrival order, each with its body's sha256, chained
    records = federation.audit()
    assert [record["site"] for record in records] == ["a", "b", "c"]
    assert [record["sha256"] for record in records] == [hashlib.sha256(body).hexdigest() for body in bodies]
    assert [record["resulting_version"] for record in records] == [None, 1, None]
    assert verify_chain(federation.state_dir / "audit.jsonl").ok


def test_buffered_updates_gather_until_a_poll_brings_no_more(tmp_path: Path) -> None:
    # Prepare: K = 10, so these updates only fill the buffer; prefetch 8 commits at 4
    federation = start_federation(tmp_path, fedbuff(buffer_size=10), update_prefetch=8)
    arrive(federation, "a")
    arrive(federation, "b")

    # Execute: the poll that delivered them, then one that brought nothing
    poll_and_tick(federation)
    gathering = (len(federation.transport.unacked), len(federation.audit()))
    poll_and_tick(federation)

    # Assert: held (unacked, unaudited) while arriving, committed once the stream paused
    assert gathering == (2, 0)
    assert len(federation.transport.unacked) == 0
    assert [record["outcome"] for record in federation.audit()] == ["accepted", "accepted"]
    checkpoint = federation.coordinator.checkpoints.load()
    assert checkpoint is not None
    assert checkpoint["strategy"]["update_ids"] == [record["update_id"] for record in federation.audit()]


def test_a_batch_that_fills_the_prefetch_window_is_committed_inside_the_poll(tmp_path: Path) -> None:
    # Prepare: K = 10, prefetch 4; three updates delivered without a tick
    federation = start_federation(tmp_path, fedbuff(buffer_size=10), update_prefetch=4)
    for site in ("a", "b", "c"):
        arrive(federation, site)
    federation.transport.poll(0)
    gathering = (len(federation.transport.unacked), len(federation.audit()))

    # Execute: the fourth fills the window
    arrive(federation, "a")
    federation.transport.poll(0)

    # Assert: held while the window had room, committed (and acked, so the broker sends more) once it was full
    assert gathering == (3, 0)
    assert len(federation.transport.unacked) == 0
    assert len(federation.audit()) == 4


def test_a_new_version_is_committed_and_published_at_the_end_of_its_poll(tmp_path: Path) -> None:
    # Prepare: K = 2, prefetch 8
    federation = start_federation(tmp_path, fedbuff(buffer_size=2), update_prefetch=8)
    arrive(federation, "a")
    arrive(federation, "b")

    # Execute: the poll that delivered them keeps going (arrivals), yet a version is waiting
    poll_and_tick(federation)

    # Assert
    assert federation.inbox("c").version == 1
    assert len(federation.transport.unacked) == 0
    checkpoint = federation.coordinator.checkpoints.load()
    assert checkpoint is not None and checkpoint["version"] == 1


def test_a_batch_that_keeps_growing_is_committed_after_the_maximum_delay(tmp_path: Path) -> None:
    # Prepare: one update per poll, never a quiet poll
    federation = start_federation(tmp_path, fedbuff(buffer_size=10), update_prefetch=8)
    arrive(federation, "a")
    poll_and_tick(federation)
    held = len(federation.transport.unacked)

    # Execute: the next update arrives after the maximum delay
    federation.clock.advance(COMMIT_MAX_DELAY_SECONDS)
    arrive(federation, "b")
    poll_and_tick(federation)

    # Assert
    assert held == 1
    assert len(federation.transport.unacked) == 0
    assert len(federation.audit()) == 2


def test_a_round_that_times_out_while_its_batch_gathers_commits_them_together(tmp_path: Path) -> None:
    # Prepare: sync FedAvg over a, b, c with a 60 s round; the round's clock starts at the first tick
    federation = start_federation(tmp_path, sync_fedavg(), max_staleness=0, update_prefetch=8)
    poll_and_tick(federation)
    federation.clock.advance(61.0)

    # Execute: a's update arrives in the poll whose tick times the round out
    arrive(federation, "a")
    poll_and_tick(federation)

    # Assert: the version made from a's update is durable together with a's audit record and a's ack
    checkpoint = federation.coordinator.checkpoints.load()
    assert checkpoint is not None and checkpoint["version"] == 1
    assert [(record["outcome"], record["resulting_version"]) for record in federation.audit()] == [("accepted", None)]
    assert len(federation.transport.unacked) == 0
    assert federation.inbox("b").version == 1


def test_a_commit_the_disk_has_no_room_for_waits_unacked_and_runs_once_there_is_room(tmp_path: Path) -> None:
    # Prepare: the state dir's filesystem is full; K = 1, so the update makes a version
    free = {"bytes": 0}
    federation = start_federation(tmp_path, fedbuff(buffer_size=1), free_space=lambda path: free["bytes"])
    arrive(federation, "a")

    # Execute: two turns of the loop with no room, then room
    poll_and_tick(federation)
    poll_and_tick(federation)
    deferred = (
        len(federation.transport.unacked),
        federation.audit(),
        federation.coordinator.checkpoints.load(),
        federation.inbox("b").version,
    )
    free["bytes"] = 10**12
    poll_and_tick(federation)

    # Assert: not committed (unacked, unaudited, no checkpoint, no new model published) while there was no room,
    # counted and shown; committed as usual at the first tick with room
    assert deferred == (1, [], None, 0)
    assert federation.sample("fedmq_commits_deferred_total") == 2
    assert (federation.sample("fedmq_commit_bytes") or 0) > 0
    assert federation.sample("fedmq_state_dir_reserve_bytes") == 64 * 1024 * 1024
    assert federation.sample("fedmq_state_dir_free_bytes") == 10**12
    assert len(federation.transport.unacked) == 0
    assert [record["outcome"] for record in federation.audit()] == ["accepted"]
    assert federation.inbox("b").version == 1
    assert (federation.sample("fedmq_checkpoint_bytes") or 0) > 0
