"""The local node, declaring and provisioning, as an operator uses them (through the CLI where it matters)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pika
import pika.exceptions
import pytest

from broker import topology
from broker.declare import declare_topology_at
from broker.errors import BrokerStartError, DeclarationError, ProvisioningError
from broker.node import LocalNode
from broker.provisioning import add_site, read_broker_url
from broker.topology import Exchange, Kind, Queue
from fedmq.cli import main as fedmq_main

if TYPE_CHECKING:
    from tests.integration.conftest import BrokerEnv

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_fedmq(state_dir: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """The real command line, in a fresh process, as an operator types it."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "--state-dir", str(state_dir), "broker", *arguments],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": python_path},
        timeout=240,
        check=False,
    )


def beam_processes_under(directory: Path) -> list[int]:
    """Erlang VMs whose command line mentions ``directory`` (our node runs with HOME there)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            arguments = cmdline.read_bytes().split(b"\0")
            if arguments and arguments[0].endswith(b"beam.smp") and str(directory).encode() in arguments:
                pids.append(int(cmdline.parent.name))
    return pids


def fedmq_in_process(capsys: pytest.CaptureFixture[str], state_dir: Path, *arguments: str) -> tuple[int, str, str]:
    """The same command line run in this process: quicker than a fresh interpreter for the short commands."""
    exit_code = fedmq_main(["--state-dir", str(state_dir), "broker", *arguments])
    captured = capsys.readouterr()
    return exit_code, captured.out, captured.err


def test_operator_runs_a_node_and_provisions_a_hospital_through_the_cli(
    tmp_path: Path, free_tcp_ports: Callable[[int], list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    state_dir = tmp_path / "state"
    amqp, dist, management, prometheus = free_tcp_ports(4)
    ports = ["--amqp-port", str(amqp), "--dist-port", str(dist)]
    ports += ["--management-port", str(management), "--prometheus-port", str(prometheus)]
    try:
        # Execute / Assert: `up` in its own process prints where everything is, and the node outlives it
        up = run_fedmq(state_dir, "up", *ports)
        assert up.returncode == 0, up.stderr
        assert f"amqp://fedmq-coordinator:****@127.0.0.1:{amqp}/fedmq" in up.stdout
        assert f"http://127.0.0.1:{management}" in up.stdout
        assert f"http://127.0.0.1:{prometheus}/metrics" in up.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{prometheus}/metrics", timeout=10) as response:
            assert b"rabbitmq_" in response.read()
        exit_code, out, err = fedmq_in_process(capsys, state_dir, "status")
        assert exit_code == 0 and "is running" in out, out + err

        # add-site writes a private config file whose URL logs in
        exit_code, out, err = fedmq_in_process(capsys, state_dir, "add-site", "hospital-a")
        assert exit_code == 0, err
        config_path = Path(out.strip())
        assert config_path == state_dir / "sites" / "hospital-a.toml"
        assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
        site_url = read_broker_url(config_path)
        assert site_url.startswith("amqp://hospital-a:") and site_url.endswith(f"@127.0.0.1:{amqp}/fedmq")
        pika.BlockingConnection(pika.URLParameters(site_url)).close()

        exit_code, out, err = fedmq_in_process(capsys, state_dir, "list-sites")
        assert exit_code == 0, err
        assert any(line.split()[:2] == ["hospital-a", "ok"] for line in out.splitlines()), out

        exit_code, out, err = fedmq_in_process(capsys, state_dir, "remove-site", "hospital-a")
        assert exit_code == 0, err
        assert not config_path.exists()
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            pika.BlockingConnection(pika.URLParameters(site_url))

        exit_code, out, err = fedmq_in_process(capsys, state_dir, "down")
        assert exit_code == 0 and "stopped" in out, out + err
        assert fedmq_in_process(capsys, state_dir, "status")[0] == 3
        assert beam_processes_under(state_dir) == []
    finally:
        with contextlib.suppress(Exception):
            LocalNode.from_state_dir(state_dir).stop()


def test_starting_a_running_node_again_reports_it_instead_of_starting_twice(broker_node: LocalNode) -> None:
    # Execute
    started = broker_node.start()

    # Assert
    assert started is False
    assert broker_node.status().running
    assert len(beam_processes_under(broker_node.broker_dir)) == 1


def test_declaring_twice_is_harmless(broker_env: BrokerEnv) -> None:
    # Prepare: a provisioned site, one update waiting for the coordinator
    broker_env.add_site("hospital-a")
    channel = broker_env.connect(broker_env.coordinator_url).channel()
    channel.confirm_delivery()
    channel.basic_publish(Exchange.UPDATES.value, topology.routing_key("hospital-a", Kind.UPDATE), b"update")
    queues_before = {queue.name: queue.arguments for queue in broker_env.management.list_queues(broker_env.vhost)}

    # Execute
    declare_topology_at(broker_env.coordinator_url, ["hospital-a"])
    declare_topology_at(broker_env.coordinator_url, ["hospital-a"])

    # Assert: same queues with the same arguments, the waiting update kept, one binding per rule
    queues_after = {queue.name: queue.arguments for queue in broker_env.management.list_queues(broker_env.vhost)}
    assert queues_after == queues_before
    assert set(queues_after) == {queue.name for queue in topology.SHARED_QUEUES} | {
        queue.name for queue in topology.site_queues("hospital-a")
    }
    assert broker_env.message_count(topology.site_update_queue("hospital-a")) == 1
    bindings = broker_env.management.request(
        "GET", f"exchanges/{broker_env.vhost}/{Exchange.MODELS.value}/bindings/source"
    )
    assert len(bindings) == len(
        [b for b in topology.site_bindings("hospital-a") if b.exchange == Exchange.MODELS.value]
    )


def test_declaring_over_a_queue_with_other_arguments_names_the_conflict(broker_env: BrokerEnv) -> None:
    # Prepare: someone created the dead-letter queue as a classic queue
    channel = broker_env.connect(broker_env.admin_url).channel()
    channel.queue_delete(Queue.DEAD_LETTERS.value)
    channel.queue_declare(Queue.DEAD_LETTERS.value, durable=True)

    # Execute / Assert
    with pytest.raises(DeclarationError, match="406"):
        declare_topology_at(broker_env.coordinator_url)


def test_adding_an_existing_site_is_refused_unless_the_password_is_rotated(broker_env: BrokerEnv) -> None:
    # Prepare
    old = broker_env.add_site("hospital-a")

    def provision_again(*, rotate_password: bool) -> Path:
        return add_site(
            broker_env.management,
            site_id="hospital-a",
            amqp_host=broker_env.access.amqp_host,
            amqp_port=broker_env.access.amqp_port,
            vhost=broker_env.vhost,
            state_dir=broker_env.state_dir,
            rotate_password=rotate_password,
        )

    # Execute / Assert: refused, and the old password still works
    with pytest.raises(ProvisioningError, match="exists already"):
        provision_again(rotate_password=False)
    assert read_broker_url(old.config_path) == old.url

    # Execute / Assert: rotated, the new URL logs in and the old one no longer does
    path = provision_again(rotate_password=True)
    new_url = read_broker_url(path)
    assert new_url != old.url
    broker_env.connect(new_url)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(old.url))


def test_a_stale_pid_file_is_not_mistaken_for_a_running_node(tmp_path: Path) -> None:
    # Prepare: the pid file names a live process that is not this node (this test's own interpreter)
    node = LocalNode(tmp_path / "state")
    node.pid_file.parent.mkdir(parents=True)
    node.pid_file.write_text(str(os.getpid()))

    # Execute
    status = node.status()

    # Assert
    assert status.running is False and status.pid is None
    assert node.stop() is False
    assert not node.pid_file.exists()


def test_closing_a_users_connections_disconnects_the_client(broker_env: BrokerEnv) -> None:
    # Prepare
    site = broker_env.add_site("hospital-a")
    connection = broker_env.connect(site.url)

    # Execute
    broker_env.close_connections("hospital-a")

    # Assert: the client learns at once that the broker disconnected it (320 CONNECTION_FORCED)
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as disconnect:
        connection.process_data_events(time_limit=2)
    assert disconnect.value.reply_code == 320


def test_a_port_in_use_is_named_instead_of_starting_a_broken_node(
    tmp_path: Path, free_tcp_ports: Callable[[int], list[int]]
) -> None:
    # Prepare: something else listens on the AMQP port
    amqp, dist, management, prometheus = free_tcp_ports(4)
    node = LocalNode(
        tmp_path / "state", amqp_port=amqp, dist_port=dist, management_port=management, prometheus_port=prometheus
    )
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", amqp))
        squatter.listen()

        # Execute / Assert
        with pytest.raises(BrokerStartError, match=f"port {amqp} .*--amqp-port"):
            node.start()
    assert beam_processes_under(node.broker_dir) == []
