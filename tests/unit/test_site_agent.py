"""The site agent against the in-memory broker: what a hospital's agent receives, sends, and never sends.

The agent runs as it does in production (``SiteAgent`` on this thread, training on its worker thread); only the
broker is the in-process one and the clock is a fake one that the test moves, so "time passes" without sleeping.
The patient-data tests capture every byte the agent publishes and search it for the site's training records.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from broker.memory import MemoryBroker, MemoryTransport
from broker.topology import BROADCAST_SITE, Exchange, Kind, Queue, routing_key, site_inbox
from broker.transport import Delivery, PublishRefused, TransportConnectionError
from schemas import (
    Control,
    ControlCommand,
    EvalReport,
    GlobalModel,
    Heartbeat,
    Message,
    ModelFingerprint,
    ModelUpdate,
    SiteState,
    TrainingConfig,
    TrainingMetrics,
)
from schemas.tensors import decode_tensor
from site_agent.agent import LocalTrainer, SiteAgent, UpdateCounter
from tasks.base import SiteData, TrainResult, architecture_digest
from tasks.heart_disease import HeartDiseaseTask, load_raw_site, load_site

SITE = "cleveland"
FAST_TRAINING = TrainingConfig(local_steps=10, learning_rate=0.05, batch_size=8)
PUMP_TIMEOUT_SECONDS = 30.0
INCARNATION = 1_764_601_200_000_000_000  # the coordinator's, unless a test restarts or restores it


# ------------------------------------------------------------------------------------------------ test doubles


class FakeClock:
    """The agent's monotonic clock; the pump moves it forward so retraining and heartbeats come due."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingTask(HeartDiseaseTask):
    """The real heart-disease task, remembering which thread trained and the local weights it ended with."""

    def __init__(self) -> None:
        self.train_threads: list[int] = []
        self.local_states: list[dict[str, torch.Tensor]] = []

    def train(
        self, model: torch.nn.Module, data: SiteData, config: TrainingConfig, generator: torch.Generator
    ) -> TrainResult:
        self.train_threads.append(threading.get_ident())
        result = super().train(model, data, config, generator)
        self.local_states.append({name: tensor.detach().clone() for name, tensor in model.state_dict().items()})
        return result


class LeakyTrainer(LocalTrainer):
    """A deliberately broken trainer that smuggles one patient's record into its update."""

    def train(self, model: GlobalModel, seq: int, compression_note: str = "") -> ModelUpdate:
        update = super().train(model, seq, compression_note)
        return replace(update, delta={**update.delta, "extra": self.data.train_features[7].clone()})


class DisconnectingTransport(MemoryTransport):
    """Loses the connection whenever an update is published (the broker never confirms it)."""

    def __init__(self, broker: MemoryBroker, login: str) -> None:
        super().__init__(broker, login)
        self.lost_updates: list[tuple[bytes, str | None]] = []

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: Any = None,
        user_id: str | None = None,
        message_id: str | None = None,
        persistent: bool = True,
        wait: bool = True,
    ) -> None:
        if exchange == Exchange.UPDATES.value:
            self.lost_updates.append((bytes(body), message_id))
            raise TransportConnectionError("connection reset by peer")
        super().publish(
            exchange,
            routing_key,
            body,
            headers=headers,
            user_id=user_id,
            message_id=message_id,
            persistent=persistent,
            wait=wait,
        )


# --------------------------------------------------------------------------------------------------- harness


@dataclass
class Harness:
    """One site agent on a memory broker, with the coordinator's side of the queues at hand."""

    broker: MemoryBroker
    coordinator: MemoryTransport
    site: MemoryTransport
    agent: SiteAgent
    task: RecordingTask
    data: SiteData
    clock: FakeClock
    counter_path: Path
    initial: dict[str, torch.Tensor] = field(default_factory=dict)

    def model(
        self,
        version: int,
        training: TrainingConfig = FAST_TRAINING,
        *,
        incarnation: int = INCARNATION,
        **changes: Any,
    ) -> GlobalModel:
        """Version ``version`` of the global model: the initial weights moved a little per version."""
        tensors = {name: tensor + 0.01 * version for name, tensor in self.initial.items()}
        fingerprint = ModelFingerprint(task=self.task.name, architecture=self.agent.trainer.architecture)
        return GlobalModel(
            version=version,
            tensors=tensors,
            training=training,
            fingerprint=fingerprint,
            incarnation=incarnation,
            **changes,
        )

    def publish_model(self, model: GlobalModel) -> None:
        self.coordinator.publish(Exchange.MODELS.value, routing_key(BROADCAST_SITE, Kind.MODEL), model.encode())

    def publish_control(self, command: ControlCommand, reason: str = "test") -> None:
        control = Control(command=command, reason=reason)
        self.coordinator.publish(Exchange.CONTROL.value, routing_key(BROADCAST_SITE, Kind.CONTROL), control.encode())

    def turn(self, seconds: float = 0.1) -> None:
        """One turn of the runner's loop: deliver, step, let (fake) time pass."""
        self.site.poll(0)
        self.agent.step()
        self.clock.advance(seconds)

    def pump(self, until: Callable[[], bool], *, seconds_per_turn: float = 0.1) -> None:
        deadline = time.monotonic() + PUMP_TIMEOUT_SECONDS
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError("the agent did not get there in time")
            self.turn(seconds_per_turn)
            time.sleep(0.001)  # let the worker thread run

    def pump_turns(self, turns: int, *, seconds_per_turn: float = 0.1) -> None:
        """Run ``turns`` turns, each long enough (in real time) for a short training job to finish."""
        for _ in range(turns):
            self.turn(seconds_per_turn)
            if self.agent.job is not None:
                self.agent.job.result(timeout=PUMP_TIMEOUT_SECONDS)

    def update_deliveries(self) -> list[Delivery]:
        return list(self.broker.queued_updates())

    def updates(self) -> list[ModelUpdate]:
        return [ModelUpdate.decode(delivery.body) for delivery in self.update_deliveries()]

    def status_deliveries(self, kind: Kind) -> list[Delivery]:
        messages = self.broker.queues[Queue.COORDINATOR_STATUS.value].messages
        return [delivery for delivery in messages if delivery.routing_key == routing_key(SITE, kind)]

    def evaluations(self) -> list[EvalReport]:
        return [EvalReport.decode(delivery.body) for delivery in self.status_deliveries(Kind.EVAL)]

    def heartbeats(self) -> list[Heartbeat]:
        return [Heartbeat.decode(delivery.body) for delivery in self.status_deliveries(Kind.HEARTBEAT)]


def make_harness(
    tmp_path: Path,
    *,
    trainer_type: type[LocalTrainer] = LocalTrainer,
    compression: str = "none",
    heartbeat_seconds: float = 1.0,
    retry_max_wait_seconds: float = 30.0,
) -> Harness:
    broker = MemoryBroker()
    broker.declare([SITE])
    task = RecordingTask()
    data = load_site(SITE)
    clock = FakeClock()
    trainer = trainer_type(SITE, task, data, seed=3)
    counter_path = tmp_path / f"{SITE}.agent-state.json"
    agent = SiteAgent(
        trainer,
        UpdateCounter(counter_path),
        heartbeat_seconds=heartbeat_seconds,
        compression=compression,
        retry_max_wait_seconds=retry_max_wait_seconds,
        clock=clock,
    )
    site = broker.connect(SITE)
    agent.attach(site)
    torch.manual_seed(0)
    initial = {name: tensor.detach().clone() for name, tensor in task.build_model().state_dict().items()}
    return Harness(broker, broker.connect("fedmq-coordinator"), site, agent, task, data, clock, counter_path, initial)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    built = make_harness(tmp_path)
    try:
        yield built
    finally:
        built.agent.close()


# ----------------------------------------------------------------------------------------- receive and train


def test_agent_acks_the_model_at_once_and_trains_later_on_its_worker_thread(harness: Harness) -> None:
    # Prepare
    harness.publish_model(harness.model(0))

    # Execute: one delivery round, before any step of the agent's loop
    harness.site.poll(0)

    # Assert: the delivery is acked and gone from the inbox while nothing has been trained yet
    assert harness.site.unacked == {}
    assert not harness.broker.queues[site_inbox(SITE)].messages
    assert harness.task.train_threads == [] and harness.agent.job is None

    # Execute: the loop runs until the first update is out
    harness.pump(lambda: len(harness.updates()) >= 1)

    # Assert: training ran on another thread than the one calling step()
    assert harness.task.train_threads and threading.get_ident() not in harness.task.train_threads


def test_agent_evaluates_each_new_model_and_reports_it(harness: Harness) -> None:
    # Execute
    harness.publish_model(harness.model(0))
    harness.pump(lambda: len(harness.updates()) >= 1)
    harness.publish_model(harness.model(4))
    harness.pump(lambda: len(harness.evaluations()) >= 2)

    # Assert
    reports = harness.evaluations()
    assert [report.model_version for report in reports] == [0, 4]
    assert all(report.site_id == SITE and report.num_examples == harness.data.num_test for report in reports)
    assert all(0.0 <= report.metrics["accuracy"] <= 1.0 for report in reports)
    assert all(delivery.user_id == SITE for delivery in harness.status_deliveries(Kind.EVAL))


def test_a_new_models_evaluation_and_update_leave_in_the_same_turn(harness: Harness) -> None:
    # Prepare: the turn that picks up model v0 starts the worker
    harness.publish_model(harness.model(0))
    harness.turn()
    assert harness.agent.job is not None
    harness.agent.job.result(timeout=PUMP_TIMEOUT_SECONDS)

    # Execute: the next turn
    harness.turn()

    # Assert: evaluated and trained in one go, no turn of the loop in between
    assert [report.model_version for report in harness.evaluations()] == [0]
    assert [update.base_version for update in harness.updates()] == [0]


class FailingEvaluation(LocalTrainer):
    attempts = 0

    def evaluate(self, model: GlobalModel) -> EvalReport:
        FailingEvaluation.attempts += 1
        raise RuntimeError("the test split is unreadable")


def test_a_failed_evaluation_is_logged_training_still_runs_and_it_is_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    harness = make_harness(tmp_path, trainer_type=FailingEvaluation)
    try:
        harness.publish_model(harness.model(0))

        # Execute
        FailingEvaluation.attempts = 0
        with caplog.at_level(logging.ERROR, logger="site_agent.agent"):
            harness.pump(lambda: len(harness.updates()) >= 1)
            harness.pump_turns(5)
    finally:
        harness.agent.close()

    # Assert
    assert harness.evaluations() == []
    assert harness.updates()[0].base_version == 0
    assert FailingEvaluation.attempts == 1
    assert "evaluation of v0 failed: the test split is unreadable" in caplog.text


def test_update_carries_local_minus_base_and_the_sites_identity(harness: Harness) -> None:
    # Prepare
    model = harness.model(2)

    # Execute
    harness.publish_model(model)
    harness.pump(lambda: len(harness.updates()) >= 1)

    # Assert
    delivery = harness.update_deliveries()[0]
    update = ModelUpdate.decode(delivery.body)
    local = harness.task.local_states[0]
    assert (update.site_id, update.base_version, update.seq) == (SITE, 2, 1)
    assert update.num_examples == harness.data.num_train
    assert update.metrics.steps == FAST_TRAINING.local_steps
    assert set(update.delta) == set(model.tensors)
    for name, base in model.tensors.items():
        torch.testing.assert_close(update.delta[name], local[name] - base)
    assert any(float(delta.abs().max()) > 0 for delta in update.delta.values())
    assert delivery.user_id == SITE
    assert delivery.message_id == update.update_id


def test_seq_increases_and_is_persisted_across_a_new_counter(harness: Harness) -> None:
    # Execute: asynchronous strategies let a site keep training on the same version
    harness.publish_model(harness.model(0))
    harness.pump(lambda: len(harness.updates()) >= 3)

    # Assert
    updates = harness.updates()
    assert [update.seq for update in updates[:3]] == [1, 2, 3]
    assert len({update.update_id for update in updates}) == len(updates)
    restarted = UpdateCounter(harness.counter_path)
    assert restarted.next() == harness.agent.counter.last + 1


def test_first_turn_sends_a_heartbeat_with_the_sites_identity(harness: Harness) -> None:
    # Execute
    harness.turn()

    # Assert
    heartbeats = harness.heartbeats()
    assert [(beat.site_id, beat.state) for beat in heartbeats] == [(SITE, SiteState.IDLE)]
    assert heartbeats[0].agent_version == importlib.metadata.version("fedmq")
    assert harness.status_deliveries(Kind.HEARTBEAT)[0].user_id == SITE


@pytest.mark.parametrize("mismatch", ["task", "architecture"])
def test_model_with_a_wrong_fingerprint_is_refused(harness: Harness, mismatch: str) -> None:
    # Prepare
    right = harness.model(0)
    wrong = ModelFingerprint(
        task="image-cnn" if mismatch == "task" else right.fingerprint.task,
        architecture=architecture_digest(torch.nn.Linear(5, 1))
        if mismatch == "architecture"
        else right.fingerprint.architecture,
    )

    # Execute
    harness.publish_model(replace(right, version=7, fingerprint=wrong))
    harness.pump_turns(20)

    # Assert: acked (not redelivered forever) but neither evaluated nor trained
    assert harness.site.unacked == {} and not harness.broker.queues[site_inbox(SITE)].messages
    assert harness.evaluations() == [] and harness.updates() == []
    assert harness.agent.latest is None

    # Execute / Assert: the agent still takes the right model afterwards
    harness.publish_model(right)
    harness.pump(lambda: len(harness.updates()) >= 1)
    assert harness.updates()[0].base_version == 0


def test_train_on_same_version_false_sends_one_update_per_version(harness: Harness) -> None:
    # Prepare
    synchronous = replace(FAST_TRAINING, train_on_same_version=False)

    # Execute: plenty of (fake) time passes on version 0
    harness.publish_model(harness.model(0, synchronous))
    harness.pump_turns(60, seconds_per_turn=1.0)
    on_first_version = harness.updates()
    harness.publish_model(harness.model(1, synchronous))
    harness.pump_turns(60, seconds_per_turn=1.0)

    # Assert
    assert [update.base_version for update in on_first_version] == [0]
    assert [update.base_version for update in harness.updates()] == [0, 1]


# --------------------------------------------------------------------------------------------------- control


def test_pause_resume_and_stop_are_obeyed(harness: Harness) -> None:
    # Prepare: the agent is training away on version 0
    harness.publish_model(harness.model(0))
    harness.pump(lambda: len(harness.updates()) >= 1)

    # Execute: pause, then a new model arrives and time passes
    harness.publish_control(ControlCommand.PAUSE)
    harness.pump(lambda: harness.agent.paused)
    harness.pump(lambda: harness.agent.job is None)
    sent_before_pause = len(harness.updates())
    harness.publish_model(harness.model(1))
    harness.pump_turns(30, seconds_per_turn=1.0)

    # Assert: nothing new is evaluated or trained while paused, and the heartbeat says so
    assert len(harness.updates()) == sent_before_pause
    assert [report.model_version for report in harness.evaluations()] == [0]
    assert harness.heartbeats()[-1].state is SiteState.PAUSED

    # Execute / Assert: resume picks up the newest model
    harness.publish_control(ControlCommand.RESUME)
    harness.pump(lambda: any(update.base_version == 1 for update in harness.updates()))
    assert [report.model_version for report in harness.evaluations()] == [0, 1]

    # Execute / Assert: stop ends the work for good
    harness.publish_control(ControlCommand.STOP, "reached 9 versions")
    harness.pump(lambda: harness.agent.stopped)
    harness.pump(lambda: harness.agent.job is None)
    sent_before_stop = len(harness.updates())
    harness.publish_model(harness.model(2))
    harness.pump_turns(30, seconds_per_turn=1.0)
    assert harness.agent.stop_reason == "reached 9 versions"
    assert len(harness.updates()) == sent_before_stop
    assert 2 not in [report.model_version for report in harness.evaluations()]


# ------------------------------------------------------------------------------------------ lost connections


def test_unconfirmed_update_is_resent_with_the_same_update_id_after_reconnecting(harness: Harness) -> None:
    # Prepare: the agent's connection drops whenever it publishes an update
    flaky = DisconnectingTransport(harness.broker, SITE)
    harness.site.close()
    harness.site = flaky
    harness.agent.attach(flaky)
    harness.publish_model(harness.model(0))

    # Execute: run the loop until the publish fails, as the runner would
    with pytest.raises(TransportConnectionError):
        harness.pump(lambda: False)
    flaky.close()
    reconnected = harness.broker.connect(SITE)
    harness.site = reconnected
    harness.agent.attach(reconnected)
    harness.pump(lambda: len(harness.updates()) >= 1)

    # Assert: the first update the coordinator receives is the one that was lost, byte for byte
    lost_body, lost_message_id = flaky.lost_updates[0]
    first = harness.update_deliveries()[0]
    assert first.body == lost_body
    assert first.message_id == lost_message_id == ModelUpdate.decode(lost_body).update_id
    assert [update.seq for update in harness.updates()].count(1) == 1


# ------------------------------------------------------------------------------------------ refused publishes


class RefusingTransport(MemoryTransport):
    """Refuses every update while ``refusing`` is set, as the broker would with ``reply_code`` (None: a nack)."""

    def __init__(self, broker: MemoryBroker, login: str, reply_code: int | None) -> None:
        super().__init__(broker, login)
        self.reply_code = reply_code
        self.refusing = True
        self.refused: list[str | None] = []  # message ids, one per refused attempt

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: Any = None,
        user_id: str | None = None,
        message_id: str | None = None,
        persistent: bool = True,
        wait: bool = True,
    ) -> None:
        if self.refusing and exchange == Exchange.UPDATES.value:
            self.refused.append(message_id)
            raise PublishRefused("broker refused the update (test)", self.reply_code)
        super().publish(
            exchange,
            routing_key,
            body,
            headers=headers,
            user_id=user_id,
            message_id=message_id,
            persistent=persistent,
            wait=wait,
        )


def refusing(harness: Harness, reply_code: int | None) -> RefusingTransport:
    """Reconnect the harness's agent through a transport that refuses its updates."""
    transport = RefusingTransport(harness.broker, SITE, reply_code)
    harness.site.close()
    harness.site = transport
    harness.agent.attach(transport)
    return transport


def without_update_routes(harness: Harness) -> list[Any]:
    """Unbind the updates exchange (a queue being declared again): publishing an update is refused, 312."""
    removed = [binding for binding in harness.broker.bindings if binding.exchange == Exchange.UPDATES.value]
    harness.broker.bindings = [binding for binding in harness.broker.bindings if binding not in removed]
    return removed


@pytest.mark.parametrize("reply_code", [None, 404], ids=["nack", "exchange-not-found"])
def test_a_refused_update_is_kept_retried_with_backoff_and_delivered_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, reply_code: int | None
) -> None:
    # Prepare: the broker refuses updates (a memory alarm, the topology being declared again)
    harness = make_harness(tmp_path, retry_max_wait_seconds=4.0)
    try:
        transport = refusing(harness, reply_code)
        harness.publish_model(harness.model(0))

        # Execute: 30 s of (fake) time pass, in 60 turns of the loop, then the refusals stop
        with caplog.at_level(logging.WARNING, logger="site_agent.agent"):
            harness.pump(lambda: len(transport.refused) >= 1)
            harness.pump_turns(60, seconds_per_turn=0.5)
        refused_attempts = list(transport.refused)
        transport.refusing = False
        harness.pump(lambda: len(harness.updates()) >= 3)
    finally:
        harness.agent.close()

    # Assert: the first update was retried, spaced by a backoff capped at 4 s (not once per turn) ...
    first_id = refused_attempts[0]
    assert set(refused_attempts) == {first_id}
    assert 6 <= len(refused_attempts) <= 40
    assert "keeping it, retry" in caplog.text and "dropping" not in caplog.text
    # ... and it is the first update the coordinator receives; nothing finished meanwhile was lost
    updates = harness.updates()
    assert updates[0].update_id == first_id
    assert [update.seq for update in updates] == list(range(1, len(updates) + 1))


def test_an_update_refused_for_no_route_goes_out_once_the_queue_is_bound_again(harness: Harness) -> None:
    # Prepare: the updates queue is being declared again; the agent trains and its update has nowhere to go
    removed = without_update_routes(harness)
    harness.publish_model(harness.model(0))
    harness.pump(lambda: harness.agent.refusals >= 2)
    waiting = harness.agent.outbox[0]

    # Execute
    harness.broker.bindings.extend(removed)
    harness.pump(lambda: len(harness.updates()) >= 1)

    # Assert
    assert harness.update_deliveries()[0].message_id == waiting.message_id
    assert harness.updates()[0].seq == 1


def test_access_refused_stops_the_agent_with_a_clear_reason_and_keeps_the_update(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the site was removed from the broker (403 ACCESS_REFUSED on every publish)
    harness = make_harness(tmp_path, retry_max_wait_seconds=1.0)
    try:
        transport = refusing(harness, 403)
        harness.publish_model(harness.model(0))

        # Execute
        with caplog.at_level(logging.ERROR, logger="site_agent.agent"):
            harness.pump(lambda: harness.agent.stopped)
            harness.pump_turns(50)
    finally:
        harness.agent.close()

    # Assert: a few tries, then a stop that says what to do; the update is still held, not dropped
    assert len(transport.refused) == 3
    assert "403" in harness.agent.failure and "fedmq broker add-site" in harness.agent.failure
    assert harness.agent.stop_reason == harness.agent.failure
    assert "stopping: the broker refused update seq 1 on v0 3 times" in caplog.text
    assert harness.agent.outbox[0].message_id == transport.refused[0]
    assert harness.updates() == []


# ------------------------------------------------------------------------------- coordinator incarnations

RESTORED = INCARNATION + 60 * 10**9  # the coordinator restored from a backup, started a minute later


def test_a_model_of_a_newer_incarnation_is_taken_at_a_lower_version_and_the_next_update_is_based_on_it(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the site trains on v5; the coordinator's disk is restored from a backup taken at v2 while the
    # broker holds the site's finished updates (they cannot be routed)
    harness.publish_model(harness.model(5))
    harness.pump(lambda: len(harness.updates()) >= 1)
    removed = without_update_routes(harness)
    harness.pump(lambda: harness.agent.refusals >= 1)
    sent_on_v5 = len(harness.updates())

    # Execute: the restored coordinator publishes v2 of its new incarnation
    with caplog.at_level(logging.INFO, logger="site_agent.agent"):
        harness.publish_model(harness.model(2, incarnation=RESTORED))
        harness.turn()
        harness.broker.bindings.extend(removed)
        harness.pump(lambda: any(update.base_version == 2 for update in harness.updates()))
        harness.pump(lambda: len(harness.evaluations()) >= 2)

    # Assert: the site follows the restored coordinator: the unsent update on v5 is dropped (the restored
    # coordinator never had v5), the next update and evaluation are of the restored v2
    assert harness.agent.latest is not None and harness.agent.latest.identity == (RESTORED, 2)
    after_restore = harness.updates()[sent_on_v5:]
    assert after_restore and all(update.base_version == 2 for update in after_restore)
    assert [report.model_version for report in harness.evaluations()] == [5, 2]
    assert "model v2 received from a new coordinator incarnation" in caplog.text
    assert "dropped 1 unsent message(s) based on versions above v2" in caplog.text


def test_a_restarted_coordinator_at_the_same_version_loses_none_of_the_sites_unsent_work(harness: Harness) -> None:
    # Prepare: an update on v5 waits in the outbox (no route) when the coordinator restarts from its checkpoint
    harness.publish_model(harness.model(5))
    removed = without_update_routes(harness)
    harness.pump(lambda: harness.agent.refusals >= 1)
    waiting = harness.agent.outbox[0]

    # Execute
    harness.publish_model(harness.model(5, incarnation=RESTORED))
    harness.turn()
    harness.broker.bindings.extend(removed)
    harness.pump(lambda: len(harness.updates()) >= 2)

    # Assert: v5 is the same model in both incarnations: the waiting update is sent, first
    assert harness.update_deliveries()[0].message_id == waiting.message_id
    assert harness.agent.latest is not None and harness.agent.latest.identity == (RESTORED, 5)


class GatedTrainer(LocalTrainer):
    """Trains only once the test opens the gate, so a new model can arrive mid-training."""

    gate = threading.Event()
    training = threading.Event()

    def train(self, model: GlobalModel, seq: int, compression_note: str = "") -> ModelUpdate:
        GatedTrainer.training.set()
        assert GatedTrainer.gate.wait(PUMP_TIMEOUT_SECONDS)
        return super().train(model, seq, compression_note)


def test_training_on_a_superseded_incarnations_model_is_dropped_when_it_finishes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the site is training on v7 when the coordinator, restored from a backup at v3, comes back
    GatedTrainer.gate.clear()
    GatedTrainer.training.clear()
    harness = make_harness(tmp_path, trainer_type=GatedTrainer)
    try:
        harness.publish_model(harness.model(7))
        harness.pump(GatedTrainer.training.is_set)
        harness.publish_model(harness.model(3, incarnation=RESTORED))
        harness.turn()

        # Execute
        with caplog.at_level(logging.INFO, logger="site_agent.agent"):
            GatedTrainer.gate.set()
            harness.pump(lambda: len(harness.updates()) >= 1)
    finally:
        GatedTrainer.gate.set()
        harness.agent.close()

    # Assert: nothing based on v7 left the site; its first update is based on the restored v3
    assert harness.updates()[0].base_version == 3
    assert all(update.base_version == 3 for update in harness.updates())
    assert "dropped the training of v7" in caplog.text


def test_a_model_of_an_older_incarnation_is_ignored_whatever_its_version(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the site follows the restored coordinator
    harness.publish_model(harness.model(2, incarnation=RESTORED))
    harness.pump(lambda: len(harness.updates()) >= 1)

    # Execute: models of the incarnation it replaced (an old coordinator still running) keep coming
    with caplog.at_level(logging.WARNING, logger="site_agent.agent"):
        for version in (9, 10):
            harness.publish_model(harness.model(version))
            harness.pump_turns(5)

    # Assert: ignored, said once, and the site keeps training on the restored model
    assert harness.agent.latest is not None and harness.agent.latest.identity == (RESTORED, 2)
    assert {update.base_version for update in harness.updates()} == {2}
    assert [report.model_version for report in harness.evaluations()] == [2]
    assert caplog.text.count(f"ignoring model v9 of coordinator incarnation {INCARNATION}") == 1
    assert "ignoring model v10" not in caplog.text


# -------------------------------------------------------------------------------------------------- slowdown


@pytest.mark.parametrize("slowdown", [1.0, 2.0, 5.0])
def test_slowdown_makes_training_proportionally_longer(slowdown: float) -> None:
    # Prepare: a clock that says the training took 3 s (each reading 3 s after the one before)
    requested_sleeps: list[float] = []
    readings = iter(3.0 * step for step in range(10))
    task = HeartDiseaseTask()
    trainer = LocalTrainer(
        SITE, task, load_site(SITE), slowdown=slowdown, sleep=requested_sleeps.append, clock=lambda: next(readings)
    )
    torch.manual_seed(0)
    model = GlobalModel(
        version=0,
        tensors=dict(task.build_model().state_dict()),
        training=replace(FAST_TRAINING, local_steps=50),
        fingerprint=ModelFingerprint(task=task.name, architecture=trainer.architecture),
        incarnation=INCARNATION,
    )

    # Execute
    trainer.train(model, seq=1)

    # Assert: the site waits (factor - 1) times its own training time, so a round takes factor times longer
    assert requested_sleeps == ([] if slowdown == 1.0 else [pytest.approx((slowdown - 1.0) * 3.0)])


# ---------------------------------------------------------------------------------- patient data stays home


@dataclass(frozen=True)
class PatientRecords:
    """Everything that identifies a patient's training record at this site, in every form it exists here."""

    rows: NDArray[np.float64]  # raw encoded rows, and the normalised rows the agent trains and tests on
    label_vectors: tuple[NDArray[np.float64], ...]


def patient_records(data: SiteData) -> PatientRecords:
    raw = load_raw_site(SITE)
    rows = np.concatenate(
        [raw.features.astype(np.float64), data.train_features.double().numpy(), data.test_features.double().numpy()]
    )
    labels = (data.train_labels.double().numpy(), data.test_labels.double().numpy(), raw.labels.astype(np.float64))
    return PatientRecords(rows=rows, label_vectors=labels)


ENCODINGS = ("<f2", ">f2", "<f4", ">f4", "<f8", ">f8")
LABEL_ENCODINGS = (*ENCODINGS, "u1", "<i4", "<i8", ">i8")
NUMBER_IN_TEXT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def numbers_in_order(value: object, numbers: list[float], text_numbers: list[float]) -> None:
    """Every number a message carries, in order: values and tensor elements (decoded) into ``numbers``, and
    numbers written as text (in keys or values) into ``text_numbers``."""
    if isinstance(value, dict):
        if {"dtype", "shape", "data"} <= set(value):
            numbers.extend(decode_tensor(value, "payload").double().reshape(-1).tolist())
            return
        for key, item in value.items():
            numbers_in_order(key, [], text_numbers)
            numbers_in_order(item, numbers, text_numbers)
    elif isinstance(value, (list, tuple)):
        for item in value:
            numbers_in_order(item, numbers, text_numbers)
    elif isinstance(value, (bool, int, float)):
        numbers.append(float(value))
    elif isinstance(value, str):
        text_numbers.extend(float(match) for match in NUMBER_IN_TEXT.findall(value))


def windows_matching(sequence: NDArray[np.float64], targets: NDArray[np.float64], *, relative: float = 2e-3) -> bool:
    """Does any run of len(target) consecutive numbers equal one of ``targets`` (to float16 precision)?"""
    width = targets.shape[1]
    if len(sequence) < width:
        return False
    windows = np.lib.stride_tricks.sliding_window_view(sequence, width)
    tolerance = relative * np.maximum(1.0, np.abs(targets)) + 1e-6
    for start in range(0, len(windows), 256):
        chunk = windows[start : start + 256]
        close = np.abs(chunk[:, None, :] - targets[None, :, :]) <= tolerance[None, :, :]
        if bool(close.all(axis=2).any()):
            return True
    return False


def find_patient_data(body: bytes, records: PatientRecords) -> list[str]:
    """What of ``records`` appears in ``body``: as raw bytes in any common encoding, or as a run of numbers."""
    found: list[str] = []
    for encoding in ENCODINGS:
        encoded_rows = records.rows.astype(encoding)
        if any(row.tobytes() in body for row in encoded_rows):
            found.append(f"a record as {encoding} bytes")
    for labels in records.label_vectors:
        for encoding in LABEL_ENCODINGS:
            if labels.astype(encoding).tobytes() in body:
                found.append(f"a label vector as {encoding} bytes")
    numbers: list[float] = []
    text_numbers: list[float] = []
    numbers_in_order(msgpack.unpackb(body, raw=False), numbers, text_numbers)
    for where, values in (("numbers", numbers), ("text", text_numbers)):
        sequence = np.asarray(values, dtype=np.float64)
        if windows_matching(sequence, records.rows):
            found.append(f"a record as a run of {where}")
        if any(windows_matching(sequence, labels[None, :], relative=0.0) for labels in records.label_vectors):
            found.append(f"a label vector as a run of {where}")
    return found


MESSAGE_BY_KIND: dict[str, type[Message]] = {
    Kind.UPDATE.value: ModelUpdate,
    Kind.EVAL.value: EvalReport,
    Kind.HEARTBEAT.value: Heartbeat,
}


def trained_on(harness: Harness, version: int) -> bool:
    return any(update.base_version == version for update in harness.updates())


def run_rounds(harness: Harness, versions: int) -> list[tuple[str, str, bytes]]:
    """Several rounds as a coordinator drives them; returns every (exchange, routing key, body) the site sent."""
    for version in range(versions):
        harness.publish_model(harness.model(version))
        harness.pump(partial(trained_on, harness, version))
    harness.pump_turns(5, seconds_per_turn=2.0)  # and a few heartbeats more
    return [(exchange, key, body) for exchange, key, body, _ in harness.site.published]


@pytest.mark.parametrize("compression", ["none", "float16"])
def test_only_schema_messages_leave_the_site_and_no_patient_record_is_among_them(
    tmp_path: Path, compression: str
) -> None:
    # Prepare
    harness = make_harness(tmp_path, compression=compression)
    records = patient_records(harness.data)

    # Execute
    try:
        published = run_rounds(harness, versions=4)
    finally:
        harness.agent.close()

    # Assert: every payload is one of the site's three message types, addressed as its own ...
    kinds = [key.rsplit(".", 1)[-1] for _, key, _ in published]
    assert {Kind.UPDATE.value, Kind.EVAL.value, Kind.HEARTBEAT.value} <= set(kinds)
    for (exchange, key, body), kind in zip(published, kinds, strict=True):
        assert exchange in (Exchange.UPDATES.value, Exchange.STATUS.value)
        assert key == routing_key(SITE, Kind(kind))
        MESSAGE_BY_KIND[kind].decode(body)  # raises if anything but a schemas message was sent
    # ... and none of them holds a training record or the labels
    leaks = {key: find_patient_data(body, records) for _, key, body in published}
    assert {key: found for key, found in leaks.items() if found} == {}


def test_the_leak_check_catches_an_agent_that_sends_a_record(tmp_path: Path) -> None:
    # Prepare
    harness = make_harness(tmp_path, trainer_type=LeakyTrainer)
    records = patient_records(harness.data)

    # Execute
    try:
        published = run_rounds(harness, versions=2)
    finally:
        harness.agent.close()

    # Assert
    update_bodies = [body for _, key, body in published if key.endswith(Kind.UPDATE.value)]
    assert update_bodies and all("a record as <f4 bytes" in find_patient_data(body, records) for body in update_bodies)


def _update_with(extra: torch.Tensor, compression: str = "none") -> bytes:
    update = ModelUpdate(
        update_id=ModelUpdate.new_id(),
        site_id=SITE,
        seq=1,
        base_version=0,
        num_examples=199,
        delta={"linear.weight": torch.zeros(1, 13), "linear.bias": torch.zeros(1), "x": extra},
        metrics=TrainingMetrics(loss=0.5, steps=10, seconds=0.1),
    )
    return update.encode(compression)


LEAKS: dict[str, Callable[[SiteData, NDArray[np.float32]], bytes]] = {
    "normalised row as a float32 tensor": lambda data, raw: _update_with(data.train_features[3]),
    "raw row as a float64 tensor": lambda data, raw: _update_with(torch.from_numpy(raw[10].astype(np.float64))),
    "row compressed to float16": lambda data, raw: _update_with(data.test_features[0], "float16"),
    "row as evaluation metrics": lambda data, raw: EvalReport(
        site_id=SITE,
        model_version=0,
        num_examples=104,
        metrics={f"m{index:02d}": float(value) for index, value in enumerate(data.train_features[5])},
    ).encode(),
    "raw row as text in a heartbeat": lambda data, raw: Heartbeat(
        site_id=SITE, state=SiteState.IDLE, agent_version=" ".join(f"{value:g}" for value in raw[42])
    ).encode(),
    "labels as a uint8 tensor": lambda data, raw: _update_with(data.train_labels.to(torch.uint8)),
    "labels as a list of numbers": lambda data, raw: EvalReport(
        site_id=SITE,
        model_version=0,
        num_examples=104,
        metrics={f"y{index:03d}": float(value) for index, value in enumerate(data.test_labels)},
    ).encode(),
}


@pytest.mark.parametrize("leak", list(LEAKS))
def test_the_leak_check_catches_each_way_a_record_could_be_smuggled_out(leak: str) -> None:
    # Prepare
    data = load_site(SITE)
    records = patient_records(data)
    body = LEAKS[leak](data, load_raw_site(SITE).features)

    # Execute / Assert
    assert find_patient_data(body, records) != []
