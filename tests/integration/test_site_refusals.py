"""A real site agent whose updates the real broker refuses: a refusal that passes loses nothing, one that cannot
pass stops the agent with a reason.

Real processes (``fedmq coordinator run``, ``fedmq site run``) on a real RabbitMQ, as in ``test_federation.py``;
the refusals are made the way they happen in production: the updates queue loses its binding for a while (as when
it is declared again), or the site loses its permission to publish updates.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from broker.topology import Exchange, site_bindings, site_permissions
from tests.integration.conftest import BrokerEnv
from tests.integration.coordinator_process import free_port, write_coordinator_config
from tests.integration.federation_helpers import (
    FedmqProcesses,
    accepted_updates,
    append_site_tables,
    coordinator_tables,
    read_audit,
    times_accepted,
)

SITE = "cleveland"
UPDATES_BINDING = next(binding for binding in site_bindings(SITE) if binding.exchange == Exchange.UPDATES.value)


def start_federation(broker_env: BrokerEnv, tmp_path: Path, processes: FedmqProcesses, max_versions: int) -> Path:
    """A slow hospital and a FedAsync coordinator; returns the coordinator's state dir."""
    site_config = append_site_tables(broker_env.add_site(SITE).config_path, slowdown=15.0)
    state_dir = tmp_path / "coordinator"
    config = write_coordinator_config(
        tmp_path / "coordinator.toml",
        url=broker_env.coordinator_url,
        sites=[SITE],
        state_dir=state_dir,
        metrics_port=free_port(),
        extra=coordinator_tables(strategy="fedasync", max_versions=max_versions, local_steps=50),
    )
    processes.start_coordinator(config)
    processes.start_site(site_config)
    processes.wait_for_log(SITE, "update seq 2 on v")
    return state_dir


def test_updates_refused_while_their_queue_is_unbound_are_kept_and_applied_once_it_is_bound_again(
    broker_env: BrokerEnv, tmp_path: Path, processes: FedmqProcesses
) -> None:
    # Prepare
    state_dir = start_federation(broker_env, tmp_path, processes, max_versions=10)
    admin = broker_env.connect(broker_env.admin_url).channel()

    # Execute: the updates queue loses its binding (its publishes come back unroutable, 312) for a few seconds
    admin.queue_unbind(UPDATES_BINDING.queue, UPDATES_BINDING.exchange, UPDATES_BINDING.routing_key)
    processes.wait_for_log(SITE, "keeping it, retry 3 in")
    admin.queue_bind(UPDATES_BINDING.queue, UPDATES_BINDING.exchange, UPDATES_BINDING.routing_key)
    exit_codes = (processes.wait_exit("coordinator"), processes.wait_exit(SITE))

    # Assert: the run finished; the refused update went out after its refusals and was applied, once ...
    assert exit_codes == (0, 0), processes.logs()
    site_log = processes.log(SITE)
    refused_seq = int(re.findall(r"broker refused update seq (\d+) on v\d+ \(", site_log)[0])
    assert re.search(rf"update seq {refused_seq} on v\d+ sent after \d+ refusal\(s\)", site_log), site_log[-3000:]
    assert "dropping" not in site_log
    records = read_audit(state_dir / "audit.jsonl")
    assert set(times_accepted(records).values()) == {1}
    seqs = sorted(int(record["seq"]) for record in accepted_updates(records))
    # ... and no update finished meanwhile was lost: the applied ones run without a gap from the first
    assert refused_seq in seqs
    assert seqs == list(range(1, len(seqs) + 1))


def test_a_site_that_lost_its_permission_to_send_updates_stops_with_the_reason_and_exit_status_1(
    broker_env: BrokerEnv, tmp_path: Path, processes: FedmqProcesses
) -> None:
    # Prepare
    start_federation(broker_env, tmp_path, processes, max_versions=1000)
    granted = site_permissions(SITE)

    # Execute: the site may publish status but no longer updates (403 ACCESS_REFUSED); its next connection sees it
    broker_env.management.set_permissions(
        broker_env.vhost, SITE, configure=granted.configure, write=f"^{Exchange.STATUS.value}$", read=granted.read
    )
    broker_env.close_connections(SITE)
    started = time.monotonic()
    exit_code = processes.wait_exit(SITE, timeout=90)

    # Assert: it tried a few times, then stopped by itself, saying why and what to do
    assert exit_code == 1, processes.logs()
    site_log = processes.log(SITE)
    assert len(re.findall(r"broker refused update seq \d+ on v\d+ .*reply code 403\); keeping it", site_log)) == 2
    assert "stopping: the broker refused update seq" in site_log
    assert "fedmq broker add-site" in site_log and "ACCESS_REFUSED" in site_log
    assert time.monotonic() - started < 60
