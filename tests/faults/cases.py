"""The campaign's cases, each a function ``(env, workdir, settings) -> CampaignFigures``.

The suite runs them with ``CampaignSettings.short()`` (tests/integration/test_fault_campaign.py), and with
``CampaignSettings.full()`` when ``FEDMQ_CAMPAIGN=full``; ``python -m tests.faults`` runs them outside pytest
on a node of its own and prints the table. A case only injects its fault and returns the figures; what must hold
(lost == 0, ...) is asserted by the caller.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pika

from broker.node import LocalNode, free_tcp_ports
from broker.topology import site_update_queues
from coordinator.audit import verify_chain
from coordinator.checkpoint import CheckpointStore
from schemas import ModelUpdate
from tests.faults.figures import CampaignFigures, compute_figures
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
from tests.integration.coordinator_process import CoordinatorProcess, free_port, write_coordinator_config
from tests.integration.federation_helpers import (
    FedmqProcesses,
    append_site_tables,
    coordinator_tables,
    read_audit,
    wait_until,
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
    agent_kills: int = 5  # SIGKILLs of a real site agent mid-publish
    restore_versions_after_backup: int = 5  # how far the coordinator runs on past its backup before the restore
    restore_max_versions: int = 24  # the restored run's stopping rule
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
            agent_kills=20,
            restore_versions_after_backup=15,
            restore_max_versions=60,
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


# --- real site agents (``fedmq site run``) and a real coordinator, signing end to end ----------------------------

AGENT_SENT = re.compile(r"update seq (\d+) on v\d+ sent")  # logged once the broker confirmed the publish
KILLED_SITE, STEADY_SITE = "cleveland", "hungary"  # heart-disease hospitals: the task reads their packaged data


def _agent_confirmed(processes: FedmqProcesses, site: str) -> list[str]:
    """``"<site>:<seq>"`` of every update the agent logged as sent (confirmed), over all its restarts."""
    return [f"{site}:{seq}" for seq in AGENT_SENT.findall(processes.log(site))]


def _agent_attempted(config_path: Path, site: str) -> list[str]:
    """Every seq the agent drew (its on-disk counter, persisted before each use): ``"<site>:1"`` .. last."""
    counter = config_path.parent / f"{site}.agent-state.json"
    last = json.loads(counter.read_text())["last_seq"] if counter.exists() else 0
    return [f"{site}:{seq}" for seq in range(1, last + 1)]


def _wait_for_sends(processes: FedmqProcesses, site: str, more: int) -> None:
    """Wait until the agent logged ``more`` confirmed updates beyond what it has logged so far."""
    target = len(_agent_confirmed(processes, site)) + more
    wait_until(lambda: len(_agent_confirmed(processes, site)) >= target, 60, f"{site} sent no update", processes)


def _real_federation(
    env: BrokerEnv, workdir: Path, sites: tuple[str, ...], *, max_versions: int, slowdown: float
) -> tuple[FedmqProcesses, dict[str, Path], Path, Path, int]:
    """Site configs (keys registered by ``add_site``), a signing coordinator's config; nothing started yet."""
    site_configs = {
        site: append_site_tables(env.add_site(site).config_path, slowdown=slowdown, seed=index)
        for index, site in enumerate(sites)
    }
    state_dir, metrics_port = workdir / "coordinator", free_port()
    config = write_coordinator_config(
        workdir / "coordinator.toml",
        url=env.coordinator_url,
        sites=list(sites),
        state_dir=state_dir,
        metrics_port=metrics_port,
        extra=coordinator_tables(strategy="fedasync", max_versions=max_versions, local_steps=20),
        keys_dir=env.keys_dir,
    )
    return FedmqProcesses(env.state_dir, workdir / "logs"), site_configs, config, state_dir, metrics_port


def _resolved_in(audit: Path, ids: list[str]) -> bool:
    seen = {
        f"{record.get('site')}:{record.get('seq')}"
        for record in read_audit(audit)
        if record.get("kind") == "update" and record.get("outcome") in ("accepted", "rejected")
    }
    return all(update_id in seen for update_id in ids)


def site_agent_sigkill(env: BrokerEnv, workdir: Path, settings: CampaignSettings) -> CampaignFigures:
    """SIGKILL a real site agent ``agent_kills`` times while it publishes (every other kill right after it logged a
    confirmed update, the others at a random moment), restarting it after ``restart_delay`` as systemd would; a
    second agent runs undisturbed. Ids are ``"<site>:<seq>"``: what the agent logged as sent and its seq counter."""
    rng = random.Random(settings.seed)
    processes, site_configs, config, state_dir, _ = _real_federation(
        env, workdir, (KILLED_SITE, STEADY_SITE), max_versions=1_000_000, slowdown=3.0
    )
    started, kills = time.monotonic(), 0
    try:
        processes.start_coordinator(config)
        for site_config in site_configs.values():
            processes.start_site(site_config)
        for kill in range(settings.agent_kills):
            _wait_for_sends(processes, KILLED_SITE, 1)
            if kill % 2 == 1:  # else right after the confirm, while it trains or publishes the next one
                time.sleep(rng.uniform(0.0, 1.0))
            processes.processes[KILLED_SITE].kill()
            processes.processes[KILLED_SITE].wait(timeout=30)
            kills += 1
            time.sleep(settings.restart_delay)
            processes.start_site(site_configs[KILLED_SITE])
        _wait_for_sends(processes, KILLED_SITE, 3)  # the restarted agent publishes again, on its own counter
        for site in site_configs:  # systemctl stop: SIGTERM; an update it had not sent is the site's to redo
            processes.processes[site].terminate()
        for site in site_configs:
            processes.wait_exit(site, timeout=60)
        confirmed = {site: _agent_confirmed(processes, site) for site in site_configs}
        audit = state_dir / "audit.jsonl"
        all_confirmed = [update_id for ids in confirmed.values() for update_id in ids]
        with contextlib.suppress(AssertionError):  # what is missing after 30 s is lost, and the figures say so
            wait_until(lambda: _resolved_in(audit, all_confirmed), 30, "not all confirmed updates resolved", processes)
        processes.processes["coordinator"].terminate()
        processes.wait_exit("coordinator", timeout=60)
    finally:
        processes.stop_all()
    return compute_figures(
        "site-agent-sigkill",
        attempted={site: _agent_attempted(path, site) for site, path in site_configs.items()},
        confirmed=confirmed,
        audit_records=read_audit(audit),
        checkpoint_accepted=_checkpoint_accepted(state_dir),
        chain_ok=verify_chain(audit).ok,
        duration_seconds=time.monotonic() - started,
        agent_kills=kills,
        identify_by="seq",
    )


def _checkpoint_accepted(state_dir: Path) -> int | None:
    with contextlib.suppress(Exception):
        saved = CheckpointStore(state_dir / "checkpoint").load()
        if saved is not None:
            return int(saved["accepted_total"])
    return None


RESTORED_SITES = ("cleveland", "hungary")


def _model_version(metrics_port: int) -> float:
    """fedmq_model_version from the coordinator's endpoint (-1 while it is not up)."""
    reader = CoordinatorProcess(Path(), Path(), metrics_port, Path())
    try:
        samples = reader.metrics()
    except OSError:
        return -1
    return next(iter(samples.get("fedmq_model_version", {}).values()), -1)


def _run_coordinator_until(processes: FedmqProcesses, config: Path, metrics_port: int, version: int) -> None:
    processes.start_coordinator(config)
    message = f"the coordinator never reached v{version}"
    wait_until(lambda: _model_version(metrics_port) >= version, 90, message, processes)


def _stop_coordinator(processes: FedmqProcesses) -> int:
    """SIGTERM, as ``systemctl stop`` does; returns the version it closed at (from its last log line)."""
    processes.processes["coordinator"].terminate()
    code = processes.wait_exit("coordinator", timeout=60)
    if code != 0:
        raise RuntimeError(f"the coordinator exited with {code} on SIGTERM\n{processes.logs()}")
    return int(re.findall(r"coordinator closed cleanly at model v(\d+)", processes.log("coordinator"))[-1])


def _resolved_ids(records: list[dict[str, object]]) -> set[str]:
    return {
        f"{record.get('site')}:{record.get('seq')}"
        for record in records
        if record.get("kind") == "update" and record.get("outcome") in ("accepted", "rejected")
    }


def _queued_updates(env: BrokerEnv, sites: tuple[str, ...]) -> list[str]:
    """``"<site>:<seq>"`` of the updates still in the sites' update queues (sent after the run reached its stopping
    rule: durable in the broker, for a next run). Read without acking: they stay in the queues."""
    ids = []
    connection = pika.BlockingConnection(pika.URLParameters(env.admin_url))
    try:
        channel = connection.channel()
        for queue in site_update_queues(sites):
            while True:
                method, _, body = channel.basic_get(queue, auto_ack=False)
                if method is None:
                    break
                update = ModelUpdate.decode(body)
                ids.append(f"{update.site_id}:{update.seq}")
    finally:
        connection.close()
    return ids


def coordinator_restore(env: BrokerEnv, workdir: Path, settings: CampaignSettings) -> CampaignFigures:
    """Two real agents run throughout; the coordinator makes a few versions, is stopped and its state dir copied (the
    backup, taken as docs/DEPLOYMENT.md says), runs ``restore_versions_after_backup`` more, is stopped, the backup
    put back, and started again; the run then finishes by its stopping rule. What the coordinator handled after the
    backup is ``undone_by_restore``; after the restore every update is applied or rejected with a reason."""
    processes, site_configs, config, state_dir, metrics_port = _real_federation(
        env, workdir, RESTORED_SITES, max_versions=settings.restore_max_versions, slowdown=15.0
    )
    backup_dir, audit = workdir / "backup", state_dir / "audit.jsonl"
    started = time.monotonic()
    try:
        for site_config in site_configs.values():
            processes.start_site(site_config)
        _run_coordinator_until(processes, config, metrics_port, 3)
        backup_version = _stop_coordinator(processes)
        shutil.copytree(state_dir, backup_dir)
        _run_coordinator_until(processes, config, metrics_port, backup_version + settings.restore_versions_after_backup)
        _stop_coordinator(processes)
        before_restore = read_audit(audit)  # gone from the state dir with the restore: kept for the figures
        shutil.rmtree(state_dir)
        shutil.copytree(backup_dir, state_dir)
        processes.start_coordinator(config)
        exits = {name: processes.wait_exit(name, timeout=120) for name in ("coordinator", *site_configs)}
        if any(exits.values()):
            raise RuntimeError(f"the restored run did not finish cleanly: {exits}\n{processes.logs()}")
    finally:
        processes.stop_all()
    kept = _resolved_ids(read_audit(backup_dir / "audit.jsonl"))
    undone = _resolved_ids(before_restore) - kept
    # only what was sent after the run's last handled update counts as queued after the end; one stuck behind is lost
    last_resolved: dict[str, int] = {}
    for update_id in _resolved_ids(read_audit(audit)):
        site, seq = update_id.rsplit(":", 1)
        last_resolved[site] = max(last_resolved.get(site, 0), int(seq))
    queued = [
        update_id
        for update_id in _queued_updates(env, RESTORED_SITES)
        if int(update_id.rsplit(":", 1)[1]) > last_resolved.get(update_id.rsplit(":", 1)[0], 0)
    ]
    return compute_figures(
        "coordinator-restore",
        attempted={site: _agent_attempted(path, site) for site, path in site_configs.items()},
        confirmed={site: _agent_confirmed(processes, site) for site in site_configs},
        audit_records=read_audit(audit),
        checkpoint_accepted=_checkpoint_accepted(state_dir),
        chain_ok=verify_chain(audit).ok,
        duration_seconds=time.monotonic() - started,
        undone=undone,
        kept=kept,
        queued=queued,
        identify_by="seq",
    )


# name -> case; the ones taking a BrokerEnv run on a shared node, broker-kill brings its own
CASES_ON_SHARED_NODE: dict[str, Callable[[BrokerEnv, Path, CampaignSettings], CampaignFigures]] = {
    "coordinator-sigkill": coordinator_sigkill,
    "coordinator-crash-loop": coordinator_crash_loop,
    "site-connection-cut": site_connection_cut,
    "broker-memory-alarm": broker_memory_alarm,
    "checkpoint-read-only": checkpoint_read_only,
    "state-dir-full": state_dir_full,
    "site-agent-sigkill": site_agent_sigkill,
    "coordinator-restore": coordinator_restore,
}
CASES_WITH_OWN_NODE: dict[str, Callable[[Path, CampaignSettings], CampaignFigures]] = {"broker-kill": broker_kill}
