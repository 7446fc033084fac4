"""The coordinator service driven through the in-memory broker: what a site, an operator and an auditor see.

Every test publishes real encoded messages the way a site agent does and reads outcomes from the places a
person would look: Prometheus samples, the audit log, the dead-letter queue, the model in each site's inbox.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from broker import topology
from broker.memory import MemoryBroker, MemoryTransport
from broker.topology import REJECT_REASON_HEADER, BindingSpec, Exchange, Kind, Queue, routing_key, site_inbox
from broker.transport import Delivery
from coordinator.aggregation import (
    FedAsync,
    FedBuff,
    Params,
    ServerOptimizer,
    StalenessFunction,
    Strategy,
    SyncFedAvg,
)
from coordinator.audit import AuditLog, read_records, verify_chain
from coordinator.checkpoint import CheckpointStore
from coordinator.config import CoordinatorConfig, StoppingSettings, ValidationSettings
from coordinator.errors import StorageError
from coordinator.evaluation import EvaluationBook
from coordinator.metrics import CoordinatorMetrics
from coordinator.service import Coordinator
from schemas import GlobalModel, Heartbeat, ModelFingerprint, ModelUpdate, SiteState, TrainingMetrics

SITES = ("a", "b", "c")
COORDINATOR_LOGIN = "fedmq-coordinator"
SAME_AS_SITE = "<the routing key's site>"
GOOD_SITE = "c"


class FakeClock:
    """Both the wall clock and the monotonic clock of a coordinator under test."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def initial_params() -> Params:
    return {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}


def delta(w: tuple[float, float] = (0.1, 0.1), b: float = 0.1) -> Params:
    return {"w": torch.tensor(w), "b": torch.tensor([b])}


def assert_values(tensor: torch.Tensor, expected: list[float]) -> None:
    assert tensor.tolist() == pytest.approx(expected, rel=1e-6)


def make_update(
    site: str,
    *,
    seq: int,
    base_version: int,
    update_delta: Params | None = None,
    num_examples: int = 10,
    update_id: str | None = None,
) -> ModelUpdate:
    return ModelUpdate(
        update_id=update_id or ModelUpdate.new_id(),
        site_id=site,
        seq=seq,
        base_version=base_version,
        num_examples=num_examples,
        delta=delta() if update_delta is None else update_delta,
        metrics=TrainingMetrics(loss=0.5, steps=10, seconds=0.1),
    )


@dataclass
class Federation:
    """A coordinator attached to an in-memory broker, plus the means to act as its sites."""

    broker: MemoryBroker
    transport: MemoryTransport
    coordinator: Coordinator
    registry: CollectorRegistry
    clock: FakeClock
    state_dir: Path
    sent: list[ModelUpdate] = field(default_factory=list)
    seqs: dict[str, int] = field(default_factory=dict)

    def publish(self, routing_site: str, body: bytes, *, user_id: str | None = SAME_AS_SITE) -> None:
        """Publish on a site's routing key, then let the coordinator handle it. ``user_id=None`` leaves the
        property out; another id publishes as that site's login."""
        property_user_id = routing_site if user_id == SAME_AS_SITE else user_id
        login = property_user_id or routing_site
        self.broker.connect(login).publish(
            Exchange.UPDATES.value, routing_key(routing_site, Kind.UPDATE), body, user_id=property_user_id
        )
        self.transport.poll(0)
        self.coordinator.commit()

    def send(self, update: ModelUpdate) -> bytes:
        body = update.encode()
        self.sent.append(update)
        self.publish(update.site_id, body)
        return body

    def send_good(self, site: str, update_delta: Params | None = None, **overrides: Any) -> ModelUpdate:
        """A valid update on the current version with the site's next seq."""
        fields: dict[str, Any] = {"seq": self.next_seq(site), "base_version": self.coordinator.state.version}
        fields.update(overrides)
        update = make_update(site, update_delta=update_delta, **fields)
        self.send(update)
        return update

    def next_seq(self, site: str) -> int:
        self.seqs[site] = self.seqs.get(site, 0) + 1
        return self.seqs[site]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def rejections(self) -> dict[tuple[str, str], float]:
        return rejection_counts(self.registry)

    def audit(self) -> list[dict[str, Any]]:
        return list(read_records(self.state_dir / "audit.jsonl"))

    def dead_letters(self) -> list[Delivery]:
        return list(self.broker.queues[Queue.DEAD_LETTERS.value].messages)

    def inbox(self, site: str) -> GlobalModel:
        return GlobalModel.decode(self.broker.queues[site_inbox(site)].messages[-1].body)


def rejection_counts(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (sample.labels["site"], sample.labels["reason"]): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == "fedmq_updates_rejected_total" and sample.value
    }


def start_federation(
    tmp_path: Path,
    strategy: Strategy,
    *,
    max_staleness: int = 20,
    validation: ValidationSettings | None = None,
    params: Params | None = None,
    clock: FakeClock | None = None,
    free_space: Callable[[Path], int] | None = None,
    **config_overrides: Any,
) -> Federation:
    """A fresh run of a two-parameter model (w = [1, 2], b = [0.5]) with sites a, b and c declared."""
    clock = clock or FakeClock()
    config = CoordinatorConfig(
        task="tiny",
        sites=SITES,
        state_dir=tmp_path,
        strategy={"name": strategy.name, "max_staleness": max_staleness},
        validation=validation or ValidationSettings(max_update_norm=100.0),
        **config_overrides,
    )
    registry = CollectorRegistry()
    coordinator = Coordinator(
        config,
        strategy=strategy,
        initial_params=params or initial_params(),
        fingerprint=ModelFingerprint(task="tiny", architecture="test"),
        metrics=CoordinatorMetrics(registry, clock=clock),
        audit=AuditLog(tmp_path / "audit.jsonl"),
        evaluations=EvaluationBook(tmp_path / "evaluations.jsonl"),
        checkpoints=CheckpointStore(tmp_path / "checkpoint"),
        clock=clock,
        monotonic=clock,
        **({"free_space": free_space} if free_space is not None else {}),
    )
    broker = MemoryBroker()
    broker.declare(SITES)
    transport = broker.connect(COORDINATOR_LOGIN)
    coordinator.attach(transport)
    return Federation(broker, transport, coordinator, registry, clock, tmp_path)


def fedbuff(buffer_size: int = 1, **options: Any) -> FedBuff:
    return FedBuff(buffer_size=buffer_size, **options)


def sync_fedavg() -> SyncFedAvg:
    return SyncFedAvg(sites=SITES, round_timeout_seconds=60.0)


# ------------------------------------------------------------------------------------------------ rejections


# A 2 kB message limit for the oversized case; a good update is well below it.
REJECTION_VALIDATION = ValidationSettings(max_update_norm=100.0, max_message_mb=0.002)


@dataclass(frozen=True)
class RejectionCase:
    """``prepare`` brings the run to the state the bad message needs; ``send`` publishes it, returning its
    bytes."""

    name: str
    reason: str
    site_label: str
    send: Callable[[Federation], bytes]
    prepare: Callable[[Federation], None] = lambda federation: None
    strategy: Callable[[], Strategy] = fedbuff
    max_staleness: int = 20
    validation: ValidationSettings = field(default_factory=lambda: REJECTION_VALIDATION)


def _send_update(federation: Federation, site: str, update_delta: Params | None = None, **fields: Any) -> bytes:
    fields.setdefault("seq", federation.next_seq(site))
    fields.setdefault("base_version", federation.coordinator.state.version)
    return federation.send(make_update(site, update_delta=update_delta, **fields))


def _unknown_site(federation: Federation) -> bytes:
    # The broker routes site.zz.update to no queue the coordinator reads; a stray binding (an operator's mistake)
    # is how such a message could reach it, and it is still refused.
    federation.broker.bindings.append(
        BindingSpec(topology.site_update_queue("a"), Exchange.UPDATES.value, "site.zz.update")
    )
    body = make_update("zz", seq=1, base_version=0).encode()
    federation.publish("zz", body)
    return body


def _no_user_id(federation: Federation) -> bytes:
    body = make_update("a", seq=1, base_version=0).encode()
    federation.publish("a", body, user_id=None)
    return body


def _user_id_of_another_site(federation: Federation) -> bytes:
    body = make_update("a", seq=1, base_version=0).encode()
    federation.publish("a", body, user_id="b")
    return body


def _update_claims_another_site(federation: Federation) -> bytes:
    body = make_update("b", seq=1, base_version=0).encode()
    federation.publish("a", body)
    return body


def _oversized(federation: Federation) -> bytes:
    # 2000 float32 values (8 kB) against a 2 kB limit: refused on size before any decoding.
    return _send_update(federation, "a", {"w": torch.zeros(2000), "b": torch.zeros(1)})


def _garbage(federation: Federation) -> bytes:
    body = b"\xc1 this is not msgpack"
    federation.publish("a", body)
    return body


def _heartbeat_on_the_update_queue(federation: Federation) -> bytes:
    body = Heartbeat(site_id="a", state=SiteState.TRAINING, agent_version="0.1.0").encode()
    federation.publish("a", body)
    return body


def _base_version_from_the_future(federation: Federation) -> bytes:
    return _send_update(federation, "a", base_version=7)


def _missing_tensor(federation: Federation) -> bytes:
    return _send_update(federation, "a", {"w": torch.zeros(2)})


def _extra_tensor(federation: Federation) -> bytes:
    return _send_update(federation, "a", {**delta(), "extra": torch.zeros(1)})


def _wrong_shape(federation: Federation) -> bytes:
    return _send_update(federation, "a", {"w": torch.zeros(3), "b": torch.zeros(1)})


def _integer_delta_for_float_parameter(federation: Federation) -> bytes:
    return _send_update(federation, "a", {"w": torch.zeros(2, dtype=torch.int64), "b": torch.zeros(1)})


def _nan(federation: Federation) -> bytes:
    return _send_update(federation, "a", delta(w=(math.nan, 0.0)))


def _inf(federation: Federation) -> bytes:
    return _send_update(federation, "a", delta(b=-math.inf))


def _norm_too_large(federation: Federation) -> bytes:
    return _send_update(federation, "a", delta(w=(60.0, 80.0), b=1.0))  # norm ~100.005 > 100


def _squares_overflow(federation: Federation) -> bytes:
    """Finite values whose squares overflow float32: the norm is inf, yet no value is."""
    return _send_update(federation, "a", delta(w=(3e38, 3e38), b=0.0))


def _nan_beside_a_huge_value(federation: Federation) -> bytes:
    return _send_update(federation, "a", delta(w=(3e38, 0.0), b=math.nan))


def _two_versions_from_a(federation: Federation) -> None:
    federation.send_good("a")
    federation.send_good("a")


def _stale(federation: Federation) -> bytes:
    return _send_update(federation, "b", base_version=0)  # staleness 2 > max_staleness 1


def _one_update_from_a(federation: Federation) -> None:
    federation.send_good("a")


def _same_id_higher_seq(federation: Federation) -> bytes:
    return _send_update(federation, "a", update_id=federation.sent[-1].update_id)


def _same_seq_new_id(federation: Federation) -> bytes:
    return _send_update(federation, "a", seq=federation.sent[-1].seq)


def _lower_seq_new_id(federation: Federation) -> bytes:
    return _send_update(federation, "a", seq=federation.sent[-1].seq - 1)


def _two_buffered_from_a(federation: Federation) -> None:
    federation.send_good("a")
    federation.send_good("a")


def _third_from_a(federation: Federation) -> bytes:
    return _send_update(federation, "a")


def _complete_round_zero(federation: Federation) -> None:
    for site in SITES:
        federation.send_good(site)
    assert federation.coordinator.state.version == 1


def _round_zero_update(federation: Federation) -> bytes:
    return _send_update(federation, "a", base_version=0)


def _second_update_in_round(federation: Federation) -> bytes:
    return _send_update(federation, "a")


REJECTION_CASES = [
    RejectionCase("unknown site", "unknown-site", "unknown", _unknown_site),
    RejectionCase("no user_id", "identity-mismatch", "a", _no_user_id),
    RejectionCase("user_id of another site", "identity-mismatch", "a", _user_id_of_another_site),
    RejectionCase("update claims another site", "identity-mismatch", "a", _update_claims_another_site),
    RejectionCase("oversized", "oversized", "a", _oversized),
    RejectionCase("garbage bytes", "malformed", "a", _garbage),
    RejectionCase("wrong message type", "malformed", "a", _heartbeat_on_the_update_queue),
    RejectionCase("base version from the future", "unknown-version", "a", _base_version_from_the_future),
    RejectionCase("missing tensor", "wrong-shape", "a", _missing_tensor),
    RejectionCase("extra tensor", "wrong-shape", "a", _extra_tensor),
    RejectionCase("wrong shape", "wrong-shape", "a", _wrong_shape),
    RejectionCase("integer delta", "wrong-shape", "a", _integer_delta_for_float_parameter),
    RejectionCase("NaN", "non-finite", "a", _nan),
    RejectionCase("inf", "non-finite", "a", _inf),
    RejectionCase("norm", "norm-too-large", "a", _norm_too_large),
    RejectionCase("squares overflow", "norm-too-large", "a", _squares_overflow),
    RejectionCase("NaN beside a huge value", "non-finite", "a", _nan_beside_a_huge_value),
    RejectionCase("stale", "stale", "b", _stale, prepare=_two_versions_from_a, max_staleness=1),
    RejectionCase("same id, higher seq", "duplicate", "a", _same_id_higher_seq, prepare=_one_update_from_a),
    RejectionCase("same seq", "duplicate", "a", _same_seq_new_id, prepare=_one_update_from_a),
    RejectionCase("lower seq", "duplicate", "a", _lower_seq_new_id, prepare=_one_update_from_a),
    RejectionCase(
        "site share",
        "site-share",
        "a",
        _third_from_a,
        prepare=_two_buffered_from_a,
        strategy=lambda: fedbuff(buffer_size=4, max_site_share=0.5),
    ),
    RejectionCase(
        "wrong round", "wrong-round", "a", _round_zero_update, prepare=_complete_round_zero, strategy=sync_fedavg
    ),
    RejectionCase(
        "already in round",
        "already-in-round",
        "a",
        _second_update_in_round,
        prepare=_one_update_from_a,
        strategy=sync_fedavg,
    ),
]


@pytest.mark.parametrize("case", REJECTION_CASES, ids=[case.name for case in REJECTION_CASES])
def test_a_rejected_update_is_counted_audited_dead_lettered_and_leaves_the_model_alone(
    tmp_path: Path, case: RejectionCase
) -> None:
    # Prepare
    federation = start_federation(
        tmp_path, case.strategy(), max_staleness=case.max_staleness, validation=case.validation
    )
    case.prepare(federation)
    version_before = federation.coordinator.state.version
    params_before = {name: tensor.clone() for name, tensor in federation.coordinator.state.params.items()}
    applied_before = federation.sample("fedmq_updates_applied_total", site=GOOD_SITE) or 0.0

    # Execute
    body = case.send(federation)

    # Assert: one rejection, under this site and reason, and nothing else rejected
    assert federation.rejections() == {(case.site_label, case.reason): 1.0}
    rejected = [record for record in federation.audit() if record["outcome"] == "rejected"]
    assert len(rejected) == 1
    assert rejected[0]["reason"] == case.reason
    assert rejected[0]["sha256"] == hashlib.sha256(body).hexdigest()
    assert verify_chain(federation.state_dir / "audit.jsonl").ok
    [dead_letter] = federation.dead_letters()
    assert dead_letter.body == body
    assert dead_letter.headers[REJECT_REASON_HEADER] == case.reason
    # ... the model is untouched, and every site still holds the version it had
    assert federation.coordinator.state.version == version_before
    for name, tensor in params_before.items():
        assert torch.equal(federation.coordinator.state.params[name], tensor)
    assert {federation.inbox(site).version for site in SITES} == {version_before}
    assert federation.sample("fedmq_model_version") == version_before
    # ... and the service still takes a good update
    good = federation.send_good(GOOD_SITE, seq=1000)
    assert federation.sample("fedmq_updates_applied_total", site=GOOD_SITE) == applied_before + 1
    assert federation.audit()[-1]["update_id"] == good.update_id
    assert federation.audit()[-1]["outcome"] == "accepted"
    assert len(federation.dead_letters()) == 1


def test_rejected_updates_are_acked_so_the_queue_drains(tmp_path: Path) -> None:
    # Prepare
    federation = start_federation(tmp_path, fedbuff())

    # Execute
    _garbage(federation)
    _nan(federation)

    # Assert
    assert not federation.broker.queued_updates()
    assert federation.transport.unacked == {}


def test_tensor_names_in_another_order_are_accepted(tmp_path: Path) -> None:
    # Prepare: the same tensors as the model, listed in the opposite order
    federation = start_federation(tmp_path, fedbuff())
    reordered = {"b": torch.tensor([1.0]), "w": torch.tensor([1.0, 1.0])}

    # Execute
    federation.send_good("a", reordered)

    # Assert
    assert federation.rejections() == {}
    assert federation.coordinator.state.version == 1
    assert_values(federation.inbox("a").tensors["w"], [2.0, 3.0])
    assert_values(federation.inbox("a").tensors["b"], [1.5])


# ----------------------------------------------------------------------------------------------- accepted


def test_fedbuff_publishes_a_version_to_every_site_once_k_updates_are_in(tmp_path: Path) -> None:
    # Prepare: K = 2, server SGD at rate 1, s(tau) = 1 / sqrt(1 + tau)
    federation = start_federation(tmp_path, fedbuff(buffer_size=2))

    # Execute / Assert: the first update only fills the buffer
    federation.send_good("a", delta(w=(2.0, 0.0), b=1.0))
    assert federation.sample("fedmq_buffer_fill") == 1
    assert federation.sample("fedmq_buffer_capacity") == 2
    assert {federation.inbox(site).version for site in SITES} == {0}
    assert federation.audit()[-1]["resulting_version"] is None

    # Execute / Assert: the second makes v1 = v0 + (d_a + d_b) / 2
    federation.send_good("b", delta(w=(0.0, 4.0), b=-1.0))
    assert federation.sample("fedmq_buffer_fill") == 0
    assert federation.sample("fedmq_model_version") == 1
    for site in SITES:
        model = federation.inbox(site)
        assert model.version == 1
        assert_values(model.tensors["w"], [2.0, 4.0])
        assert_values(model.tensors["b"], [0.5])
    assert federation.audit()[-1]["resulting_version"] == 1

    # Execute: a stale update (tau = 1) and a fresh one make v2
    federation.send_good("a", delta(w=(2.0, 2.0), b=0.0), base_version=0)
    federation.send_good("c", delta(w=(0.0, 0.0), b=2.0))

    # Assert: v2 = v1 + (d_a / sqrt(2) + d_c) / 2
    step = 1 / math.sqrt(2)
    model = federation.inbox("b")
    assert model.version == 2
    assert_values(model.tensors["w"], [2.0 + step, 4.0 + step])
    assert_values(model.tensors["b"], [1.5])
    assert federation.sample("fedmq_update_staleness_count", site="a") == 2
    assert federation.sample("fedmq_update_staleness_sum", site="a") == 1
    assert federation.sample("fedmq_update_staleness_bucket", site="a", le="0.0") == 1
    assert federation.sample("fedmq_update_staleness_bucket", site="a", le="1.0") == 2
    assert federation.sample("fedmq_updates_applied_total", site="a") == 2
    assert federation.sample("fedmq_updates_received_total", site="a") == 2
    assert federation.sample("fedmq_aggregation_seconds_count") == 4
    assert federation.sample("fedmq_checkpoint_seconds_count") == 4
    assert [record["staleness"] for record in federation.audit()] == [0, 0, 1, 0]


def test_fedasync_mixes_the_base_version_plus_delta_into_the_current_model(tmp_path: Path) -> None:
    # Prepare: alpha = 0.5, s(tau) = 1 / (1 + tau)
    strategy = FedAsync(alpha=0.5, staleness=StalenessFunction("polynomial", a=1.0))
    federation = start_federation(tmp_path, strategy)

    # Execute: v1 = 0.5 * [1, 2] + 0.5 * ([1, 2] + [2, 2]) = [2, 3]
    federation.send_good("a", delta(w=(2.0, 2.0), b=0.0))
    # ... then an update trained on v0 (tau = 1, alpha_t = 0.25): local model = v0 + [0, 4] = [1, 6]
    federation.send_good("b", delta(w=(0.0, 4.0), b=0.0), base_version=0)

    # Assert: v2 = 0.75 * [2, 3] + 0.25 * [1, 6] = [1.75, 3.75] (with v1 as the base it would be [2, 3.75 + 0.25])
    assert federation.inbox("c").version == 2
    assert_values(federation.inbox("c").tensors["w"], [1.75, 3.75])
    assert_values(federation.inbox("c").tensors["b"], [0.5])
    assert federation.sample("fedmq_model_version") == 2


def test_fedasync_keeps_only_the_versions_the_staleness_bound_allows(tmp_path: Path) -> None:
    # Prepare
    federation = start_federation(tmp_path, FedAsync(alpha=0.5), max_staleness=2)

    # Execute
    for _ in range(5):
        federation.send_good("a")

    # Assert: an update may be based on v3, v4 or v5, so exactly those are kept
    assert sorted(federation.coordinator.state.history) == [3, 4, 5]


def test_sync_fedavg_round_completes_when_every_site_has_sent(tmp_path: Path) -> None:
    # Prepare
    federation = start_federation(tmp_path, sync_fedavg())

    # Execute: example-weighted mean delta = (1 * 1 + 2 * 4 + 1 * 7) / 4 = 4
    federation.send_good("a", delta(w=(1.0, 1.0), b=0.0), num_examples=1)
    federation.send_good("b", delta(w=(4.0, 4.0), b=0.0), num_examples=2)
    assert federation.inbox("a").version == 0
    assert federation.sample("fedmq_buffer_fill") == 2
    assert federation.sample("fedmq_buffer_capacity") == 3
    federation.send_good("c", delta(w=(7.0, 7.0), b=0.0), num_examples=1)

    # Assert
    model = federation.inbox("a")
    assert model.version == 1
    assert_values(model.tensors["w"], [5.0, 6.0])
    assert model.training.train_on_same_version is False
    assert federation.sample("fedmq_buffer_fill") == 0


def test_sync_fedavg_round_times_out_with_the_updates_at_hand(tmp_path: Path) -> None:
    # Prepare: the round clock starts at the first tick that sees version 0
    federation = start_federation(tmp_path, sync_fedavg())
    federation.coordinator.tick()
    federation.send_good("a", delta(w=(3.0, 3.0), b=0.0), num_examples=5)

    # Execute / Assert: nothing before the 60 s timeout ...
    federation.clock.advance(59)
    federation.coordinator.tick()
    assert federation.inbox("b").version == 0

    # ... a version from site a alone after it
    federation.clock.advance(1)
    federation.coordinator.tick()
    model = federation.inbox("b")
    assert model.version == 1
    assert_values(model.tensors["w"], [4.0, 5.0])
    assert federation.sample("fedmq_model_version") == 1

    # ... and the next round accepts updates on v1
    federation.send_good("b", base_version=1)
    assert federation.rejections() == {}


def test_the_info_metric_carries_the_installed_version(tmp_path: Path) -> None:
    federation = start_federation(tmp_path, fedbuff())

    labels = {"strategy": "fedbuff", "task": "tiny", "version": importlib.metadata.version("fedmq")}

    assert federation.sample("fedmq_coordinator_info", **labels) == 1


# ------------------------------------------------------------------------------------------- the guard


class FlakyServerOptimizer(ServerOptimizer):
    """Plain SGD whose first step raises, as a bug deep inside a strategy's ``add`` would."""

    def __init__(self) -> None:
        super().__init__("sgd")
        self.failures_left = 1

    def step(self, params: Mapping[str, torch.Tensor], pseudo_gradient: Mapping[str, torch.Tensor]) -> Params:
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("simulated bug in the server step")
        return super().step(params, pseudo_gradient)


def test_an_update_the_strategy_fails_on_is_an_internal_error_and_the_service_serves_on(tmp_path: Path) -> None:
    # Prepare: K = 2, so b's update fills the buffer and the failing step runs in the middle of its ``add``
    federation = start_federation(tmp_path, fedbuff(buffer_size=2, server_optimizer=FlakyServerOptimizer()))
    first = federation.send_good("a", delta(w=(2.0, 0.0), b=1.0))
    params_before = {name: tensor.clone() for name, tensor in federation.coordinator.state.params.items()}

    # Execute
    failing_body = federation.send_good("b", delta(w=(50.0, 50.0), b=50.0)).encode()
    version_after_failure = federation.coordinator.state.version
    buffer_after_failure = federation.coordinator.strategy.buffered_update_ids()
    federation.send_good("c", delta(w=(0.0, 4.0), b=-1.0))

    # Assert: counted, audited with the exception, dead-lettered, acked
    assert federation.rejections() == {("b", "internal-error"): 1.0}
    [rejected] = [record for record in federation.audit() if record["outcome"] == "rejected"]
    assert rejected["reason"] == "internal-error" and rejected["site"] == "b"
    assert "simulated bug in the server step" in rejected["detail"]
    assert rejected["sha256"] == hashlib.sha256(failing_body).hexdigest()
    [dead_letter] = federation.dead_letters()
    assert dead_letter.body == failing_body and dead_letter.headers[REJECT_REASON_HEADER] == "internal-error"
    assert federation.transport.unacked == {}
    assert not federation.broker.queued_updates()
    # ... the failed update left the model and the buffer as they were
    assert version_after_failure == 0 and buffer_after_failure == [first.update_id]
    # ... and the next good update makes v1 = v0 + (d_a + d_c) / 2, as if b had never arrived
    assert federation.coordinator.state.version == 1
    assert_values(federation.coordinator.state.params["w"], [params_before["w"][0].item() + 1.0, 2.0 + 2.0])
    assert_values(federation.inbox("a").tensors["b"], [0.5])
    assert verify_chain(federation.state_dir / "audit.jsonl").ok


def test_a_storage_error_is_not_taken_for_a_bad_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the disk fails when the checkpoint is written
    federation = start_federation(tmp_path, fedbuff())

    def disk_full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)

    # Execute / Assert: a storage error (not an OSError a transport would take for a lost connection) reaches the
    # caller, so the process stops; nothing is acked, rejected or audited
    with pytest.raises(StorageError, match="No space left") as raised:
        federation.send_good("a")
    assert not isinstance(raised.value, OSError)
    assert len(federation.transport.unacked) == 1
    assert federation.rejections() == {}
    monkeypatch.undo()
    assert federation.audit() == []


def test_updates_arriving_while_the_run_is_finishing_stay_in_the_queue(tmp_path: Path) -> None:
    # Prepare: max_versions = 1 is reached by the first update
    federation = start_federation(tmp_path, fedbuff(), stopping=StoppingSettings(max_versions=1))
    federation.send_good("a")

    # Execute
    federation.send_good("b")

    # Assert: not applied, not rejected, not acked: it comes back to a later run
    assert federation.coordinator.state.version == 1
    assert federation.sample("fedmq_updates_applied_total", site="b") is None
    assert federation.rejections() == {}
    assert len(federation.transport.unacked) == 1


def test_every_model_carries_the_coordinators_incarnation_and_the_next_start_draws_a_later_one(
    tmp_path: Path,
) -> None:
    # Prepare
    federation = start_federation(tmp_path / "first", fedbuff())
    on_attach = federation.inbox("a")

    # Execute: a new version, then the coordinator starts again
    federation.send_good("a")
    after_update = federation.inbox("a")
    restarted = start_federation(tmp_path / "second", fedbuff())

    # Assert: one incarnation per process, in every model it publishes; a later start orders after it
    assert (on_attach.version, after_update.version) == (0, 1)
    assert on_attach.incarnation == after_update.incarnation == federation.coordinator.incarnation
    assert restarted.inbox("a").incarnation == restarted.coordinator.incarnation > federation.coordinator.incarnation


def test_a_resend_after_a_lost_confirm_is_acked_as_a_copy_not_refused(tmp_path: Path) -> None:
    # Prepare: the site's first copy reached the queue but its confirm was lost, so it sent the same update again
    # (same id and seq, not flagged redelivered); once in a later batch, once in the same batch
    federation = start_federation(tmp_path, fedbuff(buffer_size=10))
    first = federation.send_good("a")
    second = make_update("a", seq=federation.next_seq("a"), base_version=0)

    # Execute
    federation.send(first)
    for _ in range(2):
        federation.broker.connect("a").publish(
            Exchange.UPDATES.value, routing_key("a", Kind.UPDATE), second.encode(), user_id="a"
        )
    federation.transport.poll(0)
    federation.coordinator.commit()

    # Assert: applied once each, the copies acked and counted as redeliveries, nothing refused or dead-lettered
    assert federation.rejections() == {}
    assert federation.sample("fedmq_updates_redelivered_total", site="a") == 2
    assert federation.sample("fedmq_updates_applied_total", site="a") == 2
    assert federation.coordinator.strategy.buffered_update_ids() == [first.update_id, second.update_id]
    records = federation.audit()
    assert [(record["update_id"], record["outcome"]) for record in records] == [
        (first.update_id, "accepted"),
        (first.update_id, "already-applied"),
        (second.update_id, "accepted"),
        (second.update_id, "already-applied"),
    ]
    assert "sent again by the site" in records[1]["detail"] and records[1]["redelivered"] is False
    assert federation.dead_letters() == [] and federation.transport.unacked == {}


def test_the_highest_delivery_count_the_broker_reports_is_shown(tmp_path: Path) -> None:
    # Prepare
    federation = start_federation(tmp_path, fedbuff(buffer_size=10))
    update = make_update("a", seq=1, base_version=0)

    # Execute: the quorum queue's header says the update was returned to the queue 7 times
    federation.broker.connect("a").publish(
        Exchange.UPDATES.value,
        routing_key("a", Kind.UPDATE),
        update.encode(),
        user_id="a",
        headers={"x-delivery-count": 7},
    )
    federation.transport.poll(0)
    federation.coordinator.commit()

    # Assert: shown for the operator (and the alert), and handled as usual
    assert federation.sample("fedmq_update_delivery_count_max") == 7
    assert federation.sample("fedmq_updates_applied_total", site="a") == 1
