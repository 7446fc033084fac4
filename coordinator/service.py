"""The coordinator service: the place that connects the pieces to a transport and to each other.

It speaks to the broker only through a ``Transport`` (``attach``), so everything here runs the same against the
in-memory transport in unit tests and against RabbitMQ in production. Each piece does one job:

    each site's update queue -> on_update -> updates.UpdateHandler (validation -> Strategy -> outcome)
                               -> commit.GroupCommit (checkpoint -> audit -> dead letters -> ack -> publish)
    status queue  -> on_status -> status.StatusHandler (liveness, evaluations) -> ack
    tick (between polls)       -> commit when due, liveness sweep, strategy flush, stopping.stop_reason
    the end                    -> control STOP, results.write_results

Each handler has a guard: an unexpected exception while handling one message rejects (or drops) that message and
the service keeps serving; storage errors pass through it. The crash-safety argument (nothing acked before it is
durable, nothing counted twice) is in ``coordinator.commit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from broker.topology import (
    BROADCAST_SITE,
    SITE_UPDATE_QUEUE_LENGTH,
    Exchange,
    Kind,
    Queue,
    routing_key,
    site_update_queues,
)
from broker.transport import Delivery, PublishRefused, Transport
from coordinator.aggregation import Params, Strategy
from coordinator.audit import AuditLog
from coordinator.checkpoint import CheckpointStore
from coordinator.commit import GroupCommit
from coordinator.config import CoordinatorConfig
from coordinator.evaluation import EvaluationBook
from coordinator.liveness import Liveness
from coordinator.metrics import CoordinatorMetrics
from coordinator.results import run_summary, write_results
from coordinator.run_state import RunState
from coordinator.signatures import Signer
from coordinator.status import StatusHandler, StatusRejection, StatusRules
from coordinator.stopping import final_evaluations_done, stop_reason
from coordinator.storage import DiskSpace, free_bytes
from coordinator.updates import Outcome, UpdateHandler, UpdateRules
from coordinator.validation import DuplicateFilter, SignatureCheck
from fedmq import __version__
from schemas import Control, ControlCommand, DecodeLimits, GlobalModel, ModelFingerprint

log = logging.getLogger(__name__)

STATUS_PREFETCH = 50
DELIVERY_COUNT_HEADER = "x-delivery-count"


def delivery_count(delivery: Delivery) -> int:
    """How often the broker returned this message to the queue before (a quorum queue's ``x-delivery-count``
    header); a redelivery without the header counts as one. Only shown (``fedmq_update_delivery_count_max``): no
    rule of the coordinator depends on it, nor on the broker's default for it."""
    value = delivery.headers.get(DELIVERY_COUNT_HEADER)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 1 if delivery.redelivered else 0


def update_window(update_prefetch: int, sites: int) -> int:
    """How many unacked updates the broker can hand the coordinator at once: each site's share of the prefetch,
    but never more than its bounded queue holds. The group commit's "window full" trigger must use this, not
    ``update_prefetch``: a window the broker can never fill makes every batch wait for the commit timer."""
    per_site = min(update_prefetch_per_site(update_prefetch, sites), SITE_UPDATE_QUEUE_LENGTH)
    return max(1, min(update_prefetch, per_site * max(1, sites)))


def update_prefetch_per_site(update_prefetch: int, sites: int) -> int:
    """Each site's share of the updates in flight: a flooding site holds no more of the window than an honest one,
    and the total stays within ``update_prefetch`` (the memory the coordinator may spend on received updates)."""
    return max(1, -(-update_prefetch // max(1, sites)))


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
        signer: Signer | None = None,
        update_signatures: SignatureCheck | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        incarnation: int | None = None,
        free_space: Callable[[Path], int] = free_bytes,
    ) -> None:
        self.config = config
        # drawn at each start, in every model published: a restored coordinator's models supersede older ones
        self.incarnation = GlobalModel.new_incarnation() if incarnation is None else incarnation
        self.strategy = strategy
        self.fingerprint = fingerprint
        self.metrics = metrics
        self.audit = audit
        self.evaluations = evaluations
        self.checkpoints = checkpoints
        self.signer = signer  # None: models and controls go out unsigned (sites that require signatures refuse them)
        self.clock = clock
        self.monotonic = monotonic
        self.transport: Transport | None = None
        self.finishing_since: float | None = None
        self.finished = False
        self.stop_reason = ""
        known_sites = frozenset(config.sites)
        self.prefetch_per_site = update_prefetch_per_site(config.update_prefetch, len(known_sites))
        limits = DecodeLimits(max_message_bytes=int(config.validation.max_message_mb * 1024 * 1024))
        self.state = RunState(
            version=0, params={name: tensor.clone() for name, tensor in initial_params.items()}, started_at=clock()
        )
        self.liveness = Liveness(config.liveness.site_timeout_seconds)
        self.duplicates = DuplicateFilter(config.validation.remembered_update_ids)
        self.space = DiskSpace(
            config.state_dir, reserve_bytes=int(config.storage.reserve_mb * 1024 * 1024), free=free_space
        )
        metrics.watch_state_dir(self.space.free_now, self.space.reserve_bytes)
        self.batch = GroupCommit(
            state=self.state,
            strategy=strategy,
            duplicates=self.duplicates,
            audit=audit,
            checkpoints=checkpoints,
            metrics=metrics,
            transport=self._transport,
            publish_model=self.publish_model,
            batch_size=update_window(config.update_prefetch, len(known_sites)),
            space=self.space,
            monotonic=monotonic,
        )
        self.status = StatusHandler(
            rules=StatusRules(
                known_sites=known_sites, max_num_examples=config.validation.max_num_examples, limits=limits
            ),
            liveness=self.liveness,
            evaluations=evaluations,
            metrics=metrics,
            audit=audit,
            batch=self.batch,
            current_version=lambda: self.state.version,
            clock=clock,
        )
        self.updates = UpdateHandler(
            rules=UpdateRules(
                known_sites=known_sites,
                max_staleness=config.strategy.max_staleness,
                max_norm=config.validation.max_update_norm,
                limits=limits,
                signatures=update_signatures,
                max_num_examples=config.validation.max_num_examples,
                site_max_num_examples=dict(config.validation.site_max_num_examples),
                clip_num_examples=config.validation.num_examples_above_cap == "clip",
            ),
            state=self.state,
            strategy=strategy,
            duplicates=self.duplicates,
            audit=audit,
            batch=self.batch,
            metrics=metrics,
            heard_from=self.status.heard_from,
            clock=clock,
        )
        strategy.set_sites(known_sites)
        self.state.record_history(keep=strategy.keeps_base_history, max_staleness=config.strategy.max_staleness)
        self.metrics.max_staleness.set(config.strategy.max_staleness)
        self.metrics.sites_registered.set(len(known_sites))
        self.metrics.info.labels(strategy=strategy.name, task=config.task, version=__version__).set(1)
        self.updates.show_buffer()

    def restore(self) -> bool:
        """Resume from the last checkpoint; False when there is none (a fresh run)."""
        if not self.batch.restore():
            return False
        self.metrics.new_version(self.state.version, self.clock())
        self.updates.show_buffer()
        log.info(
            "resumed from checkpoint: model v%d, %d updates accepted so far, %d buffered",
            self.state.version,
            self.state.accepted_total,
            self.strategy.buffered(),
        )
        return True

    # ------------------------------------------------------------------------------------------------ broker
    def attach(self, transport: Transport) -> None:
        """Start consuming and (re)publish the current model: after a crash, sites may have missed it.

        One consumer per site's update queue, each with its share of the prefetch window (flood control, see
        ``broker.topology``): the broker then delivers the sites' updates side by side."""
        self.transport = transport
        self.batch.forget_deliveries()
        self.commit()
        for queue in site_update_queues(self.config.sites):
            transport.consume(queue, self.on_update, prefetch=self.prefetch_per_site)
        transport.consume(Queue.COORDINATOR_STATUS.value, self.on_status, prefetch=STATUS_PREFETCH)
        self.publish_model()

    def _transport(self) -> Transport:
        if self.transport is None:
            raise RuntimeError("coordinator is not attached to a transport")
        return self.transport

    def current_model(self) -> GlobalModel:
        model = GlobalModel(
            version=self.state.version,
            tensors=self.state.params,
            training=replace(self.config.training, train_on_same_version=self.strategy.trains_on_same_version),
            fingerprint=self.fingerprint,
            incarnation=self.incarnation,
            created_at=self.clock(),
        )
        return self.signer(model) if self.signer is not None else model

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
        control = Control(command=command, reason=reason, issued_at=self.clock())
        if self.signer is not None:
            control = self.signer(control)
        try:
            self._transport().publish(
                Exchange.CONTROL.value,
                routing_key(BROADCAST_SITE, Kind.CONTROL),
                control.encode(),
            )
        except PublishRefused as exc:
            log.warning("control %s reached no site (%s)", command.value, exc)

    # ------------------------------------------------------------------------------------------------ handlers
    def on_update(self, delivery: Delivery) -> None:
        """The broker callback: hand the delivery to ``process_update``; the group commit acks it once durable."""
        if self.finishing_since is not None:
            return  # left unacked: it returns to the queue when this run closes
        self.metrics.saw_delivery_count(delivery_count(delivery))
        self.process_update(delivery)
        self.batch.handled(delivery)

    def process_update(self, delivery: Delivery) -> Outcome:
        outcome = self.updates.handle(delivery)
        if outcome.accepted:
            self._check_stopping_rule()
        return outcome

    def commit(self) -> None:
        """Make the handled updates durable, then ack them and publish (``coordinator.commit``)."""
        self.batch.commit()

    def on_status(self, delivery: Delivery) -> None:
        """An accepted status message is acked at once; a refused one with the batch that makes its audit record
        and dead letter durable."""
        if self.process_status(delivery):
            self._transport().ack(delivery)
        else:
            self.batch.handled(delivery)

    def process_status(self, delivery: Delivery) -> bool:
        """Handle one status message; False when it was refused."""
        outcome = self.status.handle(delivery)
        if outcome is True:
            self._check_stopping_rule()
        return not isinstance(outcome, StatusRejection)

    # ------------------------------------------------------------------------------------------------- timers
    def tick(self) -> None:
        """Called between polls: commit when due, then liveness, round timeouts, the stopping rule."""
        if self.batch.due():
            self.commit()
        now = self.clock()
        self.status.sweep(now)
        if self.finishing_since is not None:
            self._maybe_finish()
            return
        new_version = self.updates.flush(now, self.monotonic())
        if new_version is not None:
            self.commit()  # together with the batch still gathering: the new version holds its updates
            log.info("round timed out: model v%d from the updates at hand", new_version)
        self._check_stopping_rule()

    def _check_stopping_rule(self) -> None:
        if self.finishing_since is not None:
            return
        reason = stop_reason(
            self.config.stopping,
            version=self.state.version,
            elapsed_seconds=self.clock() - self.state.started_at,
            evaluation=self.evaluations.for_version(self.state.version),
            up_sites=self.liveness.up_sites(),
        )
        if reason is not None:
            self.stop_reason = reason
            self.finishing_since = self.monotonic()
            log.info("stopping: %s; waiting for the final evaluations of model v%d", reason, self.state.version)

    def _maybe_finish(self) -> None:
        """Stop once every site that is up has evaluated the final version (or the wait timed out)."""
        assert self.finishing_since is not None
        if self.finished:
            return  # a tick after the end must not send a second stop or rewrite the results
        done = final_evaluations_done(
            self.config.stopping,
            final=self.evaluations.for_version(self.state.version),
            up_sites=self.liveness.up_sites(),
            waited_seconds=self.monotonic() - self.finishing_since,
        )
        if done:
            self.publish_control(ControlCommand.STOP, self.stop_reason)
            self.write_results()
            self.finished = True
            log.info("run finished: %s", self.stop_reason)

    # ------------------------------------------------------------------------------------------------ results
    def summary(self) -> dict[str, Any]:
        return run_summary(
            self.config,
            strategy_name=self.strategy.name,
            state=self.state,
            stop_reason=self.stop_reason,
            evaluations=self.evaluations,
            liveness=self.liveness,
            now=self.clock(),
        )

    def write_results(self) -> None:
        write_results(self.config.state_dir, self.state, self.config.task, self.summary())
