"""The coordinator's state dir on a real filesystem that fails: a small tmpfs the test mounts, then makes read-only
or fills up, under a real coordinator process and a real RabbitMQ.

Needs root (to mount); skipped with the reason otherwise. What is asserted is what an operator and an auditor see:
the exit code, the audit log, the queue, and every confirmed update applied exactly once in the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from broker.topology import site_update_queue
from coordinator.cli import EXIT_STORAGE_ERROR
from tests.integration.conftest import BrokerEnv
from tests.integration.coordinator_process import (
    CoordinatorProcess,
    ScriptedSite,
    free_port,
    wait_for,
    write_coordinator_config,
)

pytestmark = pytest.mark.integration

TMPFS_MB = 16
SITE = "hospital-a"


def _mount(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *arguments], capture_output=True, text=True, check=False)


@contextmanager
def small_tmpfs(mountpoint: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` at ``mountpoint``, unmounted afterwards; the test is skipped when it cannot be had."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the state dir needs root")
    mountpoint.mkdir(parents=True, exist_ok=True)
    mounted = _mount("-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mountpoint))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


def start_coordinator(broker_env: BrokerEnv, tmp_path: Path, state_dir: Path, extra: str = "") -> CoordinatorProcess:
    port = free_port()
    config = write_coordinator_config(
        tmp_path / "coordinator.toml",
        url=broker_env.coordinator_url,
        sites=[SITE],
        state_dir=state_dir,
        metrics_port=port,
        extra="""[strategy]
name = "fedbuff"
max_staleness = 1000
buffer_size = 3
"""
        + extra,
    )
    coordinator = CoordinatorProcess(config, state_dir, port, tmp_path / "coordinator.log")
    coordinator.start()
    coordinator.wait_ready()
    return coordinator


def accepted(coordinator: CoordinatorProcess) -> Counter[str]:
    return Counter(str(r["update_id"]) for r in coordinator.audit_records() if r["outcome"] == "accepted")


def publish(site: ScriptedSite, count: int) -> list[str]:
    """``count`` updates on the site's current model, each confirmed by the broker; their ids."""
    model = site.latest_model()
    sent = []
    for _ in range(count):
        update = site.update(model)
        site.publish(update.encode())
        sent.append(update.update_id)
    return sent


def test_a_state_dir_gone_read_only_stops_the_coordinator_before_any_ack_and_nothing_is_lost(
    broker_env: BrokerEnv, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "disk", TMPFS_MB) as disk:
        # Prepare: a run on the tmpfs with three updates committed
        url = broker_env.add_site(SITE).url
        state_dir = disk / "coordinator"
        coordinator = start_coordinator(broker_env, tmp_path, state_dir, extra="[storage]\nreserve_mb = 1\n")
        site = ScriptedSite(SITE, url)
        try:
            confirmed = publish(site, 3)
            wait_for(lambda: len(accepted(coordinator)) == 3, 30, "the first updates were never committed")

            # Execute: the checkpoint's directory goes read-only (a read-only bind mount of it: a whole filesystem
            # cannot be remounted read-only while the audit log is open for writing); three more updates arrive
            checkpoint_dir = state_dir / "checkpoint"
            bound = _mount("--bind", str(checkpoint_dir), str(checkpoint_dir))
            assert bound.returncode == 0, bound.stderr
            read_only = _mount("-o", "remount,ro,bind", str(checkpoint_dir))
            assert read_only.returncode == 0, read_only.stderr
            confirmed += publish(site, 3)
            assert coordinator.process is not None
            exit_code = coordinator.process.wait(timeout=60)
            waiting = broker_env.message_count(site_update_queue(SITE))
            audited_while_read_only = accepted(coordinator)
            unmounted = subprocess.run(["umount", str(checkpoint_dir)], capture_output=True, text=True, check=False)
            assert unmounted.returncode == 0, unmounted.stderr
            coordinator.start()
            coordinator.wait_ready()
            wait_for(lambda: len(accepted(coordinator)) == 6, 60, "the updates of the failed commit were not applied")
            wait_for(lambda: broker_env.message_count(site_update_queue(SITE)) == 0, 30, "the queue never drained")
        finally:
            site.close()
            coordinator.stop()

        # Assert: the coordinator stopped with the storage exit code (not a reconnect), nothing of the failed batch
        # was acked (all three still in the queue), and in the end each confirmed update was applied exactly once
        log = coordinator.log_path.read_text()
        assert exit_code == EXIT_STORAGE_ERROR, log[-3000:]
        assert "Read-only file system" in log and "reconnecting" not in log
        assert waiting == 3
        assert sorted(audited_while_read_only) == sorted(confirmed[:3])
        final = accepted(coordinator)
        assert sorted(final) == sorted(confirmed) and set(final.values()) == {1}
        verify = subprocess.run(
            [sys.executable, "-m", "fedmq", "audit", "verify", str(state_dir / "audit.jsonl")],
            capture_output=True,
            text=True,
        )
        assert verify.returncode == 0, verify.stdout


def test_a_full_state_dir_holds_commits_unacked_until_there_is_room(broker_env: BrokerEnv, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", TMPFS_MB) as disk:
        # Prepare: a run on the tmpfs keeping 4 MiB free for everything but commits
        url = broker_env.add_site(SITE).url
        state_dir = disk / "coordinator"
        coordinator = start_coordinator(broker_env, tmp_path, state_dir, extra="[storage]\nreserve_mb = 4\n")
        site = ScriptedSite(SITE, url)
        filler = disk / "filler"
        try:
            confirmed = publish(site, 3)
            wait_for(lambda: len(accepted(coordinator)) == 3, 30, "the first updates were never committed")

            # Execute: something else fills the disk to 3 MiB free; three more updates arrive; then it is freed
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            with filler.open("wb") as handle:
                handle.write(bytes(free - 3 * 1024 * 1024))
            confirmed += publish(site, 3)

            def deferred() -> float:
                return sum(coordinator.metrics().get("fedmq_commits_deferred_total", {}).values())

            wait_for(lambda: deferred() >= 2, 30, "the coordinator never put a commit off")
            held = (len(accepted(coordinator)), coordinator.metrics()["fedmq_state_dir_free_bytes"][()])
            filler.unlink()
            wait_for(lambda: len(accepted(coordinator)) == 6, 30, "the held updates were not committed once freed")
            wait_for(lambda: broker_env.message_count(site_update_queue(SITE)) == 0, 30, "the queue never drained")
            assert coordinator.process is not None and coordinator.process.poll() is None
        finally:
            site.close()
            coordinator.stop()

        # Assert: while full, nothing of the new batch was committed (and the free space was exported); afterwards
        # every confirmed update was applied exactly once, by the same process
        assert held[0] == 3
        assert held[1] <= 3 * 1024 * 1024
        final = accepted(coordinator)
        assert sorted(final) == sorted(confirmed) and set(final.values()) == {1}
        assert "not committing" in coordinator.log_path.read_text()
