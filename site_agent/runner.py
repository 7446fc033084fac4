"""Run a site agent against RabbitMQ: connect outbound, reconnect with backoff, stop when told to.

The agent opens one outbound connection and no listening port. When the broker is unreachable or the connection
drops, ``run_reconnecting`` retries with capped, jittered backoff; the agent object (its outbox, its worker and
the model it holds) lives across connections, so nothing finished is lost.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from broker.keys import parse_public_key, read_private_key
from broker.pika_transport import ConnectionSettings, PikaTransport, run_reconnecting
from broker.transport import ConsumeRefused, TransportConnectionError
from site_agent.agent import LocalTrainer, SiteAgent, UpdateCounter
from site_agent.attacks import Attack
from site_agent.config import SiteConfig
from site_agent.signatures import SiteSigning
from tasks.registry import task_from_options

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1


def build_agent(config: SiteConfig) -> SiteAgent:
    torch.set_num_threads(config.agent.threads)
    task = task_from_options(config.task)
    data = task.load_data(config.site_id, config.task)
    log.info(
        "site %s: task %s, %d training and %d test examples (they stay here)",
        config.site_id,
        task.name,
        data.num_train,
        data.num_test,
    )
    trainer = LocalTrainer(config.site_id, task, data, seed=config.agent.seed, slowdown=config.agent.slowdown)
    counter = UpdateCounter(config.state_dir / f"{config.site_id}.agent-state.json")
    attack = Attack.parse(config.agent.attack) if config.agent.attack else None
    if attack is not None:
        log.warning("site %s runs as a POISONING ATTACKER (%s): a test and demo facility", config.site_id, attack)
    return SiteAgent(
        trainer,
        counter,
        heartbeat_seconds=config.agent.heartbeat_seconds,
        compression=config.agent.compression,
        retry_max_wait_seconds=config.agent.reconnect_max_wait_seconds,
        signing=build_signing(config),
        attack=attack,
    )


def build_signing(config: SiteConfig) -> SiteSigning:
    """The site's key and the coordinator's; with ``required``, both must be there (ValueError saying which)."""
    signing = config.signing
    key_file = Path(signing.key_file)
    if signing.required and not key_file.exists():
        raise ValueError(
            f"no signing key {key_file}: make it here with `fedmq site keygen {config.site_id}` and send its .pub "
            "to the federation operator (or set [signing] required = false)"
        )
    if signing.required and not signing.coordinator_public_key:
        raise ValueError(
            "[signing] coordinator_public_key is missing: use the site file `fedmq broker add-site` wrote "
            "(or set [signing] required = false)"
        )
    private_key = read_private_key(key_file) if key_file.exists() else None
    coordinator_key = parse_public_key(signing.coordinator_public_key) if signing.coordinator_public_key else None
    if private_key is None:
        log.warning("no signing key %s: updates go unsigned (the coordinator may refuse them)", key_file)
    return SiteSigning(private_key, coordinator_key, required=signing.required)


def connection_settings(config: SiteConfig) -> ConnectionSettings:
    return ConnectionSettings(
        url=config.broker_url,
        ca_file=config.ca_file,
        cert_file=config.cert_file,
        key_file=config.key_file,
        connection_name=f"fedmq-site-{config.site_id}",
    )


def run(config: SiteConfig, agent: SiteAgent, stop: threading.Event) -> int:
    """Serve until the coordinator says stop (0), ``stop`` is set (0), or a refusal no retry can mend stops the
    agent (1: ``agent.failure`` says why; systemd's Restart=on-failure then tries again later)."""
    settings = connection_settings(config)

    def session(transport: PikaTransport) -> None:
        agent.attach(transport)
        log.info("connected; waiting for the global model")
        while not stop.is_set() and not agent.stopped:
            transport.poll(POLL_SECONDS)
            agent.step()
        agent.step()  # send what is finished before leaving

    try:
        run_reconnecting(
            settings,
            session,
            should_stop=lambda: stop.is_set() or agent.stopped,
            max_wait_seconds=config.agent.reconnect_max_wait_seconds,
            # the inbox not declared yet, or deleted: wait (ever longer) for provisioning rather than exit
            retry_on=(TransportConnectionError, ConsumeRefused),
        )
    finally:
        agent.close()
    if agent.failure:
        log.error("site agent stopped after sending %d updates: %s", agent.updates_sent, agent.failure)
        return 1
    if agent.stopped:
        log.info("stopped by the coordinator (%s) after sending %d updates", agent.stop_reason, agent.updates_sent)
    else:
        log.info("site agent closed after sending %d updates", agent.updates_sent)
    return 0
