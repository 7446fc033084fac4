"""Integration fixtures: one real RabbitMQ node per test session, one throwaway vhost per test.

The node is started by the same code as ``fedmq broker up`` (``broker.node.LocalNode``), on free ports, under a
temporary state dir, and stopped at the end of the session even when tests fail. It takes about 5 s to start
and 6 s to stop, so no test starts its own node unless it tests the node itself.

Fixtures:

``broker_node`` (session)
    the running ``LocalNode``; ``broker_node.access`` has the admin credentials and URLs.

``broker_env`` (function) -> ``BrokerEnv``
    a fresh vhost (``fedmq-test-<random>``) with the whole topology declared and the coordinator user
    (``fedmq-coordinator``) permitted on it; deleted after the test with everything in it. Use it as::

        def test_something(broker_env: BrokerEnv) -> None:
            site = broker_env.add_site("hospital-a")           # user, permissions, queues, config file
            site.url, site.config_path                          # amqp://hospital-a:...@127.0.0.1:PORT/VHOST
            broker_env.coordinator_url                          # amqp://fedmq-coordinator:...@.../VHOST
            connection = broker_env.connect(site.url)           # pika BlockingConnection, closed at teardown
            broker_env.message_count(site_update_queue("hospital-a"))  # exact, over AMQP (not the lagging HTTP stats)
            broker_env.close_connections("hospital-a")          # force a disconnect now (reconnect tests)

    Site users are node-wide (RabbitMQ users are not per vhost): the ones ``add_site`` creates are deleted
    at teardown, so tests can all use readable names such as ``hospital-a`` as long as they run one at a time.
    ``broker_env.state_dir`` is a per-test state dir (site config files, coordinator-broker.toml, ``keys/``).
    ``add_site`` also makes the site's signing key pair (``site_key_file``) and registers its public key, so
    real site agents and a coordinator given ``keys_dir=broker_env.keys_dir`` sign and check end to end.

``processes`` (function) -> ``FedmqProcesses``
    real ``fedmq coordinator run`` and ``fedmq site run`` processes on ``broker_env``, stopped at teardown.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pika
import pytest

from broker.declare import declare_topology_at
from broker.keys import generate_private_key, keys_dir, public_key_path, write_key_pair
from broker.management import ManagementClient
from broker.node import BrokerAccess, LocalNode
from broker.provisioning import (
    SiteCredentials,
    add_site,
    amqp_url,
    ensure_coordinator_user,
    read_broker_url,
    remove_site,
)

if TYPE_CHECKING:
    from tests.integration.federation_helpers import FedmqProcesses

NODE_START_TIMEOUT = 120.0


@dataclass
class BrokerEnv:
    """One test's slice of the session's broker: its own vhost, state dir, sites and connections."""

    node: LocalNode
    access: BrokerAccess
    management: ManagementClient
    vhost: str
    state_dir: Path
    coordinator_url: str
    admin_url: str
    _site_ids: list[str] = field(default_factory=list)
    _connections: list[pika.BlockingConnection] = field(default_factory=list)

    def amqp_url(self, user: str, password: str) -> str:
        """A URL for any user/password on this test's vhost."""
        return amqp_url(user, password, self.access.amqp_host, self.access.amqp_port, self.vhost)

    @property
    def keys_dir(self) -> Path:
        """The key registry (``broker.keys``): the coordinator's key pair and ``sites/NAME.pub``."""
        return keys_dir(self.state_dir)

    def site_key_file(self, site_id: str) -> Path:
        """The site's private signing key, where its config file's ``[signing] key_file`` default finds it."""
        return self.state_dir / "sites" / f"{site_id}.signing.key"

    def add_site(self, site_id: str) -> SiteCredentials:
        """Provision a site exactly as ``fedmq site keygen`` + ``fedmq broker add-site --public-key`` do (removed
        again at teardown)."""
        key_file = self.site_key_file(site_id)
        if not key_file.exists():
            write_key_pair(key_file, generate_private_key())
        config_path = add_site(
            self.management,
            site_id=site_id,
            amqp_host=self.access.amqp_host,
            amqp_port=self.access.amqp_port,
            vhost=self.vhost,
            state_dir=self.state_dir,
            public_key_file=public_key_path(key_file),
        )
        self._site_ids.append(site_id)
        return SiteCredentials(site_id=site_id, url=read_broker_url(config_path), config_path=config_path)

    def connect(self, url: str) -> pika.BlockingConnection:
        """A blocking pika connection that teardown closes if the test did not."""
        connection = pika.BlockingConnection(pika.URLParameters(url))
        self._connections.append(connection)
        return connection

    def message_count(self, queue: str) -> int:
        """Messages ready in ``queue`` right now (passive declare as the admin; exact, no stats lag)."""
        connection = pika.BlockingConnection(pika.URLParameters(self.admin_url))
        try:
            frame = connection.channel().queue_declare(queue=queue, passive=True)
            return int(frame.method.message_count)
        finally:
            connection.close()

    def close_connections(self, user: str) -> None:
        """Force-close every connection of ``user`` at once (the client sees 320 CONNECTION_FORCED)."""
        self.node.close_user_connections(user, reason="closed by test")

    def cleanup(self) -> None:
        for connection in self._connections:
            with contextlib.suppress(Exception):
                if connection.is_open:
                    connection.close()
        for site_id in self._site_ids:
            with contextlib.suppress(Exception):
                remove_site(self.management, site_id=site_id, vhost=self.vhost, state_dir=self.state_dir)
        self.management.delete_vhost(self.vhost)


@pytest.fixture(scope="session")
def broker_node(
    tmp_path_factory: pytest.TempPathFactory, free_tcp_ports: Callable[[int], list[int]]
) -> Iterator[LocalNode]:
    amqp_port, dist_port, management_port, prometheus_port = free_tcp_ports(4)
    node = LocalNode(
        tmp_path_factory.mktemp("broker-node"),
        amqp_port=amqp_port,
        dist_port=dist_port,
        management_port=management_port,
        prometheus_port=prometheus_port,
        statistics_interval_ms=1000,  # queue and connection stats refresh fast enough for tests to poll
    )
    try:
        node.start(timeout=NODE_START_TIMEOUT)
        yield node
    finally:
        node.stop()


@contextlib.contextmanager
def open_broker_env(node: LocalNode, state_dir: Path) -> Iterator[BrokerEnv]:
    """A fresh vhost on ``node`` with the topology and the coordinator user, deleted on exit.

    The ``broker_env`` fixture on the session's node; a test (or the fault campaign's benchmark) that needs a
    node of its own, e.g. to kill it, calls it on that node.
    """
    access = node.access
    management = access.management()
    vhost = f"fedmq-test-{uuid.uuid4().hex[:10]}"
    management.create_vhost(vhost)
    management.set_permissions(vhost, access.admin_user, configure=".*", write=".*", read=".*")
    coordinator_file = ensure_coordinator_user(
        management, vhost=vhost, amqp_host=access.amqp_host, amqp_port=access.amqp_port, state_dir=state_dir
    )
    coordinator_url = read_broker_url(coordinator_file)
    declare_topology_at(coordinator_url)  # as the coordinator service will: it owns the topology
    env = BrokerEnv(
        node=node,
        access=access,
        management=management,
        vhost=vhost,
        state_dir=state_dir,
        coordinator_url=coordinator_url,
        admin_url=access.admin_url(vhost),
    )
    try:
        yield env
    finally:
        env.cleanup()


@pytest.fixture
def broker_env(broker_node: LocalNode, tmp_path: Path) -> Iterator[BrokerEnv]:
    with open_broker_env(broker_node, tmp_path / "state") as env:
        yield env


@pytest.fixture
def processes(broker_env: BrokerEnv, tmp_path: Path) -> Iterator[FedmqProcesses]:
    """Real ``fedmq coordinator run`` / ``fedmq site run`` processes of one test, all stopped at its end."""
    from tests.integration.federation_helpers import FedmqProcesses

    group = FedmqProcesses(broker_env.state_dir, tmp_path / "logs")
    try:
        yield group
    finally:
        group.stop_all()
    assert group.running() == []
