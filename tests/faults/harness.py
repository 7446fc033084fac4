"""The campaign harness: a supervised coordinator process, scripted publishing sites, a drain, the figures.

A case is: ``Campaign(env, workdir, ...)``, ``campaign.start()``, some fault from ``tests.faults.tools`` while the
sites publish, ``campaign.finish()`` -> ``CampaignFigures``. Nothing here imports pytest, so a benchmark
(``python -m tests.faults``, later ``fedmq bench faults``) runs the same cases as the suite.

The coordinator is a real ``python -m fedmq coordinator run`` process (``CoordinatorProcess``) under a
``Supervisor`` that restarts it after ``restart_delay`` whenever it is gone, as the systemd unit does
(ops/systemd/fedmq-coordinator.service: ``Restart=on-failure``, ``RestartSec=10s``; the suite uses a shorter
delay). Fault tools only kill; the supervisor brings it back.

Each ``PublishingSite`` is a thread with its own pika connection and the site's own credentials, publishing
valid updates with publisher confirms. It records every update id it attempted and every one the broker
confirmed; a publish that fails (connection cut, broker gone) is resent with the same id and seq after
reconnecting, as a site agent does, until it is confirmed or the site's deadline passes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pika
import tomli_w
import torch

from broker.topology import REJECT_REASON_HEADER, Queue, site_update_queues
from coordinator.audit import verify_chain
from coordinator.checkpoint import CheckpointStore
from schemas import GlobalModel, ModelUpdate, TrainingMetrics
from tests.faults.figures import CampaignFigures, compute_figures
from tests.integration.coordinator_process import CoordinatorProcess, ScriptedSite, free_port

if TYPE_CHECKING:
    from tests.integration.conftest import BrokerEnv

log = logging.getLogger(__name__)

# The strategy the campaign runs (FedBuff with its default buffer). ``max_staleness`` is large because a site
# whose connection is cut resends its old update afterwards: staleness is not what the campaign measures.
STRATEGY = "fedbuff"
MAX_STALENESS = 1_000_000


@dataclass(frozen=True)
class CoordinatorOptions:
    """The few coordinator settings a case may change from the defaults (None: the coordinator's default)."""

    update_prefetch: int | None = None  # top-level ``update_prefetch``
    buffer_size: int | None = None  # FedBuff's K, ``[strategy] buffer_size``
    reserve_mb: float | None = None  # ``[storage] reserve_mb``: a small filesystem cannot hold the default 64 MiB


def write_coordinator_config(
    path: Path,
    *,
    url: str,
    sites: list[str],
    state_dir: Path,
    metrics_port: int,
    options: CoordinatorOptions = CoordinatorOptions(),
) -> Path:
    """The one place the campaign writes coordinator.toml.

    Always: ``task``, ``sites``, ``state_dir``, ``[broker] url``, ``[metrics] port``, ``[strategy] name``,
    ``[strategy] max_staleness`` (high: a site cut off for 30 s resends old updates) and ``[signing] required =
    false``. Only when a case asks (``CoordinatorOptions``): ``update_prefetch``, ``[strategy] buffer_size`` and
    ``[storage] reserve_mb``. Every other setting is the coordinator's default.
    """
    strategy: dict[str, Any] = {"name": STRATEGY, "max_staleness": MAX_STALENESS}
    if options.buffer_size is not None:
        strategy["buffer_size"] = options.buffer_size
    tables: dict[str, Any] = {"task": "heart-disease", "sites": sites, "state_dir": str(state_dir)}
    if options.update_prefetch is not None:
        tables["update_prefetch"] = options.update_prefetch
    tables |= {"broker": {"url": url}, "metrics": {"port": metrics_port}, "strategy": strategy}
    # The scripted sites send unsigned updates: the campaign is about durability (signatures: tests/*/test_signing.py)
    tables["signing"] = {"required": False}
    if options.reserve_mb is not None:
        tables["storage"] = {"reserve_mb": options.reserve_mb}
    path.write_text(tomli_w.dumps(tables))
    return path


# What the coordinator logs for each update it handled (accepted, buffered, rejected; "update <id> from <site>
# redelivered after a restart"), matched without the logger's name, which the split of coordinator/service.py
# (issue 11) changes.
HANDLED_MARKERS = (b"update from ", b"redelivered after a restart")


class Supervisor:
    """Keeps one coordinator process running, restarting it ``restart_delay`` seconds after it is gone."""

    def __init__(self, coordinator: CoordinatorProcess, restart_delay: float) -> None:
        self.coordinator = coordinator
        self.restart_delay = restart_delay
        self.starts = 0
        self.kills = 0
        self.log_offset = 0  # where the current process's output starts in the (appended) log file
        self.exits: list[int] = []  # exit codes of deaths the harness did not cause (e.g. 1 on a failed write)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="coordinator-supervisor", daemon=True)

    def start(self) -> None:
        with self._lock:
            self._start_locked()
        self._thread.start()

    def _start_locked(self) -> None:
        path = self.coordinator.log_path
        self.log_offset = path.stat().st_size if path.exists() else 0
        self.coordinator.start()
        self.starts += 1

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            process = self.coordinator.process
            if process is None or process.poll() is None:
                continue
            with self._lock:
                if self._stop.is_set():
                    return
                code = process.returncode
                if code != -9:
                    self.exits.append(code)
                    log.info("coordinator exited with %s; restarting in %.1f s", code, self.restart_delay)
            if self._stop.wait(self.restart_delay):
                return
            with self._lock:
                if not self._stop.is_set():
                    self._start_locked()

    @property
    def generation(self) -> int:
        """How many times the coordinator was started: a new value means a new process."""
        return self.starts

    def running(self) -> bool:
        process = self.coordinator.process
        return process is not None and process.poll() is None

    def kill(self) -> None:
        """SIGKILL the coordinator now (the supervisor restarts it)."""
        with self._lock:
            process = self.coordinator.process
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=30)
                self.kills += 1

    def received_total(self) -> float | None:
        """``fedmq_updates_received_total`` of the running process, or None while it is not serving metrics."""
        if not self.running():
            return None
        try:
            samples = self.coordinator.metrics()
        except OSError:
            return None
        return sum(samples.get("fedmq_updates_received_total", {}).values())

    def handled_an_update(self) -> bool:
        """The current process logged that it handled an update (accepted, buffered, redelivered or rejected).

        Read from its log rather than its metrics: a scrape takes tens of milliseconds, in which a coordinator on
        a small model handles a whole prefetch window and commits it."""
        path = self.coordinator.log_path
        with contextlib.suppress(OSError), path.open("rb") as handle:
            handle.seek(self.log_offset)
            text = handle.read()
            return any(marker in text for marker in HANDLED_MARKERS)
        return False

    def wait_serving(self, timeout: float = 90.0) -> int:
        """Wait until a coordinator process serves its metrics; return its generation."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            generation = self.generation
            if self.received_total() is not None and generation == self.generation:
                return generation
            time.sleep(0.1)
        raise TimeoutError(f"no coordinator serving within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, characters: int = 3000) -> str:
        path = self.coordinator.log_path
        return path.read_text(errors="replace")[-characters:] if path.exists() else ""

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self.coordinator.stop()
        self._thread.join(timeout=10)


@dataclass
class SiteRecord:
    attempted: list[str] = field(default_factory=list)
    confirmed: list[str] = field(default_factory=list)
    publish_failures: int = 0
    nacks: int = 0  # publishes the broker refused because the site's update queue was full (tried again)
    longest_publish_seconds: float = 0.0
    failure_types: Counter[str] = field(default_factory=Counter)  # what the client raised, for the log
    unconfirmed: list[int] = field(default_factory=list)  # seqs given up on after the resend deadline
    errors: list[str] = field(default_factory=list)  # the site thread itself failed: a harness bug


def valid_update(site_id: str, seq: int, model: GlobalModel, scale: float = 0.01) -> ModelUpdate:
    """An update the coordinator must accept: small, finite, on a version it has, from the right site."""
    return ModelUpdate(
        update_id=ModelUpdate.new_id(),
        site_id=site_id,
        seq=seq,
        base_version=model.version,
        num_examples=10,
        delta={name: torch.full_like(tensor, scale) for name, tensor in model.tensors.items()},
        metrics=TrainingMetrics(loss=0.5, steps=1, seconds=0.01),
    )


class PublishingSite(threading.Thread):
    """A scripted hospital: valid updates with publisher confirms at a steady pace, resent until confirmed."""

    def __init__(
        self,
        site_id: str,
        url: str,
        *,
        updates: int,
        interval: float,
        resend_deadline: float,
        seed: int,
    ) -> None:
        super().__init__(name=f"site-{site_id}", daemon=True)
        self.site_id = site_id
        self.url = url
        self.updates = updates
        self.interval = interval
        self.resend_deadline = resend_deadline
        self.record = SiteRecord()
        self.stop_event = threading.Event()
        self._rng = random.Random(seed)
        self._site: ScriptedSite | None = None
        self._model: GlobalModel | None = None
        self._seq = 0

    def _connected(self) -> ScriptedSite:
        if self._site is None or not self._site.connection.is_open:
            self._close()
            self._site = ScriptedSite(self.site_id, self.url)
        return self._site

    def _close(self) -> None:
        if self._site is not None:
            with contextlib.suppress(Exception):
                self._site.close()
            self._site = None

    def _refresh_model(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            self._model = self._connected().latest_model(timeout=timeout)

    def _publish_until_confirmed(self, update: ModelUpdate) -> bool:
        body = update.encode()
        started = time.monotonic()
        deadline = started + self.resend_deadline
        while time.monotonic() < deadline:
            try:
                self._connected().publish(body)  # returns once the broker confirmed it
                waited = time.monotonic() - started
                self.record.longest_publish_seconds = max(self.record.longest_publish_seconds, waited)
                return True
            except pika.exceptions.NackError:  # the site's update queue is full (flood control): try later
                self.record.nacks += 1
                time.sleep(0.1)
            except Exception as exc:  # whatever pika raises when the link goes mid-publish: reconnect, resend
                self.record.publish_failures += 1
                self.record.failure_types[type(exc).__name__] += 1
                log.info("%s: publish of seq %d failed (%r); resending", self.site_id, update.seq, exc)
                self._close()
                time.sleep(0.5)
        return False

    def run(self) -> None:
        try:
            while self._model is None:
                if self.stop_event.is_set():
                    return
                try:
                    self._refresh_model(timeout=5)
                except Exception as exc:
                    self.record.failure_types[type(exc).__name__] += 1
                    self._close()
                    time.sleep(0.5)
            for index in range(self.updates):
                if self.stop_event.is_set():
                    break
                if index % 10 == 9:
                    try:
                        self._refresh_model(timeout=0.5)
                    except Exception as exc:  # keep the model it has; the publish below reconnects
                        self.record.failure_types[type(exc).__name__] += 1
                        self._close()
                self._seq += 1
                update = valid_update(self.site_id, self._seq, self._model)
                self.record.attempted.append(update.update_id)
                if self._publish_until_confirmed(update):
                    self.record.confirmed.append(update.update_id)
                else:
                    self.record.unconfirmed.append(update.seq)
                self.stop_event.wait(self._rng.uniform(0.5, 1.5) * self.interval)
        except BaseException as exc:  # reported in the figures' caller, never lost in a thread
            self.record.errors.append(repr(exc))
        finally:
            self._close()


@dataclass(frozen=True)
class Pace:
    """How much the sites send: ``updates`` each, one every ``interval`` seconds (jittered)."""

    sites: int = 3
    updates: int = 60
    interval: float = 0.1


SITE_NAMES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e", "hospital-f")


class Campaign:
    """One case's world: provisioned sites on ``env``'s vhost, a supervised coordinator, publishing threads."""

    def __init__(
        self,
        env: BrokerEnv,
        workdir: Path,
        *,
        case: str,
        pace: Pace,
        restart_delay: float = 0.5,
        state_dir: Path | None = None,
        site_url: Any = None,
        resend_deadline: float = 120.0,
        options: CoordinatorOptions = CoordinatorOptions(),
    ) -> None:
        self.env = env
        self.workdir = workdir
        self.case = case
        self.pace = pace
        self.state_dir = state_dir or workdir / "coordinator"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.site_ids = list(SITE_NAMES[: pace.sites])
        self.site_urls = {site: env.add_site(site).url for site in self.site_ids}
        # site_url(site_id, url) -> the URL that site publishes to (e.g. through a TCP proxy)
        publish_urls = {site: (site_url(site, url) if site_url else url) for site, url in self.site_urls.items()}
        metrics_port = free_port()
        config = write_coordinator_config(
            workdir / "coordinator.toml",
            url=env.coordinator_url,
            sites=self.site_ids,
            state_dir=self.state_dir,
            metrics_port=metrics_port,
            options=options,
        )
        self.coordinator = CoordinatorProcess(config, self.state_dir, metrics_port, workdir / "coordinator.log")
        self.supervisor = Supervisor(self.coordinator, restart_delay)
        self.sites = [
            PublishingSite(
                site,
                publish_urls[site],
                updates=pace.updates,
                interval=pace.interval,
                resend_deadline=resend_deadline,
                seed=index,
            )
            for index, site in enumerate(self.site_ids)
        ]
        self.started_at = 0.0

    def start(self, *, sites: bool = True) -> None:
        """Start the coordinator, wait until it serves, then (by default) start the sites publishing."""
        self.started_at = time.monotonic()
        self.supervisor.start()
        self.supervisor.wait_serving()
        if sites:
            self.start_sites()

    def start_sites(self) -> None:
        for site in self.sites:
            site.start()

    def stop_sites(self) -> None:
        """Ask every site to stop after the update it is sending (an unconfirmed one is still resent)."""
        for site in self.sites:
            site.stop_event.set()

    def sites_done(self) -> bool:
        return not any(site.is_alive() for site in self.sites)

    def wait_sites(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        for site in self.sites:
            site.join(timeout=max(0.1, deadline - time.monotonic()))
        if not self.sites_done():
            for site in self.sites:
                site.stop_event.set()
            raise TimeoutError(f"sites still publishing after {timeout:.0f} s")

    def confirmed(self) -> dict[str, list[str]]:
        return {site.site_id: list(site.record.confirmed) for site in self.sites}

    def attempted(self) -> dict[str, list[str]]:
        return {site.site_id: list(site.record.attempted) for site in self.sites}

    def site_errors(self) -> list[str]:
        return [f"{site.site_id}: {error}" for site in self.sites for error in site.record.errors]

    def audit_records(self) -> list[dict[str, Any]]:
        """The audit log's records; a line that is not JSON (a torn write) is skipped here and breaks the chain
        check, so it shows as ``chain_ok = False`` instead of hiding the other figures."""
        path = self.state_dir / "audit.jsonl"
        records = []
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if line.strip():
                        records.append(json.loads(line))
        return records

    def _resolved(self) -> bool:
        """Every confirmed id has an accepted or rejected record."""
        seen = {
            record.get("update_id")
            for record in self.audit_records()
            if record.get("outcome") in ("accepted", "rejected")
        }
        return all(update_id in seen for ids in self.confirmed().values() for update_id in ids)

    def drain(self, timeout: float = 60.0, quiet_seconds: float = 4.0) -> None:
        """Wait until every confirmed update is accounted for, or nothing more happens for ``quiet_seconds``
        (the queue is empty and the audit log stopped growing under a serving coordinator): what is missing
        then is lost, and waiting longer would only make a failing case slower."""
        self.supervisor.wait_serving()
        deadline = time.monotonic() + timeout
        last_count, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            if self._resolved():
                return
            count = len(self.audit_records())
            ready = sum(self.env.message_count(queue) for queue in site_update_queues(self.site_ids))
            if count != last_count or ready or not self.supervisor.running():
                last_count, quiet_since = count, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_seconds:
                return
            time.sleep(0.25)

    def dead_letter_reasons(self) -> dict[str, int]:
        """Why the messages in the dead-letter queue are there: the coordinator's reject reason, else the broker's
        ``x-first-death-reason`` (``delivery_limit``, ...). Read without acking: they stay in the queue."""
        reasons: Counter[str] = Counter()
        connection = pika.BlockingConnection(pika.URLParameters(self.env.admin_url))
        try:
            channel = connection.channel()
            while True:
                method, properties, _ = channel.basic_get(Queue.DEAD_LETTERS.value, auto_ack=False)
                if method is None:
                    break
                headers = properties.headers or {}
                reason = headers.get(REJECT_REASON_HEADER) or headers.get("x-first-death-reason") or "unknown"
                reasons[reason.decode() if isinstance(reason, bytes) else str(reason)] += 1
        finally:
            connection.close()  # the unacked messages go back to the queue
        return dict(reasons)

    def checkpoint_accepted(self) -> int | None:
        with contextlib.suppress(Exception):
            saved = CheckpointStore(self.state_dir / "checkpoint").load()
            if saved is not None:
                return int(saved["accepted_total"])
        return None

    def finish(self, *, drain_timeout: float = 60.0) -> CampaignFigures:
        """Let the sites finish, drain, stop the coordinator and compute the figures."""
        try:
            self.wait_sites()
            for site in self.sites:
                if site.record.failure_types:
                    log.warning("%s: publish failures %s", site.site_id, dict(site.record.failure_types))
            if self.site_errors():
                raise RuntimeError(f"scripted sites failed: {self.site_errors()}")
            self.drain(timeout=drain_timeout)
        finally:
            self.supervisor.stop()
        audit_path = self.state_dir / "audit.jsonl"
        return compute_figures(
            self.case,
            attempted=self.attempted(),
            confirmed=self.confirmed(),
            audit_records=self.audit_records(),
            checkpoint_accepted=self.checkpoint_accepted(),
            dead_lettered=self.dead_letter_reasons(),
            publish_failures=sum(site.record.publish_failures for site in self.sites),
            longest_publish_seconds=max(site.record.longest_publish_seconds for site in self.sites),
            coordinator_kills=self.supervisor.kills,
            coordinator_exits=len(self.supervisor.exits),
            chain_ok=verify_chain(audit_path).ok if audit_path.exists() else False,
            duration_seconds=time.monotonic() - self.started_at,
        )

    def abort(self) -> None:
        """Stop everything after a failure (the figures are not wanted)."""
        for site in self.sites:
            site.stop_event.set()
        self.supervisor.stop()
        for site in self.sites:
            if site.is_alive():
                site.join(timeout=10)
