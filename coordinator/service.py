"""The coordinator service: turns a stream of updates into global versions, crash-safely.

It speaks to the broker only through a ``Transport`` (``attach``), so everything here runs the same against
the in-memory transport in unit tests and against RabbitMQ in production. The pieces it wires together each do
one job: ``validation`` (pure checks), a ``Strategy`` (pure aggregation), ``CheckpointStore`` (durability),
``AuditLog`` (the trail), ``EvaluationBook`` (federated evaluation), ``Liveness`` and ``CoordinatorMetrics``.

For each update: validate -> apply or buffer; then, for the batch of updates handled since the last commit:
durable checkpoint -> audit -> ack -> publish. A crash between any two steps loses no acknowledged update and
counts none twice: an update is acked only after the checkpoint that holds it, and a redelivered update that the
checkpoint already holds is dropped as a duplicate. The audit records are sealed into the checkpoint before they
are appended, so a crash between the two is repaired on restart.
Committing a batch at a time costs one checkpoint and one audit fsync per batch instead of per update. A batch
holding a new version is committed at the end of the poll that made it (the sites are waiting for the model);
updates that only filled the buffer gather while more keep arriving, until they fill the prefetch window (the
broker sends no more before some are acked) or for ``COMMIT_MAX_DELAY_SECONDS``. Committing sooner costs more than
the broker's brief pause: with half the window as the limit, FedBuff K=10 paid two checkpoints per version instead
of one, and drained 1M-parameter updates ~20% slower (``fedmq bench throughput``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from broker.topology import (
    BROADCAST_SITE,
    REJECT_REASON_HEADER,
    Exchange,
    Kind,
    Queue,
    routing_key,
)
from broker.transport import Delivery, PublishRefused, Transport
from coordinator.aggregation import Contribution, FedAsync, Params, Strategy
from coordinator.audit import AuditLog
from coordinator.checkpoint import CheckpointStore, write_file_durably
from coordinator.config import CoordinatorConfig, as_dict
from coordinator.evaluation import EvaluationBook, GlobalEvaluation
from coordinator.liveness import Liveness
from coordinator.metrics import CoordinatorMetrics
from coordinator.model_files import write_safetensors
from coordinator.validation import (
    DuplicateFilter,
    Reason,
    Rejection,
    ValidUpdate,
    site_from_routing_key,
    validate_update,
)
from schemas import (
    Control,
    ControlCommand,
    DecodeLimits,
    EvalReport,
    GlobalModel,
    Heartbeat,
    ModelFingerprint,
    ModelUpdate,
    SchemaError,
)

log = logging.getLogger(__name__)

STATUS_PREFETCH = 50
COMMIT_MAX_DELAY_SECONDS = 0.5


@dataclass
class RunState:
    """Everything the checkpoint holds besides the strategy's own state."""

    version: int
    params: Params
    history: dict[int, Params] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    accepted_total: int = 0


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


@dataclass(frozen=True)
class Outcome:
    """What handling one update led to: a rejection, a buffered update, or a new version."""

    rejection: Rejection | None = None
    new_version: int | None = None


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        strategy: Strategy,
        initial_params: Params,
        fingerprint: ModelFingerprint,
        metrics: CoordinatorMetrics,
        audit: AuditLog,
        evaluations: EvaluationBook,
        checkpoints: CheckpointStore,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.strategy = strategy
        self.fingerprint = fingerprint
        self.metrics = metrics
        self.audit = audit
        self.evaluations = evaluations
        self.checkpoints = checkpoints
        self.clock = clock
        self.monotonic = monotonic
        self.known_sites = frozenset(config.sites)
        self.liveness = Liveness(config.liveness.site_timeout_seconds)
        self.liveness.register(self.known_sites)
        self.duplicates = DuplicateFilter(config.validation.remembered_update_ids)
        self.limits = DecodeLimits(max_message_bytes=int(config.validation.max_message_mb * 1024 * 1024))
        self.state = RunState(
            version=0, params={name: tensor.clone() for name, tensor in initial_params.items()}, started_at=clock()
        )
        self.transport: Transport | None = None
        self._pending = PendingCommit()
        self._commit_batch = max(1, config.update_prefetch)
        self.finishing_since: float | None = None
        self.finished = False
        self.stop_reason = ""
        self._keeps_history = isinstance(strategy, FedAsync)
        if hasattr(strategy, "set_sites"):
            strategy.set_sites(self.known_sites)
        self._record_history()
        self.metrics.max_staleness.set(config.strategy.max_staleness)
        self.metrics.sites_registered.set(len(self.known_sites))
        self.metrics.info.labels(strategy=strategy.name, task=config.task, version="0.1.0").set(1)
        for site in self.known_sites:
            self.metrics.site_up.labels(site=site).set(0)
        self._update_buffer_gauges()

    # ------------------------------------------------------------------------------------------- persistence
    def restore(self) -> bool:
        """Resume from the last checkpoint; False when there is none (a fresh run)."""
        saved = self.checkpoints.load()
        if saved is None:
            return False
        self.state = RunState(
            version=int(saved["version"]),
            params=saved["params"],
            history={int(version): params for version, params in saved["history"].items()},
            started_at=float(saved["started_at"]),
            accepted_total=int(saved["accepted_total"]),
        )
        self.strategy.load_state_dict(saved["strategy"])
        self.duplicates.load_state_dict(saved["duplicates"])
        for record in saved["pending_audit"]:
            if record["seq_no"] > self.audit.count:
                self.audit.append_sealed(record)
                log.info("restored audit record %s lost in the crash", record["seq_no"])
        self.metrics.new_version(self.state.version, self.clock())
        self._update_buffer_gauges()
        log.info(
            "resumed from checkpoint: model v%d, %d updates accepted so far, %d buffered",
            self.state.version,
            self.state.accepted_total,
            self.strategy.buffered(),
        )
        return True

    def _checkpoint(self, pending_audit: list[dict[str, Any]]) -> None:
        started = time.perf_counter()
        self.checkpoints.save(
            {
                "version": self.state.version,
                "params": self.state.params,
                "history": {str(version): params for version, params in self.state.history.items()},
                "started_at": self.state.started_at,
                "accepted_total": self.state.accepted_total,
                "strategy": self.strategy.state_dict(),
                "duplicates": self.duplicates.state_dict(),
                "pending_audit": pending_audit,
            }
        )
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)

    def _record_history(self) -> None:
        """FedAsync mixes ``base + delta``, so keep the versions an update may still be based on."""
        if not self._keeps_history:
            return
        self.state.history[self.state.version] = self.state.params
        oldest_allowed = self.state.version - self.config.strategy.max_staleness
        for version in [version for version in self.state.history if version < oldest_allowed]:
            del self.state.history[version]

    # ------------------------------------------------------------------------------------------------ broker
    def attach(self, transport: Transport) -> None:
        """Start consuming and (re)publish the current model: after a crash, sites may have missed it."""
        self.transport = transport
        # Deliveries handled on a connection that died cannot be acked any more (the broker redelivers them and
        # they are dropped as duplicates); what they changed is still made durable here.
        self._pending.deliveries.clear()
        self.commit()
        transport.consume(Queue.COORDINATOR_UPDATES.value, self.on_update, prefetch=self.config.update_prefetch)
        transport.consume(Queue.COORDINATOR_STATUS.value, self.on_status, prefetch=STATUS_PREFETCH)
        self.publish_model()

    def _transport(self) -> Transport:
        if self.transport is None:
            raise RuntimeError("coordinator is not attached to a transport")
        return self.transport

    def current_model(self) -> GlobalModel:
        return GlobalModel(
            version=self.state.version,
            tensors=self.state.params,
            training=replace(self.config.training, train_on_same_version=self.strategy.name != "fedavg-sync"),
            fingerprint=self.fingerprint,
            created_at=self.clock(),
        )

    def publish_model(self) -> None:
        """Transient: the checkpoint is the model's durable copy, and ``attach`` publishes it again on every
        (re)connection, so the broker need not write each version of the whole model to disk. Not waited for:
        the next version supersedes it, and a confirm of a large model costs a busy broker tens of ms; a refusal
        is logged when it arrives."""
        try:
            self._transport().publish(
                Exchange.MODELS.value,
                routing_key(BROADCAST_SITE, Kind.MODEL),
                self.current_model().encode(),
                persistent=False,
                wait=False,
            )
        except PublishRefused as exc:
            log.warning("model v%d reached no site inbox (%s)", self.state.version, exc)

    def publish_control(self, command: ControlCommand, reason: str) -> None:
        try:
            self._transport().publish(
                Exchange.CONTROL.value,
                routing_key(BROADCAST_SITE, Kind.CONTROL),
                Control(command=command, reason=reason, issued_at=self.clock()).encode(),
            )
        except PublishRefused as exc:
            log.warning("control %s reached no site (%s)", command.value, exc)

    # ------------------------------------------------------------------------------------------------ updates
    def on_update(self, delivery: Delivery) -> None:
        """The broker callback: hand the delivery to ``process_update``; ``commit`` acks it once it is durable."""
        if self.finishing_since is not None:
            return  # left unacked: it returns to the queue when this run closes
        self.process_update(delivery)
        # Only the tag is needed to ack; a rejected body waits in ``dead_letters``. Dropping it here keeps a batch
        # of large updates from holding their bodies until the commit.
        self._pending.deliveries.append(replace(delivery, body=b""))
        if self._pending.opened_at is None:
            self._pending.opened_at = self.monotonic()
        if len(self._pending.deliveries) >= self._commit_batch:
            self.commit()

    def _commit_due(self) -> bool:
        """At the end of a poll: commit a new version now; otherwise only once the updates stop coming (a poll
        brought none) or the batch has waited ``COMMIT_MAX_DELAY_SECONDS``."""
        pending = self._pending
        arrived = len(pending.deliveries) - pending.seen_at_last_poll
        pending.seen_at_last_poll = len(pending.deliveries)
        waited = self.monotonic() - pending.opened_at if pending.opened_at is not None else 0.0
        return pending.new_version or arrived == 0 or waited >= COMMIT_MAX_DELAY_SECONDS

    def commit(self) -> None:
        """Make what the handled updates changed durable, then ack them and publish: one checkpoint and one
        audit fsync for the whole batch."""
        pending, self._pending = self._pending, PendingCommit()
        if not (pending.deliveries or pending.unsealed or pending.state_changed):
            return
        records = self._seal(pending.unsealed)
        if pending.state_changed:
            self._checkpoint(records)
        self.audit.append_sealed_batch(records)
        for delivery, headers in pending.dead_letters:
            try:
                self._transport().publish(
                    Exchange.DEAD_LETTERS.value, delivery.routing_key, delivery.body, headers=headers
                )
            except PublishRefused as exc:
                log.error("could not dead-letter a rejected update: %s", exc)
        for delivery in pending.deliveries:
            self._transport().ack(delivery)
        if pending.new_version:
            self.publish_model()

    def process_update(self, delivery: Delivery) -> Outcome:
        started = time.perf_counter()
        now = self.clock()
        digest = self.audit.digest(delivery.body)
        routed_site = site_from_routing_key(delivery.routing_key) or "unknown"
        label = routed_site if routed_site in self.known_sites else "unknown"
        self.metrics.updates_received.labels(site=label).inc()
        self.metrics.update_size.labels(site=label).observe(len(delivery.body))
        checked = validate_update(
            delivery,
            known_sites=self.known_sites,
            model=self.state.params,
            version=self.state.version,
            max_staleness=self.config.strategy.max_staleness,
            max_norm=self.config.validation.max_update_norm,
            duplicates=self.duplicates,
            limits=self.limits,
        )
        if isinstance(checked, ValidUpdate):
            contribution = Contribution(
                site_id=checked.update.site_id,
                update_id=checked.update.update_id,
                base_version=checked.update.base_version,
                staleness=checked.staleness,
                num_examples=checked.update.num_examples,
                delta=self._as_model_dtypes(checked.update.delta),
            )
            refusal = self.strategy.check(contribution, self.state.version)
            if refusal is None:
                if label in self.known_sites:
                    self.liveness.heard_from(label, now)
                    self._show_site(label)
                return self._accept(delivery, digest, checked, contribution, started, now)
            checked = Rejection(refusal, f"refused by {self.strategy.name}: {refusal}", label, checked.update)
        elif self._redelivered_after_restart(delivery, checked):
            self._acknowledge_redelivery(delivery, digest, checked, now)
            return Outcome()
        self._reject(delivery, digest, checked, now)
        return Outcome(rejection=checked)

    def _redelivered_after_restart(self, delivery: Delivery, rejection: Rejection) -> bool:
        """The broker (not the site) sent an update again that this run already applied: its ack was lost when
        the connection or the process died after the commit. The site did nothing wrong."""
        update = rejection.update
        return (
            delivery.redelivered
            and rejection.reason == Reason.DUPLICATE
            and update is not None
            and self.duplicates.applied(update.update_id)
        )

    def _acknowledge_redelivery(
        self, delivery: Delivery, digest: Future[str], rejection: Rejection, now: float
    ) -> None:
        """Ack with the next commit and note it in the audit log; no dead letter, no rejection counted."""
        update = rejection.update
        assert update is not None
        self.metrics.updates_redelivered.labels(site=rejection.site_id).inc()
        self._update_record(
            delivery,
            digest,
            update,
            self.state.version - update.base_version,
            outcome="already-applied",
            now=now,
            detail="redelivered by the broker after a restart; applied before",
        )
        log.info(
            "update %s from %s redelivered after a restart: already applied, acked", update.update_id, rejection.site_id
        )

    def _as_model_dtypes(self, delta: Mapping[str, torch.Tensor]) -> Params:
        return {
            name: tensor if tensor.dtype == self.state.params[name].dtype else tensor.to(self.state.params[name].dtype)
            for name, tensor in delta.items()
        }

    def _accept(
        self,
        delivery: Delivery,
        digest: Future[str],
        checked: ValidUpdate,
        contribution: Contribution,
        started: float,
        now: float,
    ) -> Outcome:
        update = checked.update
        base = self.state.history.get(update.base_version, self.state.params)
        new_params = self.strategy.add(self.state.params, self.state.version, contribution, base)
        self.duplicates.remember(update)
        self.state.accepted_total += 1
        new_version = self._advance(new_params, now) if new_params is not None else None
        self._update_record(
            delivery,
            digest,
            update,
            checked.staleness,
            outcome="accepted",
            now=now,
            norm=checked.norm,
            new_version=new_version,
        )
        self._pending.state_changed = True
        self._pending.new_version = self._pending.new_version or new_version is not None
        self.metrics.updates_applied.labels(site=update.site_id).inc()
        self.metrics.staleness.labels(site=update.site_id).observe(checked.staleness)
        self.metrics.aggregation_seconds.observe(time.perf_counter() - started)
        self._update_buffer_gauges()
        if new_version is not None:
            log.info(
                "update from %s (seq %d, staleness %d) -> model v%d",
                update.site_id,
                update.seq,
                checked.staleness,
                new_version,
            )
        else:
            log.info(
                "update from %s (seq %d, staleness %d) buffered (%d/%s)",
                update.site_id,
                update.seq,
                checked.staleness,
                self.strategy.buffered(),
                getattr(self.strategy, "buffer_size", "?"),
            )
        self._check_stopping_rule()
        return Outcome(new_version=new_version)

    def _advance(self, new_params: Params, now: float) -> int:
        self.state.params = new_params
        self.state.version += 1
        self._record_history()
        self.metrics.new_version(self.state.version, now)
        return self.state.version

    def _update_record(
        self,
        delivery: Delivery,
        digest: Future[str],
        update: ModelUpdate | None,
        staleness: int | None,
        *,
        outcome: str,
        now: float,
        norm: float | None = None,
        reason: str = "",
        new_version: int | None = None,
        detail: str = "",
    ) -> None:
        """Note the audit record of one received update (``update`` is None when it did not decode) for the batch
        being committed; it is sealed, with its body's digest, at the commit."""
        fields = {
            "kind": "update",
            "time": now,
            "site": site_from_routing_key(delivery.routing_key),
            "user_id": delivery.user_id,
            "update_id": update.update_id if update else None,
            "seq": update.seq if update else None,
            "base_version": update.base_version if update else None,
            "staleness": staleness,
            "norm": norm,
            "sha256": None,
            "bytes": len(delivery.body),
            "outcome": outcome,
            "reason": reason,
            "detail": detail,
            "model_version": self.state.version,
            "resulting_version": new_version,
            "redelivered": delivery.redelivered,
        }
        self._pending.unsealed.append((fields, digest))

    def _seal(self, unsealed: list[tuple[dict[str, Any], Future[str]]]) -> list[dict[str, Any]]:
        """The batch's audit records with their digests, chained in the order the updates were handled."""
        records: list[dict[str, Any]] = []
        for fields, digest in unsealed:
            sealed = self.audit.seal({**fields, "sha256": digest.result()}, after=records[-1] if records else None)
            records.append(sealed)
        return records

    def _reject(self, delivery: Delivery, digest: Future[str], rejection: Rejection, now: float) -> None:
        update = rejection.update
        reason = str(rejection.reason.value if hasattr(rejection.reason, "value") else rejection.reason)
        self.metrics.updates_rejected.labels(site=rejection.site_id, reason=reason).inc()
        self._update_record(
            delivery,
            digest,
            update,
            self.state.version - update.base_version if update else None,
            outcome="rejected",
            now=now,
            reason=reason,
            detail=rejection.detail,
        )
        headers = {
            REJECT_REASON_HEADER: reason,
            "x-fedmq-detail": rejection.detail[:500],
            "x-fedmq-user-id": delivery.user_id or "",
        }
        self._pending.dead_letters.append((delivery, headers))
        log.warning("rejected update from %s: %s (%s)", rejection.site_id, reason, rejection.detail)

    def _update_buffer_gauges(self) -> None:
        self.metrics.buffer_fill.set(self.strategy.buffered())
        capacity = getattr(self.strategy, "buffer_size", None)
        if capacity is None and hasattr(self.strategy, "sites"):
            capacity = len(self.strategy.sites)
        self.metrics.buffer_capacity.set(capacity or 1)

    # ------------------------------------------------------------------------------------------------ status
    def on_status(self, delivery: Delivery) -> None:
        self.process_status(delivery)
        self._transport().ack(delivery)

    def process_status(self, delivery: Delivery) -> None:
        site = site_from_routing_key(delivery.routing_key)
        if site not in self.known_sites or delivery.user_id != site:
            log.warning("ignored status message from %r (user %r)", site, delivery.user_id)
            return
        now = self.clock()
        kind = delivery.routing_key.rsplit(".", 1)[-1]
        try:
            if kind == Kind.HEARTBEAT.value:
                heartbeat = Heartbeat.decode(delivery.body, self.limits)
                if heartbeat.site_id != site:
                    raise SchemaError("site_id differs from the sender", "site_id")
                came_back = self.liveness.heard_from(site, now, heartbeat.state.value)
                if came_back:
                    log.info("site %s is up (%s)", site, heartbeat.state.value)
            elif kind == Kind.EVAL.value:
                report = EvalReport.decode(delivery.body, self.limits)
                if report.site_id != site:
                    raise SchemaError("site_id differs from the sender", "site_id")
                self.liveness.heard_from(site, now)
                self._record_evaluation(report, now)
        except SchemaError as exc:
            log.warning("ignored malformed %s from %s: %s", kind, site, exc)
            return
        self._show_site(site)

    def _show_site(self, site: str) -> None:
        status = self.liveness.sites[site]
        self.metrics.site_up.labels(site=site).set(1 if status.up else 0)
        if status.last_seen is not None:
            self.metrics.site_last_seen.labels(site=site).set(status.last_seen)

    def _record_evaluation(self, report: EvalReport, now: float) -> None:
        self.evaluations.add(report, now)
        for name, value in report.metrics.items():
            self.metrics.eval_metric.labels(site=report.site_id, metric=name).set(value)
        latest = self.evaluations.latest()
        if latest is not None:
            for name in latest.mean:
                self.metrics.eval_global.labels(metric=name, aggregate="mean").set(latest.mean[name])
                self.metrics.eval_global.labels(metric=name, aggregate="pooled").set(latest.pooled[name])
        log.info(
            "site %s evaluated model v%d: %s",
            report.site_id,
            report.model_version,
            ", ".join(f"{name} {value:.3f}" for name, value in sorted(report.metrics.items())),
        )
        self._check_stopping_rule()

    # ------------------------------------------------------------------------------------------------- timers
    def tick(self) -> None:
        """Called between polls: commit when due, then liveness, round timeouts, the stopping rule."""
        if self._commit_due():
            self.commit()
        now = self.clock()
        for site in self.liveness.sweep(now):
            log.warning("site %s is down: silent for more than %.0f s", site, self.liveness.timeout_seconds)
            self._show_site(site)
        if self.finishing_since is not None:
            self._maybe_finish()
            return
        new_params = self.strategy.flush(self.state.params, self.state.version, self.monotonic())
        if new_params is not None:
            new_version = self._advance(new_params, now)
            self._pending.state_changed = self._pending.new_version = True
            self.commit()  # together with the batch still gathering: the new version holds its updates
            self._update_buffer_gauges()
            log.info("round timed out: model v%d from the updates at hand", new_version)
        self._check_stopping_rule()

    def _check_stopping_rule(self) -> None:
        if self.finishing_since is not None:
            return
        rule = self.config.stopping
        reason = ""
        if rule.max_versions and self.state.version >= rule.max_versions:
            reason = f"reached {self.state.version} versions"
        elif rule.max_seconds and self.clock() - self.state.started_at >= rule.max_seconds:
            # from the run's first start (in the checkpoint), so a restart does not grant a fresh budget
            reason = f"wall-clock budget of {rule.max_seconds:.0f} s spent"
        elif rule.target_metric:
            latest = self.evaluations.for_version(self.state.version)
            if latest is not None and set(latest.sites) >= set(self.liveness.up_sites()):
                values = latest.pooled if rule.target_aggregate == "pooled" else latest.mean
                value = values.get(rule.target_metric)
                if value is not None and value >= rule.target_value:
                    reason = f"{rule.target_aggregate} {rule.target_metric} {value:.3f} >= {rule.target_value}"
        if reason:
            self.stop_reason = reason
            self.finishing_since = self.monotonic()
            log.info("stopping: %s; waiting for the final evaluations of model v%d", reason, self.state.version)

    def _maybe_finish(self) -> None:
        """Stop once every site that is up has evaluated the final version (or the wait timed out)."""
        assert self.finishing_since is not None
        if self.finished:
            return  # a tick after the end must not send a second stop or rewrite the results
        final = self.evaluations.for_version(self.state.version)
        reported = set(final.sites) if final else set()
        waited = self.monotonic() - self.finishing_since
        if reported >= set(self.liveness.up_sites()) or waited > self.config.stopping.final_eval_timeout_seconds:
            self.publish_control(ControlCommand.STOP, self.stop_reason)
            self.write_results()
            self.finished = True
            log.info("run finished: %s", self.stop_reason)

    # ------------------------------------------------------------------------------------------------ results
    def summary(self) -> dict[str, Any]:
        final: GlobalEvaluation | None = self.evaluations.for_version(self.state.version)
        return {
            "task": self.config.task,
            "strategy": self.strategy.name,
            "versions": self.state.version,
            "updates_accepted": self.state.accepted_total,
            "seconds": self.clock() - self.state.started_at,
            "stop_reason": self.stop_reason,
            "final_evaluation": None
            if final is None
            else {
                "version": final.version,
                "mean": final.mean,
                "pooled": final.pooled,
                "per_site": {
                    site: report.metrics for site, report in self.evaluations.by_version[final.version].items()
                },
                "num_examples": {
                    site: report.num_examples for site, report in self.evaluations.by_version[final.version].items()
                },
            },
            "sites": {
                site: {"up": status.up, "last_seen": status.last_seen, "state": status.state}
                for site, status in sorted(self.liveness.sites.items())
            },
            "config": as_dict(self.config),
        }

    def write_results(self) -> None:
        directory = self.config.state_dir
        write_safetensors(
            directory / "final_model.safetensors",
            self.state.params,
            {"version": str(self.state.version), "task": self.config.task},
        )
        write_file_durably(directory / "run_summary.json", json.dumps(self.summary(), indent=2).encode())
        log.info("final model v%d and run summary written to %s", self.state.version, directory)
