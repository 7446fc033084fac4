"""Status messages (heartbeats and evaluations): which sites are up and what they measured.

A status message is checked like an update: a registered site, sending as itself, a message that decodes, and for an
evaluation report values a real evaluation can have (``check_eval_report``): every metric finite, the bounded ones
in their range (accuracy in [0, 1], loss >= 0), ``num_examples`` within ``[validation] max_num_examples`` and a
``model_version`` that exists (not above the current version). A site's report is its claim, not a measurement the
coordinator can repeat: these bounds keep one bad report from setting ``fedmq_eval_global`` (and a ``target_metric``
stop) or pushing real versions out of the evaluation book; they cannot tell an honest 0.7 from an invented one.

A refused message is data, as an update is: counted in ``fedmq_status_rejected_total{site,kind,reason}``, audited
(a record of kind ``status`` or ``eval`` with the body's digest) and dead-lettered with the reason header, through
the same group commit as the updates; it is acked once its record is durable. The one exception is a heartbeat
from a site this run does not list: only counted, since a provisioned site left out of ``sites`` would otherwise
fill the audit log with nothing to review. An accepted status message is acked at
once: the evaluation history is a convenience for plots, not the audit trail. An unexpected exception while handling
one message becomes an ``internal-error`` rejection (also counted in ``fedmq_status_errors_total``); it never takes
the service down.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from broker.topology import REJECT_REASON_HEADER, Kind
from broker.transport import Delivery
from coordinator.audit import AuditLog, bounded
from coordinator.commit import GroupCommit
from coordinator.errors import STORAGE_ERRORS
from coordinator.evaluation import EvaluationBook
from coordinator.liveness import Liveness
from coordinator.metrics import CoordinatorMetrics
from coordinator.reasons import Reason
from coordinator.validation import site_from_routing_key
from schemas import DecodeLimits, EvalReport, Heartbeat, MessageTooLarge, SchemaError

log = logging.getLogger(__name__)

# Metrics whose meaning bounds them (a fraction, a probability); any other metric need only be finite.
UNIT_INTERVAL_METRICS = frozenset(
    {"accuracy", "balanced_accuracy", "auc", "roc_auc", "f1", "precision", "recall", "sensitivity", "specificity"}
)
NON_NEGATIVE_METRICS = frozenset({"loss"})


@dataclass(frozen=True)
class StatusRules:
    """The bounds a status message must keep to, from the config."""

    known_sites: frozenset[str]
    max_num_examples: int
    limits: DecodeLimits


@dataclass(frozen=True)
class StatusRejection:
    reason: Reason
    detail: str


def check_eval_report(report: EvalReport, *, current_version: int, max_num_examples: int) -> StatusRejection | None:
    """None when ``report`` could be a real evaluation of an existing version; else why not. Pure."""
    if report.model_version > current_version:
        return StatusRejection(
            Reason.UNKNOWN_VERSION,
            f"evaluated model v{report.model_version}, but the newest version is v{current_version}",
        )
    if report.num_examples > max_num_examples:
        return StatusRejection(
            Reason.TOO_MANY_EXAMPLES, f"num_examples {report.num_examples} is above the cap of {max_num_examples}"
        )
    for name, value in sorted(report.metrics.items()):
        if not math.isfinite(value):
            return StatusRejection(Reason.NON_FINITE, f"metric {bounded(name, 64)!r} is {value}")
        if name in UNIT_INTERVAL_METRICS and not 0.0 <= value <= 1.0:
            return StatusRejection(Reason.OUT_OF_RANGE, f"metric {name!r} is {value}, outside [0, 1]")
        if name in NON_NEGATIVE_METRICS and value < 0.0:
            return StatusRejection(Reason.OUT_OF_RANGE, f"metric {name!r} is {value}, below 0")
    return None


def _kind_label(routing_key: str) -> str:
    """``eval`` for evaluation reports, ``status`` for heartbeats (and anything else on the status exchange)."""
    return "eval" if routing_key.rsplit(".", 1)[-1] == Kind.EVAL.value else "status"


class StatusHandler:
    """Keeps ``liveness`` and ``evaluations`` (and their metrics) up to date from the status queue."""

    def __init__(
        self,
        *,
        rules: StatusRules,
        liveness: Liveness,
        evaluations: EvaluationBook,
        metrics: CoordinatorMetrics,
        audit: AuditLog,
        batch: GroupCommit,
        current_version: Callable[[], int],
        clock: Callable[[], float],
    ) -> None:
        self.rules = rules
        self.known_sites = rules.known_sites
        self.liveness = liveness
        self.evaluations = evaluations
        self.metrics = metrics
        self.audit = audit
        self.batch = batch
        self.current_version = current_version
        self.clock = clock
        self.liveness.register(rules.known_sites)
        for site in rules.known_sites:
            self.metrics.site_up.labels(site=site).set(0)

    def handle(self, delivery: Delivery) -> StatusRejection | bool:
        """Take one heartbeat or evaluation. True when it was an accepted evaluation (the stopping rule may now
        hold), False for an accepted heartbeat, a ``StatusRejection`` when refused: its audit record and dead letter
        wait in ``batch``, and the caller acks it with the batch.

        Behind the handler's guard: an unexpected exception becomes an ``internal-error`` rejection (logged with its
        traceback, counted in ``fedmq_status_errors_total`` too) and the service keeps serving. A failed write
        (``STORAGE_ERRORS``) is not caught."""
        try:
            return self._handle(delivery)
        except STORAGE_ERRORS:
            raise
        except Exception as exc:
            label = self._site_label(delivery)
            log.exception("internal error while handling a status message from %s (%s)", label, delivery.routing_key)
            self.metrics.status_errors.labels(site=label).inc()
            return self._reject(delivery, StatusRejection(Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))

    def _site_label(self, delivery: Delivery) -> str:
        site = site_from_routing_key(delivery.routing_key)
        return site if site in self.known_sites else "unknown"

    def _handle(self, delivery: Delivery) -> StatusRejection | bool:
        site = site_from_routing_key(delivery.routing_key)
        if site not in self.known_sites:
            rejection = StatusRejection(Reason.UNKNOWN_SITE, f"site {bounded(str(site), 64)!r} is not registered")
            if delivery.routing_key.endswith(f".{Kind.HEARTBEAT.value}"):
                # a provisioned site this run does not list: its heartbeats say nothing to review, every few
                # seconds; counted, not audited or dead-lettered
                self.metrics.status_rejected.labels(site="unknown", kind="status", reason=rejection.reason.value).inc()
                return rejection
            return self._reject(delivery, rejection)
        if delivery.user_id != site:
            detail = f"user_id {delivery.user_id!r} is not the routing key's site {site!r}"
            return self._reject(delivery, StatusRejection(Reason.IDENTITY_MISMATCH, detail))
        now = self.clock()
        kind = delivery.routing_key.rsplit(".", 1)[-1]
        try:
            if kind == Kind.HEARTBEAT.value:
                heartbeat = Heartbeat.decode(delivery.body, self.rules.limits)
                if heartbeat.site_id != site:
                    raise SchemaError("site_id differs from the sender", "site_id")
                came_back = self.liveness.heard_from(site, now, heartbeat.state.value)
                if came_back:
                    log.info("site %s is up (%s)", site, heartbeat.state.value)
                self._show_site(site)
                return False
            if kind != Kind.EVAL.value:
                raise SchemaError(f"no status message of kind {bounded(kind, 64)!r}", "routing_key")
            report = EvalReport.decode(delivery.body, self.rules.limits)
            if report.site_id != site:
                raise SchemaError("site_id differs from the sender", "site_id")
        except MessageTooLarge as exc:
            return self._reject(delivery, StatusRejection(Reason.OVERSIZED, str(exc)))
        except SchemaError as exc:
            return self._reject(delivery, StatusRejection(Reason.MALFORMED, str(exc)))
        self.liveness.heard_from(site, now)  # even a refused report shows the site is there
        self._show_site(site)
        refusal = check_eval_report(
            report, current_version=self.current_version(), max_num_examples=self.rules.max_num_examples
        )
        if refusal is not None:
            return self._reject(delivery, refusal, model_version=report.model_version)
        self._record_evaluation(report, now)
        return True

    def _reject(
        self, delivery: Delivery, rejection: StatusRejection, *, model_version: int | None = None
    ) -> StatusRejection:
        """Count, audit and dead-letter a refused status message (the audit record and the dead letter go out with
        the next commit)."""
        label, kind, reason = self._site_label(delivery), _kind_label(delivery.routing_key), rejection.reason.value
        self.metrics.status_rejected.labels(site=label, kind=kind, reason=reason).inc()
        digest: Future[str] = self.audit.digest(delivery.body)
        fields = {
            "kind": kind,
            "time": self.clock(),
            "site": site_from_routing_key(delivery.routing_key),
            "user_id": delivery.user_id,
            "sha256": None,
            "bytes": len(delivery.body),
            "outcome": "rejected",
            "reason": reason,
            "detail": bounded(rejection.detail),
            "model_version": self.current_version(),
            "reported_version": model_version,
            "redelivered": delivery.redelivered,
        }
        self.batch.record(fields, digest)
        self.batch.dead_letter(
            delivery,
            {
                REJECT_REASON_HEADER: reason,
                "x-fedmq-detail": bounded(rejection.detail),
                "x-fedmq-user-id": delivery.user_id or "",
            },
        )
        log.warning("rejected %s message from %s: %s (%s)", kind, label, reason, bounded(rejection.detail))
        return rejection

    def heard_from(self, site: str, now: float) -> None:
        """An accepted update counts as contact too."""
        self.liveness.heard_from(site, now)
        self._show_site(site)

    def sweep(self, now: float) -> None:
        """Mark the sites silent for longer than the timeout as down."""
        for site in self.liveness.sweep(now):
            log.warning("site %s is down: silent for more than %.0f s", site, self.liveness.timeout_seconds)
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
            ", ".join(f"{bounded(name, 64)} {value:.3f}" for name, value in sorted(report.metrics.items())),
        )
