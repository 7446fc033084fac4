"""End-to-end signatures against a real broker: neither a hospital's broker login nor the broker's administrator
can make the coordinator accept an update the hospital did not sign, or make a hospital take a model the
coordinator did not sign.

A RabbitMQ user with the ``impersonator`` tag may publish with any ``user_id`` (the broker checks it against the
login for everyone else): that is the compromised-broker case, and the signature is what still holds.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import torch

from broker.keys import generate_private_key, read_private_key
from broker.topology import REJECT_REASON_HEADER, Exchange, Kind, Queue, routing_key, site_inbox
from schemas import GlobalModel, ModelFingerprint, TrainingConfig
from schemas.signing import sign, signature_problem
from tasks.base import architecture_digest
from tasks.registry import task_from_options
from tests.integration.conftest import BrokerEnv
from tests.integration.coordinator_process import (
    CoordinatorProcess,
    ScriptedSite,
    free_port,
    samples_with,
    wait_for,
    write_coordinator_config,
)
from tests.integration.federation_helpers import FedmqProcesses, append_site_tables, coordinator_tables

pytestmark = pytest.mark.integration

IMPERSONATOR = "fedmq-test-impersonator"


@pytest.fixture
def impersonator(broker_env: BrokerEnv) -> Iterator[pika.BlockingConnection]:
    """A broker administrator allowed to set any user_id (RabbitMQ's ``impersonator`` tag)."""
    password = secrets.token_urlsafe(16)
    broker_env.management.create_user(IMPERSONATOR, password, tags=["administrator", "impersonator"])
    broker_env.management.set_permissions(broker_env.vhost, IMPERSONATOR, configure=".*", write=".*", read=".*")
    connection = broker_env.connect(broker_env.amqp_url(IMPERSONATOR, password))
    try:
        yield connection
    finally:
        if connection.is_open:
            connection.close()
        broker_env.management.delete_user(IMPERSONATOR)


def start_coordinator(broker_env: BrokerEnv, tmp_path: Path, sites: list[str]) -> CoordinatorProcess:
    state_dir = tmp_path / "coordinator"
    port = free_port()
    config = write_coordinator_config(
        tmp_path / "coordinator.toml",
        url=broker_env.coordinator_url,
        sites=sites,
        state_dir=state_dir,
        metrics_port=port,
        keys_dir=broker_env.keys_dir,
        extra='[strategy]\nname = "fedasync"\nmax_staleness = 20\n',
    )
    coordinator = CoordinatorProcess(config, state_dir, port, tmp_path / "coordinator.log")
    coordinator.start()
    coordinator.wait_ready()
    return coordinator


def rejected(coordinator: CoordinatorProcess) -> dict[tuple[str, str], float]:
    return {
        (labels["site"], labels["reason"]): value
        for labels, value in samples_with(coordinator.metrics(), "fedmq_updates_rejected_total")
        if value
    }


def model_version(coordinator: CoordinatorProcess) -> float:
    return next(value for _, value in samples_with(coordinator.metrics(), "fedmq_model_version"))


def dead_letter_reasons(broker_env: BrokerEnv) -> list[str]:
    connection = pika.BlockingConnection(pika.URLParameters(broker_env.admin_url))
    reasons = []
    try:
        channel = connection.channel()
        while True:
            method, properties, _ = channel.basic_get(Queue.DEAD_LETTERS.value, auto_ack=False)
            if method is None:
                return reasons
            reasons.append(str((properties.headers or {}).get(REJECT_REASON_HEADER)))
    finally:
        connection.close()  # unacked: the letters go back to the queue


def test_forged_updates_are_refused_bad_signature_even_from_the_brokers_administrator(
    broker_env: BrokerEnv, tmp_path: Path, impersonator: pika.BlockingConnection
) -> None:
    # Prepare: hospital-a provisioned with its registered key; a coordinator that requires signatures
    site = broker_env.add_site("hospital-a")
    site_key = read_private_key(broker_env.site_key_file("hospital-a"))
    coordinator = start_coordinator(broker_env, tmp_path, ["hospital-a"])
    scripted = ScriptedSite("hospital-a", site.url)
    forger_key = generate_private_key()
    try:
        model = scripted.latest_model()
        version_before = model.version

        # Execute: (1) hospital-a's own broker login, but signed by another key; (2) unsigned; (3) the broker's
        # administrator publishing as hospital-a (user_id set by an impersonator), signed by the forger
        scripted.publish(sign(scripted.update(model), forger_key).encode())
        scripted.publish(scripted.update(model).encode())
        channel = impersonator.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            Exchange.UPDATES.value,
            routing_key("hospital-a", Kind.UPDATE),
            sign(scripted.update(model, scale=5.0), forger_key).encode(),
            pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, user_id="hospital-a"),
            mandatory=True,
        )
        wait_for(
            lambda: rejected(coordinator).get(("hospital-a", "bad-signature")) == 3,
            30,
            "the three forged updates were not all rejected as bad-signature",
        )

        # Assert: counted, audited (the impersonated one with the user_id the administrator set), dead-lettered,
        # and the model unchanged: nothing was applied
        assert rejected(coordinator) == {("hospital-a", "bad-signature"): 3.0}

        def audited() -> list[dict[str, object]]:
            return [record for record in coordinator.audit_records() if record.get("reason") == "bad-signature"]

        wait_for(lambda: len(audited()) == 3, 10, "the rejections were not all audited")
        records = audited()
        assert {record["outcome"] for record in records} == {"rejected"}
        assert {record["user_id"] for record in records} == {"hospital-a"}
        wait_for(lambda: broker_env.message_count(Queue.DEAD_LETTERS.value) == 3, 10, "no 3 dead letters")
        assert dead_letter_reasons(broker_env) == ["bad-signature"] * 3
        assert model_version(coordinator) == version_before
        assert scripted.latest_model().version == version_before

        # Execute / Assert: hospital-a's own signed update is applied (the key registry works end to end)
        scripted.publish(sign(scripted.update(model), site_key).encode())
        wait_for(lambda: model_version(coordinator) == version_before + 1, 30, "the signed update made no version")
        newest = scripted.latest_model()
        coordinator_key = read_private_key(broker_env.keys_dir / "coordinator.key").public_key()
        assert signature_problem(newest, coordinator_key) is None
    finally:
        scripted.close()
        coordinator.stop()


def test_a_model_forged_into_a_sites_inbox_by_the_administrator_is_refused(
    broker_env: BrokerEnv, tmp_path: Path, impersonator: pika.BlockingConnection
) -> None:
    # Prepare: cleveland's real agent and a coordinator that never makes a version during the test
    # (fedbuff waiting for 1000 updates), so the only other model in the inbox is the forged one
    processes = FedmqProcesses(broker_env.state_dir, tmp_path / "logs")
    config = write_coordinator_config(
        tmp_path / "coordinator.toml",
        url=broker_env.coordinator_url,
        sites=["cleveland"],
        state_dir=tmp_path / "coordinator",
        metrics_port=free_port(),
        keys_dir=broker_env.keys_dir,
        extra=coordinator_tables(strategy="fedbuff", strategy_params={"buffer_size": 1000}, max_versions=50),
    )
    site_config = append_site_tables(broker_env.add_site("cleveland").config_path)
    try:
        processes.start_coordinator(config)
        processes.start_site(site_config)
        processes.wait_for_log("cleveland", "model v0 received", timeout=60)
        model = task_from_options({"name": "heart-disease"}).build_model()

        # Execute: the administrator pushes a "v7" of the right architecture with every weight zeroed, signed
        # with a key of its own, then the same unsigned
        forged = GlobalModel(
            version=7,
            tensors={name: torch.zeros_like(tensor) for name, tensor in model.state_dict().items()},
            training=TrainingConfig(local_steps=5),
            fingerprint=ModelFingerprint(task="heart-disease", architecture=architecture_digest(model)),
            incarnation=GlobalModel.new_incarnation(),  # later than the coordinator's: it would supersede v0
        )
        channel = impersonator.channel()
        channel.confirm_delivery()
        channel.basic_publish("", site_inbox("cleveland"), sign(forged, generate_private_key()).encode())
        channel.basic_publish("", site_inbox("cleveland"), forged.encode())  # and unsigned

        # Assert: refused, said so, and the agent keeps training on v0
        processes.wait_for_log("cleveland", "refused a global model", timeout=30)
        log = processes.log("cleveland")
        assert "keeping model v0" in log
        assert "model v7 received" not in log
        processes.wait_for_log("cleveland", "update seq", timeout=60)
        assert "on v7" not in processes.log("cleveland")
    finally:
        processes.stop_all()
