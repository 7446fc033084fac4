"""Group commit: what the updates handled since the last commit changed becomes durable before any is acked.

For the batch of updates handled since the last commit: durable checkpoint -> audit -> dead letters -> ack ->
publish. A crash between any two steps loses no acknowledged update and counts none twice: an update is acked only
after the checkpoint that holds it, and a copy of an update the checkpoint already holds (redelivered by the broker,
or resent by its site) is acked as ``already-applied``, not applied again (``validation.DuplicateFilter``). The
audit records are sealed into the checkpoint before they are appended, so a crash between the two is repaired on
restart (:meth:`GroupCommit.restore`).

Committing a batch at a time costs one checkpoint and one audit fsync per batch instead of per update. A batch
holding a new version is committed at the end of the poll that made it (the sites are waiting for the model);
updates that only filled the buffer gather while more keep arriving, until they fill the prefetch window (the
broker sends no more before some are acked) or for ``COMMIT_MAX_DELAY_SECONDS``. Committing sooner costs more than
the broker's brief pause: with half the window as the limit, FedBuff K=10 paid two checkpoints per version instead
of one, and drained 1M-parameter updates ~20% slower (``fedmq bench throughput``).

Storage errors, and why the process stops on one. Each step that writes raises ``StorageError`` when the OS
refuses (``coordinator.storage``), never an ``OSError`` a transport could take for a lost connection. Nothing in the
coordinator catches it: it leaves the broker callback, the poll (``PikaTransport`` lets a handler's exception
through untranslated) and the reconnecting wrapper (which retries only ``TransportConnectionError``), and the
process exits non-zero for systemd to restart. That is the whole recovery, and it is safe because at the moment of
the error this process's memory (model, strategy, duplicate filter) already holds the batch while the disk may
not: the only ack in the coordinator is the one below, after both writes returned, and a process that is gone acks
nothing more. Its unacked deliveries return to the queue when its connection closes, and the next process starts
from what is on disk (``restore``), so an update is acked as ``already-applied`` only if a checkpoint holds it.
Retrying in the same process instead would need to know how much of a failed write reached the disk (a failed
fsync may have dropped pages the kernel then reports clean); a restart reads it back instead of guessing.

Disk space: a commit that the state dir has no room for (its new checkpoint files and audit records, plus the
``[storage] reserve_mb`` reserve) is not started. The batch stays pending and unacked (the broker holds its
updates; the prefetch window stops more from coming), the refusal is logged and counted
(``fedmq_commits_deferred_total``), and the next tick tries again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from broker.topology import Exchange
from broker.transport import Delivery, PublishRefused, Transport
from coordinator.aggregation import Strategy
from coordinator.audit import AuditLog, encode_records
from coordinator.checkpoint import CheckpointStore, PreparedSave
from coordinator.errors import StorageError
from coordinator.metrics import CoordinatorMetrics
from coordinator.run_state import RunState
from coordinator.storage import BLOCK_BYTES, DiskSpace
from coordinator.validation import DuplicateFilter

log = logging.getLogger(__name__)

COMMIT_MAX_DELAY_SECONDS = 0.5
DEFERRED_LOG_SECONDS = 30.0  # while commits wait for disk space, say so at most this often


@dataclass
class PendingCommit:
    """What the updates handled since the last commit left to do: make durable, append, ack, publish."""

    # audit fields of each handled update and the sha256 of its body, still being computed: sealed at commit, so
    # hashing one update overlaps receiving and handling the next ones instead of holding up its own handling
    unsealed: list[tuple[dict[str, Any], Future[str]]] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    dead_letters: list[tuple[Delivery, dict[str, Any]]] = field(default_factory=list)
    state_changed: bool = False
    new_version: bool = False
    opened_at: float | None = None  # monotonic time of the first update in the batch
    seen_at_last_poll: int = 0  # deliveries in the batch when the previous poll ended


class GroupCommit:
    """Gathers the handled updates' audit records, dead letters and acks, and commits them as one batch."""

    def __init__(
        self,
        *,
        state: RunState,
        strategy: Strategy,
        duplicates: DuplicateFilter,
        audit: AuditLog,
        checkpoints: CheckpointStore,
        metrics: CoordinatorMetrics,
        transport: Callable[[], Transport],
        publish_model: Callable[[], None],
        batch_size: int,
        space: DiskSpace,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.strategy = strategy
        self.duplicates = duplicates
        self.audit = audit
        self.checkpoints = checkpoints
        self.metrics = metrics
        self.transport = transport
        self.publish_model = publish_model
        self.batch_size = max(1, batch_size)
        self.space = space
        self.monotonic = monotonic
        self.pending = PendingCommit()
        self.deferred_since: float | None = None  # monotonic time the first commit waiting for disk space was put off
        self._deferred_logged_at = 0.0

    # ------------------------------------------------------------------------------------------ the batch
    def record(self, fields: dict[str, Any], digest: Future[str]) -> None:
        """One update's audit record, sealed with its body's digest at the commit."""
        self.pending.unsealed.append((fields, digest))

    def dead_letter(self, delivery: Delivery, headers: dict[str, Any]) -> None:
        """A rejected update goes to the dead-letter exchange once its rejection is durable."""
        self.pending.dead_letters.append((delivery, headers))

    def changed(self, *, new_version: bool) -> None:
        """The run state or the strategy changed: the commit writes a checkpoint (and publishes a new version)."""
        self.pending.state_changed = True
        self.pending.new_version = self.pending.new_version or new_version

    def handled(self, delivery: Delivery) -> None:
        """``delivery`` is handled; it is acked with its batch, which is committed at once when it fills the
        prefetch window (the broker sends no more before some are acked)."""
        # Only the tag is needed to ack; a rejected body waits in ``dead_letters``. Dropping it here keeps a batch
        # of large updates from holding their bodies until the commit.
        self.pending.deliveries.append(replace(delivery, body=b""))
        if self.pending.opened_at is None:
            self.pending.opened_at = self.monotonic()
        if len(self.pending.deliveries) >= self.batch_size:
            self.commit()

    def forget_deliveries(self) -> None:
        """Deliveries handled on a connection that died cannot be acked any more (the broker redelivers them and
        they are dropped as duplicates); what they changed is still made durable by the next commit."""
        self.pending.deliveries.clear()

    def due(self) -> bool:
        """At the end of a poll: commit a new version now; otherwise only once the updates stop coming (a poll
        brought none) or the batch has waited ``COMMIT_MAX_DELAY_SECONDS``."""
        pending = self.pending
        arrived = len(pending.deliveries) - pending.seen_at_last_poll
        pending.seen_at_last_poll = len(pending.deliveries)
        waited = self.monotonic() - pending.opened_at if pending.opened_at is not None else 0.0
        return pending.new_version or arrived == 0 or waited >= COMMIT_MAX_DELAY_SECONDS

    # ------------------------------------------------------------------------------------------ the commit
    def commit(self) -> None:
        """Make what the handled updates changed durable, then ack them and publish: one checkpoint and one
        audit fsync for the whole batch. Not started (the batch waits) when the disk has no room for it."""
        pending = self.pending
        if not (pending.deliveries or pending.unsealed or pending.state_changed):
            return
        records = self._seal(pending.unsealed)
        started = time.perf_counter()
        prepared = self.checkpoints.prepare(self._checkpoint_state(records)) if pending.state_changed else None
        preparing = time.perf_counter() - started
        if not self._room_for(prepared, records):
            return
        if prepared is not None:
            started = time.perf_counter()
            self.checkpoints.write(prepared)
            self.metrics.checkpoint_seconds.observe(preparing + time.perf_counter() - started)
            self.metrics.checkpoint_bytes.set(self.checkpoints.size_bytes)
        self.audit.append_sealed_batch(records)
        # Durable. From here on a failure (a lost connection) leaves unacked copies the next run acks as applied.
        self.pending = PendingCommit()
        for delivery, headers in pending.dead_letters:
            try:
                self.transport().publish(
                    Exchange.DEAD_LETTERS.value, delivery.routing_key, delivery.body, headers=headers
                )
            except PublishRefused as exc:
                log.error("could not dead-letter a rejected update: %s", exc)
        for delivery in pending.deliveries:
            self.transport().ack(delivery)
        if pending.new_version:
            self.publish_model()

    def _room_for(self, prepared: PreparedSave | None, records: list[dict[str, Any]]) -> bool:
        """Whether the state dir can take this commit; logs and counts a refusal, and the return of room."""
        needed = (prepared.bytes_needed if prepared is not None else 0) + len(encode_records(records)) + BLOCK_BYTES
        self.metrics.commit_bytes.set(needed)
        try:
            shortfall = self.space.shortfall(needed)
        except OSError as exc:
            raise StorageError(f"cannot read the free space of {self.space.directory}: {exc}") from exc
        now = self.monotonic()
        if shortfall == 0:
            if self.deferred_since is not None:
                log.warning(
                    "disk space is back in %s: committing after %.0f s", self.space.directory, now - self.deferred_since
                )
                self.deferred_since = None
            return True
        self.metrics.commits_deferred.inc()
        if self.deferred_since is None or now - self._deferred_logged_at >= DEFERRED_LOG_SECONDS:
            log.error(
                "not committing %d handled updates: %s needs %d bytes free (%d for the commit + %d reserved), "
                "%d short; they stay unacked in the broker, retrying",
                len(self.pending.deliveries),
                self.space.directory,
                needed + self.space.reserve_bytes,
                needed,
                self.space.reserve_bytes,
                shortfall,
            )
            self._deferred_logged_at = now
        if self.deferred_since is None:
            self.deferred_since = now
        return False

    def _seal(self, unsealed: list[tuple[dict[str, Any], Future[str]]]) -> list[dict[str, Any]]:
        """The batch's audit records with their digests, chained in the order the updates were handled."""
        records: list[dict[str, Any]] = []
        for fields, digest in unsealed:
            sealed = self.audit.seal({**fields, "sha256": digest.result()}, after=records[-1] if records else None)
            records.append(sealed)
        return records

    def _checkpoint_state(self, pending_audit: list[dict[str, Any]]) -> dict[str, Any]:
        state = self.state
        return {
            "version": state.version,
            "params": state.params,
            "history": {str(version): params for version, params in state.history.items()},
            "started_at": state.started_at,
            "accepted_total": state.accepted_total,
            "strategy": self.strategy.state_dict(),
            "duplicates": self.duplicates.state_dict(),
            "pending_audit": pending_audit,
        }

    def restore(self) -> bool:
        """Resume from the last checkpoint, appending the audit records a crash kept from the log; False when
        there is none (a fresh run)."""
        saved = self.checkpoints.load()
        if saved is None:
            return False
        state = self.state
        state.version = int(saved["version"])
        state.params = saved["params"]
        state.history = {int(version): params for version, params in saved["history"].items()}
        state.started_at = float(saved["started_at"])
        state.accepted_total = int(saved["accepted_total"])
        self.strategy.load_state_dict(saved["strategy"])
        self.duplicates.load_state_dict(saved["duplicates"])
        self.metrics.checkpoint_bytes.set(self.checkpoints.size_bytes)
        for record in saved["pending_audit"]:
            if record["seq_no"] > self.audit.count:
                self.audit.append_sealed(record)
                log.info("restored audit record %s lost in the crash", record["seq_no"])
        return True
