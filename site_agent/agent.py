"""The site agent: take the newest global model, evaluate it, train on local data, send the delta. Repeat.

Two threads. The I/O thread owns the broker connection (``Transport``): it receives models and control
messages, acks them at once (a delivery is never held while training: RabbitMQ would close a channel that holds
one past its consumer timeout), and publishes what the worker produced. The worker thread evaluates and trains;
it never touches the connection. Whatever the worker finished waits in the outbox until the broker confirmed it,
so a dropped connection loses no finished training: the update is re-sent with the same ``update_id`` and the
coordinator drops it if it had already applied it.

A message the broker refuses stays in the outbox too, retried with capped, jittered backoff (``RefusalBackoff``),
the messages behind it waiting in order. Most refusals pass: a nack while a queue has no leader or the broker is
short of memory, no route while the coordinator declares the topology again. Those it retries for as long as they
last. A refusal that no retry can mend (access refused: the site was removed or lost its permissions; a user id the
broker will not accept) stops the agent after ``PERMANENT_REFUSAL_ATTEMPTS`` tries, with a message that says what
the operator must do (``failure``), instead of retrying unseen for ever.

Models are ordered by ``GlobalModel.identity``, (coordinator incarnation, version): a model from a newer incarnation
is taken even when its version is lower (a coordinator restored from an older backup), and work based on a model
of a superseded incarnation at a version above the one the new incarnation resumed from (``_void``) is dropped,
since the restored coordinator never had that model.

Only ``schemas`` messages leave the site: model deltas, training metrics and evaluation metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from tenacity import RetryCallState, Retrying, wait_random_exponential

from broker.topology import Exchange, Kind, routing_key, site_control_queue, site_inbox
from broker.transport import Delivery, PublishRefused, Transport
from fedmq import __version__
from schemas import (
    Control,
    ControlCommand,
    EvalReport,
    GlobalModel,
    Heartbeat,
    Message,
    ModelUpdate,
    SchemaError,
    SiteState,
    TrainingMetrics,
)
from site_agent.attacks import Attack
from site_agent.signatures import SiteSigning
from tasks.base import SiteData, Task, architecture_digest

MessageT = TypeVar("MessageT", bound=Message)

log = logging.getLogger(__name__)


# Refusals no retry can mend: 403 ACCESS_REFUSED (the site was removed or lost its write permission), 406
# PRECONDITION_FAILED (a user id the broker will not take, a message over its size limit), 530 NOT_ALLOWED. The
# others pass: a nack (no reply code: a queue without a leader, a memory or disk alarm), 312 NO_ROUTE and 404
# NOT_FOUND (the coordinator is declaring the topology again).
PERMANENT_REFUSAL_CODES = frozenset({403, 406, 530})
PERMANENT_REFUSAL_ATTEMPTS = 3  # a few tries first: an operator may be re-provisioning the site right now
REFUSAL_MIN_WAIT_SECONDS = 0.5


def is_permanent(refusal: PublishRefused) -> bool:
    return refusal.reply_code in PERMANENT_REFUSAL_CODES


class RefusalBackoff:
    """How long to wait before the ``attempt``-th retry of a refused message: tenacity's jittered exponential
    backoff, from half a second up to ``max_wait_seconds``. The agent's loop never sleeps on it; it only keeps
    the message until then."""

    def __init__(self, max_wait_seconds: float) -> None:
        self._wait = wait_random_exponential(
            multiplier=REFUSAL_MIN_WAIT_SECONDS,
            min=min(REFUSAL_MIN_WAIT_SECONDS, max_wait_seconds),
            max=max_wait_seconds,
        )

    def __call__(self, attempt: int) -> float:
        state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
        state.attempt_number = attempt
        return float(self._wait(state))


Job = tuple[str, Callable[[], Message]]  # what it is ("evaluation", "training"), the work
JobResult = tuple[str, Message | Exception]


def run_jobs(jobs: list[Job]) -> list[JobResult]:
    """Run one turn's jobs in order on the worker. A failed job is reported with its exception instead of its
    message, so the jobs after it still run (a task's bug or diverged training must not kill the agent)."""
    results: list[JobResult] = []
    for kind, job in jobs:
        try:
            results.append((kind, job()))
        except Exception as exc:
            results.append((kind, exc))
    return results


@dataclass(frozen=True)
class Outgoing:
    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    description: str
    based_on: tuple[int, int]  # the identity (incarnation, version) of the model it evaluated or trained on


class UpdateCounter:
    """The per-site ``seq``, strictly increasing across restarts: persisted before each use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last = json.loads(path.read_text())["last_seq"] if path.exists() else 0

    def next(self) -> int:
        self.last += 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"last_seq": self.last}))
        os.replace(temporary, self.path)
        return self.last


class LocalTrainer:
    """Evaluation and training on this site's data. Runs on the worker thread; knows nothing of the broker."""

    def __init__(
        self,
        site_id: str,
        task: Task,
        data: SiteData,
        *,
        seed: int = 0,
        slowdown: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.site_id = site_id
        self.clock = clock
        self.task = task
        self.data = data
        self.seed = seed
        self.slowdown = slowdown
        self.sleep = sleep
        self.model = task.build_model()
        self.architecture = architecture_digest(self.model)
        # torch's optimisers import torch._dynamo on first use (2 s or more on a busy machine): pay that here, not
        # inside the first timed training, where the slowdown factor would multiply it.
        torch.optim.SGD(self.model.parameters(), lr=0.0)

    def refusal(self, model: GlobalModel) -> str | None:
        """Why this site cannot use ``model`` (another task or architecture), or None."""
        if model.fingerprint.task != self.task.name or model.fingerprint.architecture != self.architecture:
            return (
                f"model v{model.version} is for task {model.fingerprint.task!r} "
                f"(architecture {model.fingerprint.architecture[:12]}), this site runs {self.task.name!r} "
                f"(architecture {self.architecture[:12]})"
            )
        return None

    def _load(self, model: GlobalModel) -> None:
        self.model.load_state_dict({name: tensor.clone() for name, tensor in model.tensors.items()})

    def evaluate(self, model: GlobalModel) -> EvalReport:
        self._load(model)
        metrics = self.task.evaluate(self.model, self.data)
        metrics.pop("num_examples", None)
        return EvalReport(
            site_id=self.site_id, model_version=model.version, num_examples=self.data.num_test, metrics=metrics
        )

    def train(self, model: GlobalModel, seq: int, compression_note: str = "") -> ModelUpdate:
        started = self.clock()
        self._load(model)
        digest = hashlib.sha256(f"{self.seed}:{self.site_id}:{seq}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        result = self.task.train(self.model, self.data, model.training, generator)
        local = self.model.state_dict()
        delta = {name: (local[name].detach() - base).contiguous() for name, base in model.tensors.items()}
        busy = self.clock() - started
        if self.slowdown > 1.0:
            self.sleep(busy * (self.slowdown - 1.0))
        return ModelUpdate(
            update_id=ModelUpdate.new_id(),
            site_id=self.site_id,
            seq=seq,
            base_version=model.version,
            num_examples=result.num_examples,
            delta=delta,
            metrics=TrainingMetrics(loss=result.loss, steps=result.steps, seconds=self.clock() - started),
        )


class SiteAgent:
    """The I/O-thread side: receive, decide what the worker does next, publish results. One instance per site."""

    def __init__(
        self,
        trainer: LocalTrainer,
        counter: UpdateCounter,
        *,
        heartbeat_seconds: float = 5.0,
        compression: str = "none",
        retry_max_wait_seconds: float = 30.0,
        signing: SiteSigning | None = None,
        clock: Callable[[], float] = time.monotonic,
        attack: Attack | None = None,
    ) -> None:
        self.trainer = trainer
        self.attack = attack  # a test and demo facility (site_agent.attacks): forge what the coordinator cannot check
        self._attack_generator = torch.Generator().manual_seed(trainer.seed)
        self.site_id = trainer.site_id
        self.counter = counter
        self.heartbeat_seconds = heartbeat_seconds
        self.compression = compression
        self.signing = signing  # None: nothing is signed or checked (unit tests, unsigned deployments)
        self.refused_messages = 0  # models and controls refused for their signature, reported in each heartbeat
        self.clock = clock
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"train-{self.site_id}")
        self.outbox: deque[Outgoing] = deque()
        self.refusal_backoff = RefusalBackoff(retry_max_wait_seconds)
        self.refusals = 0  # of the outbox's first message, in a row
        self.retry_at = float("-inf")  # when the outbox's first message may be published again
        self.latest: GlobalModel | None = None
        self.resumed_version = 0  # the first version this site saw of the latest model's incarnation
        self.ignored_incarnations: set[int] = set()
        self.evaluated: tuple[int, int] | None = None  # identities (incarnation, version) of models
        self.trained: tuple[int, int] | None = None
        self.job: Future[list[JobResult]] | None = None
        self.job_kind = ""
        self.job_model: tuple[int, int] = (0, 0)
        self.job_started = 0.0
        self.last_job_seconds = 0.0
        self.idle_since = clock()
        self.paused = False
        self.stopped = False
        self.stop_reason = ""
        self.failure = ""  # why the agent stopped on its own (a refusal no retry can mend); empty otherwise
        self.last_heartbeat = float("-inf")
        self.updates_sent = 0
        self.transport: Transport | None = None

    # ------------------------------------------------------------------------------------------------ broker
    def attach(self, transport: Transport) -> None:
        self.transport = transport
        transport.consume(site_inbox(self.site_id), self.on_model, prefetch=1)
        transport.consume(site_control_queue(self.site_id), self.on_control, prefetch=10)
        self.last_heartbeat = float("-inf")

    def _decode_and_ack(self, delivery: Delivery, kind: type[MessageT], what: str) -> MessageT | None:
        """Decode one delivery and ack it at once, whether it decoded or not (a bad one is logged and dropped)."""
        assert self.transport is not None
        try:
            message: MessageT | None = kind.decode(delivery.body)
        except SchemaError as exc:
            log.error("ignored an undecodable %s: %s", what, exc)
            message = None
        self.transport.ack(delivery)
        refusal = self.signing.refusal(message) if self.signing is not None and message is not None else None
        if refusal:
            self.refused_messages += 1
            kept = f"keeping model v{self.latest.version}" if self.latest is not None else "no model kept yet"
            log.error("refused a %s: %s (not from the coordinator?); %s", what, refusal, kept)
            return None
        return message

    def on_model(self, delivery: Delivery) -> None:
        """Decode, keep as the newest model, ack. Training happens later, on the worker."""
        model = self._decode_and_ack(delivery, GlobalModel, "global model")
        if model is None:
            return
        refusal = self.trainer.refusal(model)
        if refusal:
            log.error("refusing model: %s", refusal)
            return
        held = self.latest
        if held is None or model.incarnation == held.incarnation:
            if held is None or model.version >= held.version:
                if held is None:
                    self.resumed_version = model.version
                self.latest = model
                log.info("model v%d received", model.version)
        elif model.incarnation > held.incarnation:
            self._follow_new_incarnation(model, held)
        elif model.incarnation not in self.ignored_incarnations:
            self.ignored_incarnations.add(model.incarnation)
            log.warning(
                "ignoring model v%d of coordinator incarnation %d: this site follows incarnation %d, which started "
                "later (is an old coordinator still running, or was the coordinator's clock set back?)",
                model.version,
                model.incarnation,
                held.incarnation,
            )

    def _follow_new_incarnation(self, model: GlobalModel, held: GlobalModel) -> None:
        """A coordinator that started after the one this site followed: it restarted, or was restored from a
        backup (then its version may be lower). Work on the old incarnation's models above the version it resumed
        from is based on a model the new one never had: dropped, so the next update is based on its model."""
        self.latest, self.resumed_version = model, model.version
        kept = [outgoing for outgoing in self.outbox if not self._void(outgoing.based_on)]
        dropped = len(self.outbox) - len(kept)
        if dropped:
            self.outbox = deque(kept)
            self.refusals, self.retry_at = 0, float("-inf")
        log.info(
            "model v%d received from a new coordinator incarnation %d (it restarted%s; this site held v%d of "
            "incarnation %d)%s",
            model.version,
            model.incarnation,
            " or was restored from an older backup" if model.version < held.version else "",
            held.version,
            held.incarnation,
            f"; dropped {dropped} unsent message(s) based on versions above v{model.version}" if dropped else "",
        )

    def _void(self, based_on: tuple[int, int]) -> bool:
        """Whether work based on the model ``based_on`` is worthless to the coordinator now followed: that model is
        of an older incarnation and newer than the version the current incarnation resumed from, so the current
        coordinator never had it (the one it was restored from made it after the backup). At or below that version
        the old incarnation's models are the restored coordinator's own (one history, cut at the backup)."""
        if self.latest is None:
            return False
        incarnation, version = based_on
        return incarnation < self.latest.incarnation and version > self.resumed_version

    def on_control(self, delivery: Delivery) -> None:
        control = self._decode_and_ack(delivery, Control, "control message")
        if control is None:
            return
        log.info("control: %s (%s)", control.command.value, control.reason or "no reason given")
        if control.command is ControlCommand.STOP:
            self.stopped, self.stop_reason = True, control.reason
        elif control.command is ControlCommand.PAUSE:
            self.paused = True
        elif control.command is ControlCommand.RESUME:
            self.paused = False

    # ----------------------------------------------------------------------------------------------- the loop
    def step(self) -> None:
        """One turn of the I/O loop: collect the worker's result, start the next job, publish, heartbeat."""
        self._collect()
        self._schedule()
        self._flush_outbox()
        self._heartbeat()

    def _collect(self) -> None:
        if self.job is None or not self.job.done():
            return
        job = self.job
        self.job = None
        self.last_job_seconds = self.clock() - self.job_started
        self.idle_since = self.clock()
        version = self.job_model[1]
        for kind, outcome in job.result():
            if isinstance(outcome, Exception):
                log.error("%s of v%d failed: %s", kind, version, outcome)
                # not retried on the same version (a broken task would fail again, every turn)
                if kind == "training":
                    self.trained = self.job_model
                else:
                    self.evaluated = self.job_model
            elif self._void(self.job_model):
                log.info(
                    "dropped the %s of v%d: a newer coordinator incarnation resumed from v%d and never had it",
                    kind,
                    version,
                    self.resumed_version,
                )
            elif isinstance(outcome, EvalReport):
                self._queue_evaluation(outcome)
            elif isinstance(outcome, ModelUpdate):
                forged = (
                    [outcome]
                    if self.attack is None
                    else self.attack.apply(outcome, self.counter.next, self._attack_generator)
                )
                for update in forged:
                    self._queue_update(update)

    def _queue_evaluation(self, report: EvalReport) -> None:
        self.evaluated = self.job_model
        log.info(
            "evaluation of v%d: %s",
            report.model_version,
            ", ".join(f"{name} {value:.3f}" for name, value in sorted(report.metrics.items())),
        )
        self.outbox.append(
            Outgoing(
                Exchange.STATUS.value,
                routing_key(self.site_id, Kind.EVAL),
                report.encode(),
                f"eval-{report.model_version}",
                f"evaluation of v{report.model_version}",
                self.job_model,
            )
        )

    def _queue_update(self, update: ModelUpdate) -> None:
        self.trained = self.job_model
        log.info(
            "trained %d steps on v%d in %.2f s (loss %.4f)",
            update.metrics.steps,
            update.base_version,
            update.metrics.seconds,
            update.metrics.loss,
        )
        self.outbox.append(
            Outgoing(
                Exchange.UPDATES.value,
                routing_key(self.site_id, Kind.UPDATE),
                update.encode(self.compression),
                update.update_id,
                f"update seq {update.seq} on v{update.base_version}",
                self.job_model,
            )
        )

    def _schedule(self) -> None:
        """Evaluate a new model, then train on it, as one job: the worker goes straight from one to the other
        instead of waiting for the I/O loop's next turn in between (a fast site sends twice as many updates)."""
        if self.job is not None or self.latest is None or self.paused or self.stopped:
            return
        model = self.latest
        jobs: list[Job] = []
        if model.identity != self.evaluated:
            jobs.append(("evaluation", lambda: self.trainer.evaluate(model)))
        retrain = model.training.train_on_same_version and self.clock() - self.idle_since >= max(
            self.last_job_seconds, 0.05
        )
        if model.identity != self.trained or retrain:
            seq = self.counter.next()
            jobs.append(("training", lambda: self._signed(self.trainer.train(model, seq))))
        if jobs:
            self.job_kind = " and ".join(kind for kind, _ in jobs)
            self.job_model = model.identity
            self.job_started = self.clock()
            self.job = self.executor.submit(run_jobs, jobs)

    def _signed(self, update: ModelUpdate) -> ModelUpdate:
        """On the worker: the update's signature over what the coordinator will decode."""
        return self.signing.sign_update(update, self.compression) if self.signing is not None else update

    def _flush_outbox(self) -> None:
        """Publish the outbox in order. A message leaves it only once the broker confirmed it; a refused one stays
        first, and the loop goes on (models, heartbeats) until its retry is due."""
        assert self.transport is not None
        while self.outbox and not self.failure and self.clock() >= self.retry_at:
            outgoing = self.outbox[0]
            try:
                self.transport.publish(
                    outgoing.exchange,
                    outgoing.routing_key,
                    outgoing.body,
                    user_id=self.site_id,
                    message_id=outgoing.message_id,
                )
            except PublishRefused as exc:
                self._refused(outgoing, exc)
                return
            if outgoing.exchange == Exchange.UPDATES.value:
                self.updates_sent += 1
            log.info("%s sent%s", outgoing.description, f" after {self.refusals} refusal(s)" if self.refusals else "")
            self.outbox.popleft()
            self.refusals, self.retry_at = 0, float("-inf")

    def _refused(self, outgoing: Outgoing, refusal: PublishRefused) -> None:
        self.refusals += 1
        if is_permanent(refusal) and self.refusals >= PERMANENT_REFUSAL_ATTEMPTS:
            self.failure = (
                f"the broker refused {outgoing.description} {self.refusals} times ({refusal}, reply code "
                f"{refusal.reply_code}): no retry can mend that; check that site {self.site_id!r} is still "
                f"provisioned with its permissions (fedmq broker add-site) and that its config file's login is the "
                f"site id, then start the agent again; {len(self.outbox)} finished message(s) were not sent"
            )
            self.stopped, self.stop_reason = True, self.failure
            log.error("stopping: %s", self.failure)
            return
        wait = self.refusal_backoff(self.refusals)
        self.retry_at = self.clock() + wait
        log.warning(
            "broker refused %s (%s%s); keeping it, retry %d in %.1f s",
            outgoing.description,
            refusal,
            f", reply code {refusal.reply_code}" if refusal.reply_code is not None else "",
            self.refusals,
            wait,
        )

    def state(self) -> SiteState:
        if self.paused:
            return SiteState.PAUSED
        if self.job is not None:
            return SiteState.TRAINING if "training" in self.job_kind else SiteState.EVALUATING
        return SiteState.IDLE

    def _heartbeat(self) -> None:
        assert self.transport is not None
        if self.clock() - self.last_heartbeat < self.heartbeat_seconds:
            return
        heartbeat = Heartbeat(
            site_id=self.site_id,
            state=self.state(),
            agent_version=__version__,
            refused_messages=self.refused_messages,
        )
        try:
            self.transport.publish(
                Exchange.STATUS.value,
                routing_key(self.site_id, Kind.HEARTBEAT),
                heartbeat.encode(),
                user_id=self.site_id,
            )
        except PublishRefused as exc:
            log.error("broker refused a heartbeat: %s", exc)
        self.last_heartbeat = self.clock()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.outbox:
            log.warning(
                "closing with %d finished message(s) the broker has not confirmed: %s",
                len(self.outbox),
                ", ".join(outgoing.description for outgoing in self.outbox),
            )
