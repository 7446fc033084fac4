"""One update, from delivery to outcome: validate -> strategy -> audit fields, metrics and the batch to commit.

Pure of the broker: it reads a ``Delivery`` and leaves the ack, the audit append and the dead letter to the group
commit (``coordinator.commit``). A failed site is data: every refusal is a ``Rejection`` with a reason that ends up
in ``fedmq_updates_rejected_total``, the audit log and the dead-letter queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from broker.topology import REJECT_REASON_HEADER
from broker.transport import Delivery
from coordinator.aggregation import Contribution, Params, Strategy
from coordinator.aggregation.robust import Screening
from coordinator.audit import AuditLog, bounded
from coordinator.commit import GroupCommit
from coordinator.errors import STORAGE_ERRORS
from coordinator.metrics import CoordinatorMetrics
from coordinator.reasons import Reason
from coordinator.run_state import RunState
from coordinator.validation import (
    DuplicateFilter,
    Rejection,
    SignatureCheck,
    ValidUpdate,
    site_from_routing_key,
    validate_update,
)
from schemas import DecodeLimits, ModelUpdate

log = logging.getLogger(__name__)


# Rejections that say nothing about the seq of the site the update names: it is not the sender's, or not new.
_SETTLES_NOTHING = frozenset({Reason.DUPLICATE, Reason.IDENTITY_MISMATCH, Reason.UNKNOWN_SITE})


@dataclass(frozen=True)
class Outcome:
    """What handling one update led to: a rejection, an accepted (applied or buffered) update, a new version, or
    none of these (a redelivery of an update already applied)."""

    rejection: Rejection | None = None
    new_version: int | None = None
    accepted: bool = False


@dataclass(frozen=True)
class UpdateRules:
    """The bounds an update must keep to, from the config."""

    known_sites: frozenset[str]
    max_staleness: int
    max_norm: float
    limits: DecodeLimits
    signatures: SignatureCheck | None = None  # None: updates are not signature-checked
    max_num_examples: int | None = None
    site_max_num_examples: Mapping[str, int] = field(default_factory=dict)
    clip_num_examples: bool = True

    def num_examples_cap(self, site: str) -> int | None:
        """The tighter of the site's own cap and the global one."""
        caps = [cap for cap in (self.site_max_num_examples.get(site), self.max_num_examples) if cap is not None]
        return min(caps) if caps else None


class UpdateHandler:
    """Turns one delivered update into an outcome, leaving its audit record, dead letter and ack to ``batch``."""

    def __init__(
        self,
        *,
        rules: UpdateRules,
        state: RunState,
        strategy: Strategy,
        duplicates: DuplicateFilter,
        audit: AuditLog,
        batch: GroupCommit,
        metrics: CoordinatorMetrics,
        heard_from: Callable[[str, float], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rules = rules
        self.state = state
        self.strategy = strategy
        self.duplicates = duplicates
        self.audit = audit
        self.batch = batch
        self.metrics = metrics
        self.heard_from = heard_from
        self.clock = clock
        self._in_hand: ModelUpdate | None = None  # the update being handled, once decoded, for the guard's record

    def handle(self, delivery: Delivery) -> Outcome:
        """Validate, ask the strategy, and note the outcome for the next commit, behind the handler's guard.

        The guard (nameko's ``Consumer`` pattern): an unexpected exception while handling this one update becomes
        an ``internal-error`` rejection (counted, audited with the exception text, dead-lettered, acked with the
        batch) and the service keeps serving. Nothing is half-applied: the run state changes only after
        ``Strategy.add`` returned, and ``add`` either takes the update or raises leaving the strategy as it was
        (the Strategy contract). Storage errors are not caught: a failed write means nothing is durable.
        """
        started = time.perf_counter()
        now = self.clock()
        digest = self.audit.digest(delivery.body)
        label = self._site_label(delivery)
        self.metrics.updates_received.labels(site=label).inc()
        self.metrics.update_size.labels(site=label).observe(len(delivery.body))
        self._in_hand = None
        try:
            return self._handle(delivery, digest, label, started, now)
        except STORAGE_ERRORS:
            raise
        except Exception as exc:
            log.exception("internal error while handling an update from %s: rejected, serving on", label)
            detail = f"{type(exc).__name__}: {exc}"
            rejection = Rejection(Reason.INTERNAL_ERROR, detail, label, self._in_hand)
            self._reject(delivery, digest, rejection, now)
            return Outcome(rejection=rejection)

    def _handle(self, delivery: Delivery, digest: Future[str], label: str, started: float, now: float) -> Outcome:
        checked = validate_update(
            delivery,
            known_sites=self.rules.known_sites,
            model=self.state.params,
            version=self.state.version,
            max_staleness=self.rules.max_staleness,
            max_norm=self.rules.max_norm,
            signatures=self.rules.signatures,
            duplicates=self.duplicates,
            limits=self.rules.limits,
            max_num_examples=self.rules.num_examples_cap(label),
            clip_num_examples=self.rules.clip_num_examples,
        )
        self._in_hand = checked.update
        if isinstance(checked, ValidUpdate):
            contribution = Contribution(
                site_id=checked.update.site_id,
                update_id=checked.update.update_id,
                base_version=checked.update.base_version,
                staleness=checked.staleness,
                num_examples=checked.num_examples,
                delta=self._as_model_dtypes(checked.update.delta),
                norm=checked.norm,
            )
            refusal = self.strategy.admit(contribution, self.state.version)
            if refusal is None:
                if label in self.rules.known_sites:
                    self.heard_from(label, now)
                return self._accept(delivery, digest, checked, contribution, started, now)
            refused = Reason(refusal)  # a strategy's own string is no reason: the guard makes it an internal error
            checked = Rejection(refused, f"refused by {self.strategy.name}: {refused.value}", label, checked.update)
        elif self._copy_of_applied(checked):
            self._acknowledge_copy(delivery, digest, checked, now)
            return Outcome()
        self._reject(delivery, digest, checked, now)
        return Outcome(rejection=checked)

    def flush(self, now: float, monotonic_now: float) -> int | None:
        """Time-driven aggregation (a synchronous round's timeout): the new version's number, if one was made."""
        new_params = self.strategy.flush(self.state.params, self.state.version, monotonic_now)
        if new_params is None:
            return None
        new_version = self.advance(new_params, now)
        self.batch.changed(new_version=True)
        self.show_buffer()
        return new_version

    def advance(self, new_params: Params, now: float) -> int:
        new_version = self.state.advance(
            new_params, keep_history=self.strategy.keeps_base_history, max_staleness=self.rules.max_staleness
        )
        self.metrics.new_version(new_version, now)
        return new_version

    def show_buffer(self) -> None:
        self.metrics.buffer_fill.set(self.strategy.buffered())
        self.metrics.buffer_capacity.set(self.strategy.capacity)

    # ------------------------------------------------------------------------------------------ outcomes
    def _site_label(self, delivery: Delivery) -> str:
        """The routing key's site when it is registered, else ``unknown`` (a label per stranger is unbounded)."""
        routed_site = site_from_routing_key(delivery.routing_key) or "unknown"
        return routed_site if routed_site in self.rules.known_sites else "unknown"

    def _copy_of_applied(self, rejection: Rejection) -> bool:
        """A second copy of an update this run applied: the broker redelivered it (its ack was lost when the
        connection or the process died after the commit), or the site sent it again after a lost publisher confirm
        (same id and seq). The site did nothing wrong."""
        update = rejection.update
        return rejection.reason == Reason.DUPLICATE and update is not None and self.duplicates.applied_copy(update)

    def _acknowledge_copy(self, delivery: Delivery, digest: Future[str], rejection: Rejection, now: float) -> None:
        """Ack with the next commit and note it in the audit log; no dead letter, no rejection counted. Safe to ack:
        the applied original is durable by the time this is acked, since both are acked only by a commit that
        made the state holding it durable."""
        update = rejection.update
        assert update is not None
        self.metrics.updates_redelivered.labels(site=rejection.site_id).inc()
        how = "redelivered by the broker" if delivery.redelivered else "sent again by the site (a lost confirm)"
        self._record(
            delivery,
            digest,
            update,
            self.state.version - update.base_version,
            outcome="already-applied",
            now=now,
            detail=f"{how}; applied before",
        )
        log.info("update %s from %s %s: already applied, acked", update.update_id, rejection.site_id, how)

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
        taken = self.strategy.take(self.state.params, self.state.version, contribution, base)
        new_params = taken.new_params
        self.duplicates.remember(update)
        self.state.accepted_total += 1
        new_version = self.advance(new_params, now) if new_params is not None else None
        self._record(
            delivery,
            digest,
            update,
            checked.staleness,
            outcome="accepted",
            now=now,
            norm=checked.norm,
            new_version=new_version,
            detail=_screening_detail(checked, taken.screening),
        )
        self.batch.changed(new_version=new_version is not None)
        if taken.screening.anomaly_score is not None:
            self.metrics.anomaly_score.labels(site=update.site_id).set(taken.screening.anomaly_score)
        if taken.screening.clip_factor < 1.0:
            self.metrics.updates_clipped.labels(site=update.site_id).inc()
        self.metrics.updates_applied.labels(site=update.site_id).inc()
        self.metrics.staleness.labels(site=update.site_id).observe(checked.staleness)
        self.metrics.aggregation_seconds.observe(time.perf_counter() - started)
        self.show_buffer()
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
                "update from %s (seq %d, staleness %d) buffered (%d/%d)",
                update.site_id,
                update.seq,
                checked.staleness,
                self.strategy.buffered(),
                self.strategy.capacity,
            )
        return Outcome(new_version=new_version, accepted=True)

    def _reject(self, delivery: Delivery, digest: Future[str], rejection: Rejection, now: float) -> None:
        update = rejection.update
        reason = rejection.reason.value
        if update is not None and rejection.reason not in _SETTLES_NOTHING and update.site_id in self.rules.known_sites:
            self.duplicates.settle_refused(update)
        self.metrics.updates_rejected.labels(site=rejection.site_id, reason=reason).inc()
        self._record(
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
            "x-fedmq-detail": bounded(rejection.detail),
            "x-fedmq-user-id": delivery.user_id or "",
        }
        self.batch.dead_letter(delivery, headers)
        log.warning("rejected update from %s: %s (%s)", rejection.site_id, reason, bounded(rejection.detail))

    def _record(
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
        self.batch.record(fields, digest)


def _screening_detail(checked: ValidUpdate, screening: Screening) -> str:
    """The audit record's note on what the robust options did with an accepted update ('' when nothing)."""
    notes = []
    if checked.examples_clipped:
        notes.append(f"num_examples {checked.update.num_examples} clipped to the cap {checked.num_examples}")
    if screening.clip_factor < 1.0 and screening.clip_bound is not None:
        notes.append(f"norm clipped to {screening.clip_bound:.4g} (x{screening.clip_factor:.3g})")
    if screening.anomaly_score is not None:
        notes.append(f"anomaly score {screening.anomaly_score:.3f}")
    return "; ".join(notes)
