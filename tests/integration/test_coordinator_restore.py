"""A coordinator restored from an older backup of its state dir, with a real site agent running all along.

The site holds a model of a version the restored coordinator never had. Each coordinator start draws a new
incarnation, and the site follows the newest one even at a lower version: its next accepted update is based on the
restored model, and the run finishes. Real processes (``fedmq coordinator run``, ``fedmq site run``) on a real
RabbitMQ, as in ``test_federation.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

from tests.integration.conftest import BrokerEnv
from tests.integration.coordinator_process import CoordinatorProcess, free_port, write_coordinator_config
from tests.integration.federation_helpers import (
    FedmqProcesses,
    accepted_updates,
    append_site_tables,
    coordinator_tables,
    read_audit,
    times_accepted,
    wait_until,
)

SITE = "cleveland"
MAX_VERSIONS = 24


def scrape_version(metrics_port: int) -> float | None:
    """fedmq_model_version from the coordinator's endpoint (None while it is not up)."""
    try:
        samples = CoordinatorProcess(Path(), Path(), metrics_port, Path()).metrics()
    except OSError:
        return None
    return next(iter(samples.get("fedmq_model_version", {}).values()), None)


def stop_coordinator(processes: FedmqProcesses) -> int:
    """SIGTERM, as ``systemctl stop`` does; returns the version it closed at (from its last log line)."""
    processes.processes["coordinator"].send_signal(signal.SIGTERM)
    assert processes.wait_exit("coordinator", timeout=60) == 0, processes.logs()
    closed = re.findall(r"coordinator closed cleanly at model v(\d+)", processes.log("coordinator"))
    return int(closed[-1])


def newest_model_received(site_log: str) -> int:
    return max((int(version) for version in re.findall(r"model v(\d+) received", site_log)), default=-1)


def start_coordinator_until(processes: FedmqProcesses, config: Path, metrics_port: int, version: int) -> float:
    """Start the coordinator and wait until it has made ``version``; returns the time it was started."""
    started = time.time()
    processes.start_coordinator(config)
    wait_until(
        lambda: (scrape_version(metrics_port) or -1) >= version,
        90,
        f"the coordinator never reached v{version}",
        processes,
    )
    return started


def test_site_follows_a_coordinator_restored_from_an_older_backup_and_the_run_finishes(
    broker_env: BrokerEnv, tmp_path: Path, processes: FedmqProcesses
) -> None:
    # Prepare: a slow hospital (an update every half second or so), so versions come at a pace the test follows
    site_config = append_site_tables(broker_env.add_site(SITE).config_path, slowdown=15.0)
    state_dir, backup_dir, metrics_port = tmp_path / "coordinator", tmp_path / "backup", free_port()
    config = write_coordinator_config(
        tmp_path / "coordinator.toml",
        url=broker_env.coordinator_url,
        sites=[SITE],
        state_dir=state_dir,
        metrics_port=metrics_port,
        extra=coordinator_tables(strategy="fedasync", max_versions=MAX_VERSIONS, local_steps=50),
    )
    processes.start_site(site_config)
    start_coordinator_until(processes, config, metrics_port, 3)
    backup_version = stop_coordinator(processes)
    shutil.copytree(state_dir, backup_dir)  # the backup, taken with the service stopped as DEPLOYMENT.md says

    # Prepare: the coordinator goes on well past the backup, and the site with it
    start_coordinator_until(processes, config, metrics_port, backup_version + 5)
    assert stop_coordinator(processes) < MAX_VERSIONS
    wait_until(
        lambda: newest_model_received(processes.log(SITE)) >= backup_version + 5,
        30,
        f"the site never received v{backup_version + 5}",
        processes,
    )
    held_version = newest_model_received(processes.log(SITE))

    # Execute: the state dir is restored from the backup and the coordinator started on it
    shutil.rmtree(state_dir)
    shutil.copytree(backup_dir, state_dir)
    site_log_before_restore = len(processes.log(SITE))
    restored_at = time.time()
    processes.start_coordinator(config)
    exit_codes = (processes.wait_exit("coordinator", timeout=120), processes.wait_exit(SITE, timeout=60))

    # Assert: both finished by themselves, the run at its last version
    assert exit_codes == (0, 0), processes.logs()
    coordinator_log = processes.log("coordinator")
    assert f"resumed from checkpoint: model v{backup_version}" in coordinator_log
    incarnations = [int(value) for value in re.findall(r"incarnation (\d+): every model", coordinator_log)]
    assert len(incarnations) == 3 and incarnations == sorted(incarnations), incarnations
    # ... the site took the restored model, though lower than the one it held ...
    site_log = processes.log(SITE)[site_log_before_restore:]
    assert (
        f"model v{backup_version} received from a new coordinator incarnation {incarnations[2]} "
        f"(it restarted or was restored from an older backup; this site held v{held_version}"
    ) in site_log, site_log[-3000:]
    assert "stopped by the coordinator" in site_log
    # ... the restored coordinator's first accepted update is based on the restored model, and every later one on
    # its own versions; nothing it accepted was counted twice
    records = read_audit(state_dir / "audit.jsonl")
    after_restore = [record for record in accepted_updates(records) if record["time"] >= restored_at]
    assert after_restore, processes.logs()
    assert after_restore[0]["base_version"] == backup_version
    assert all(record["base_version"] >= backup_version for record in after_restore)
    assert set(times_accepted(records).values()) == {1}
    summary = json.loads((state_dir / "run_summary.json").read_text())
    assert summary["versions"] == MAX_VERSIONS
