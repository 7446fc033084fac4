"""The campaign's cases, each a function ``(env, workdir, settings) -> CampaignFigures``.

The suite runs them with ``CampaignSettings.short()`` (tests/integration/test_fault_campaign.py), and with
``CampaignSettings.full()`` when ``FEDMQ_CAMPAIGN=full``; ``python -m tests.faults`` runs them outside pytest
on a node of its own and prints the table. A case only injects its fault and returns the figures; what must hold
(lost == 0, ...) is asserted by the caller.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from broker.node import LocalNode, free_tcp_ports
from tests.faults.figures import CampaignFigures
from tests.faults.harness import Campaign, CoordinatorOptions, Pace
from tests.faults.tools import (
    SmallMount,
    TcpProxy,
    crash_loop,
    hold_through_a_restart,
    kill_at_random_moments,
    kill_broker,
    memory_alarm,
)

if TYPE_CHECKING:
    from tests.integration.conftest import BrokerEnv

CAMPAIGN_ENV = "FEDMQ_CAMPAIGN"  # "full": the long campaign (the suite runs the short one)
# Three sites, ~10 updates/s each, until the case stops them (the cap is only a safety net).
SUITE_PACE = Pace(sites=3, updates=100_000, interval=0.1)


@dataclass(frozen=True)
class CampaignSettings:
    """Every duration and count of the campaign in one place."""

    name: str = "short"
    test_timeout_seconds: float = 300.0  # per case, for pytest-timeout
    random_kills: int = 10
    crash_loop_kills: int = 8
    restart_delay: float = 0.5  # the systemd unit waits 10 s (RestartSec)
    connection_cut_seconds: float = 5.0
    memory_alarm_seconds: float = 10.0
    storage_fault_seconds: float = 8.0
    broker_down_seconds: float = 1.0
    pace: Pace = SUITE_PACE
    seed: int = 12

    @classmethod
    def short(cls) -> CampaignSettings:
        return cls()

    @classmethod
    def full(cls) -> CampaignSettings:
        """The issue's figures: 30 s cuts, a 20 s alarm, 40 s storage faults, systemd's 10 s restart delay."""
        return cls(
            name="full",
            test_timeout_seconds=1800.0,
            random_kills=30,
            crash_loop_kills=8,
            restart_delay=10.0,
            connection_cut_seconds=30.0,
            memory_alarm_seconds=20.0,
            storage_fault_seconds=40.0,
            broker_down_seconds=5.0,
        )

    @classmethod
    def from_name(cls, name: str | None) -> CampaignSettings:
        return cls.full() if (name or "").strip().lower() == "full" else cls.short()


def _run(campaign: Campaign, fault: Callable[[], None], *, settle: float = 2.0) -> CampaignFigures:
    """Start, let the sites publish for ``settle`` seconds, inject ``fault``, publish ``settle`` more, finish."""
    try:
        campaign.start()
        time.sleep(settle)
        fault()
        time.sleep(settle)
        campaign.stop_sites()
        return campaign.finish()
    except BaseException:
        campaign.abort()
        raise


def coordinator_sigkill(env: BrokerEnv, workdir: Path, settings: CampaignSettings) -> CampaignFigures:
    """SIGKILL the coordinator at random moments, ``random_kills`` times, while three sites publish."""
    campaign = Campaign(
        env, workdir, case="coordinator-sigkill", pace=settings.pace, restart_delay=settings.restart_delay
    )
    rng = random.Random(settings.seed)
    return _run(campaign, lambda: kill_at_random_moments(campaign.supervisor, settings.random_kills, rng))


def coordinator_crash_loop(env: BrokerEnv, workdir: Path, settings: CampaignSettings) -> CampaignFigures:
    """SIGKILL every restarted coordinator right after it handled its first update, ``crash_loop_kills`` times.

    With the issue's settings (FedBuff K=50, prefetch 100): a restarted coordinator takes a whole window of
    redelivered updates before its first commit, so the same window returns to the queue on every kill."""
    campaign = Campaign(
        env,
        workdir,
        case="coordinator-crash-loop",
        pace=settings.pace,
        restart_delay=settings.restart_delay,
        options=CoordinatorOptions(update_prefetch=100, buffer_size=50),
    )

    def fault() -> None:
        crash_loop(campaign.supervisor, settings.crash_loop_kills)

    return _run(campaign, fault)


def site_connection_cut(env: BrokerEnv, workdir: Path, settings: CampaignSettings) -> CampaignFigures:
    """Cut one site's connection to the broker for ``connection_cut_seconds`` (a TCP proxy in between)."""
    proxy = TcpProxy(env.access.amqp_host, env.access.amqp_port)
    cut_site = "hospital-a"

    def through_proxy(site_id: str, url: str) -> str:
        return proxy.url_for(url, env.access.amqp_port) if site_id == cut_site else url

    try:
        campaign = Campaign(env, workdir, case="site-connection-cut", pace=settings.pace, site_url=through_proxy)

        def cut() -> None:
            proxy.cut(settings.connection_cut_seconds)
            time.sleep(settings.connection_cut_seconds)

        return _run(campaign, cut)
    finally:
        proxy.close()


def broker_memory_alarm(env: BrokerEnv, workdir: Path, settings: CampaignSettings) -> CampaignFigures:
    """The broker's memory alarm for ``memory_alarm_seconds``: every publisher (sites, coordinator) is blocked."""
    campaign = Campaign(env, workdir, case="broker-memory-alarm", pace=settings.pace)
    return _run(campaign, lambda: memory_alarm(env.node, settings.memory_alarm_seconds))


@contextlib.contextmanager
def private_node(workdir: Path) -> Iterator[LocalNode]:
    """A node of the case's own (the session's node is shared by every test), on free ports."""
    amqp_port, dist_port, management_port, prometheus_port = free_tcp_ports(4)
    node = LocalNode(
        workdir / "broker-state",
        amqp_port=amqp_port,
        dist_port=dist_port,
        management_port=management_port,
        prometheus_port=prometheus_port,
        statistics_interval_ms=1000,
    )
    try:
        node.start(timeout=120)
        yield node
    finally:
        node.stop()


def broker_kill(workdir: Path, settings: CampaignSettings) -> CampaignFigures:
    """kill -9 the broker node mid-burst and start it again (on a node of the case's own)."""
    from tests.integration.conftest import open_broker_env  # the vhost fixture's code, on this node

    with private_node(workdir) as node, open_broker_env(node, workdir / "env") as env:
        campaign = Campaign(env, workdir, case="broker-kill", pace=settings.pace, restart_delay=settings.restart_delay)
        return _run(campaign, lambda: kill_broker(node, settings.broker_down_seconds))


def _storage_case(
    env: BrokerEnv, workdir: Path, settings: CampaignSettings, *, case: str, read_only: bool
) -> CampaignFigures:
    state_dir = workdir / "coordinator"
    # Read-only: the checkpoint directory is its own small filesystem (Linux refuses to remount a filesystem
    # read-only while a file on it is open for writing, and audit.jsonl always is). Full: the whole state dir.
    mount = SmallMount(state_dir / "checkpoint" if read_only else state_dir, size_mb=64)
    try:
        campaign = Campaign(
            env,
            workdir,
            case=case,
            pace=settings.pace,
            restart_delay=settings.restart_delay,
            state_dir=state_dir,
            options=CoordinatorOptions(reserve_mb=1),  # the mount holds 64 MiB: the default reserve would fill it
        )

        def fault() -> None:
            hold_through_a_restart(
                campaign.supervisor,
                settings.storage_fault_seconds,
                mount.read_only() if read_only else mount.full(),
                longest=3 * settings.storage_fault_seconds,
            )

        return _run(campaign, fault)
    finally:
        with contextlib.suppress(OSError):  # kept for a post-mortem: the mount goes away
            shutil.copy(state_dir / "audit.jsonl", workdir / "audit-copy.jsonl")
        mount.close()


def checkpoint_read_only(env: BrokerEnv, workdir: Path, settings: CampaignSettings) -> CampaignFigures:
    """The checkpoint's filesystem read-only for ``storage_fault_seconds`` while updates arrive."""
    return _storage_case(env, workdir, settings, case="checkpoint-read-only", read_only=True)


def state_dir_full(env: BrokerEnv, workdir: Path, settings: CampaignSettings) -> CampaignFigures:
    """The state dir's filesystem full (ENOSPC) for ``storage_fault_seconds`` while updates arrive."""
    return _storage_case(env, workdir, settings, case="state-dir-full", read_only=False)


# name -> case; the ones taking a BrokerEnv run on a shared node, broker-kill brings its own
CASES_ON_SHARED_NODE: dict[str, Callable[[BrokerEnv, Path, CampaignSettings], CampaignFigures]] = {
    "coordinator-sigkill": coordinator_sigkill,
    "coordinator-crash-loop": coordinator_crash_loop,
    "site-connection-cut": site_connection_cut,
    "broker-memory-alarm": broker_memory_alarm,
    "checkpoint-read-only": checkpoint_read_only,
    "state-dir-full": state_dir_full,
}
CASES_WITH_OWN_NODE: dict[str, Callable[[Path, CampaignSettings], CampaignFigures]] = {"broker-kill": broker_kill}
