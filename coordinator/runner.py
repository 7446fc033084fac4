"""Build a coordinator from its config and run it against RabbitMQ until it finishes or is told to stop.

This is the only coordinator module that knows about pika (through ``broker.pika_transport``); the service
itself sees a ``Transport``. A dropped connection is re-established with capped, jittered backoff and the
service carries on where its checkpoint left it; unacked deliveries come back and are de-duplicated.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from broker.declare import declare_topology_at
from broker.errors import BrokerNotReachable
from broker.keys import KEYS_DIRNAME, SiteKeyRegistry, coordinator_key_path, ensure_coordinator_key, site_keys_dir
from broker.pika_transport import ConnectionSettings, PikaTransport, run_reconnecting
from broker.transport import TransportConnectionError
from coordinator.aggregation.build import build_strategy
from coordinator.audit import AuditLog
from coordinator.checkpoint import CheckpointStore
from coordinator.config import CoordinatorConfig
from coordinator.evaluation import EvaluationBook
from coordinator.metrics import CoordinatorMetrics
from coordinator.service import Coordinator
from coordinator.signatures import Signer, UpdateSignatures
from coordinator.storage import make_directory, storage_writes
from schemas import ModelFingerprint
from tasks.base import architecture_digest
from tasks.registry import task_from_options

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25


def state_paths(config: CoordinatorConfig) -> dict[str, Path]:
    directory = config.state_dir
    return {
        "checkpoint": directory / "checkpoint",
        "audit": directory / "audit.jsonl",
        "evaluations": directory / "evaluations.jsonl",
        "summary": directory / "run_summary.json",
        "final_model": directory / "final_model.safetensors",
    }


def signing_paths(config: CoordinatorConfig) -> tuple[Path, Path]:
    """The key registry and the coordinator's private key: ``[signing]``, or ``keys/`` in the state dir."""
    keys = config.signing.keys_dir or config.state_dir / KEYS_DIRNAME
    return keys, config.signing.key_file or coordinator_key_path(keys)


def build_coordinator(config: CoordinatorConfig, registry: CollectorRegistry) -> Coordinator:
    """Version 0 comes from the task (seeded), then any checkpoint in the state dir takes over."""
    with storage_writes(str(config.state_dir)):
        make_directory(config.state_dir)
    keys, key_file = signing_paths(config)
    signer = Signer(ensure_coordinator_key(key_file))
    paths = state_paths(config)
    task = task_from_options({**config.task_options, "name": config.task})
    torch.manual_seed(config.seed)
    model = task.build_model()
    initial = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    coordinator = Coordinator(
        config,
        strategy=build_strategy(config.strategy, config.sites),
        initial_params=initial,
        fingerprint=ModelFingerprint(task=task.name, architecture=architecture_digest(model)),
        metrics=CoordinatorMetrics(registry),
        audit=AuditLog(paths["audit"]),
        evaluations=EvaluationBook(paths["evaluations"]),
        checkpoints=CheckpointStore(paths["checkpoint"]),
        signer=signer,
        update_signatures=UpdateSignatures(
            SiteKeyRegistry(site_keys_dir(keys)).public_key, required=config.signing.required
        ),
    )
    log.info("incarnation %d: every model this process publishes carries it", coordinator.incarnation)
    missing = [site for site in config.sites if not (site_keys_dir(keys) / f"{site}.pub").exists()]
    log.info("signing models with %s (public key %s)", key_file, signer.public_key_text)
    if missing and config.signing.required:
        log.warning(
            "no signing key registered in %s for %s: their updates are refused as bad-signature until "
            "`fedmq broker rotate-site-key NAME --public-key FILE` registers one",
            site_keys_dir(keys),
            ", ".join(missing),
        )
    if not coordinator.restore():
        log.info(
            "new run: task %s, strategy %s, %d sites, model v0 with %d parameters",
            config.task,
            config.strategy.name,
            len(config.sites),
            sum(tensor.numel() for tensor in initial.values()),
        )
    return coordinator


def connection_settings(config: CoordinatorConfig) -> ConnectionSettings:
    return ConnectionSettings(
        url=config.broker.url,
        ca_file=config.broker.ca_file,
        cert_file=config.broker.cert_file,
        key_file=config.broker.key_file,
        connection_name="fedmq-coordinator",
    )


def run(coordinator: Coordinator, stop: threading.Event) -> None:
    """Serve until the stopping rule finishes the run or ``stop`` is set (SIGTERM): each handled update is
    already checkpointed, so stopping only needs a clean close."""
    config = coordinator.config
    settings = connection_settings(config)

    def session(transport: PikaTransport) -> None:
        try:
            declare_topology_at(settings.parameters(), config.sites)
        except BrokerNotReachable as exc:
            raise TransportConnectionError(str(exc)) from exc
        coordinator.attach(transport)
        while not stop.is_set() and not coordinator.finished:
            transport.poll(POLL_SECONDS)
            coordinator.tick()
        coordinator.commit()  # a batch still gathering: ack what is handled rather than have it redelivered

    run_reconnecting(settings, session, should_stop=lambda: stop.is_set() or coordinator.finished)
    coordinator.audit.close()
    log.info("coordinator closed cleanly at model v%d", coordinator.state.version)
