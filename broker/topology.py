r"""Every RabbitMQ name fedmq uses, in one place.

The federation is a handful of exchanges and queues in one vhost::

    site agent --(site.<id>.update)-------> [fedmq.updates  topic] --> fedmq.updates.<id>  (quorum, one per site)
    site agent --(site.<id>.heartbeat|eval)> [fedmq.status   topic] --> fedmq.coordinator.status
    coordinator --(site.all.model)--------> [fedmq.models   topic] --> fedmq.site.<id>.inbox   (keeps newest only)
    coordinator --(site.<id>|all.control)-> [fedmq.control  topic] --> fedmq.site.<id>.control
    coordinator / broker -----------------> [fedmq.dead     topic] --> fedmq.dead-letters

Sites never declare anything: the coordinator (or ``fedmq broker declare``) declares the shared topology, and
provisioning a site declares that site's three queues. Routing keys always have the form ``site.<site_id>.<kind>``;
``all`` is reserved as the broadcast site id.

Flood control: every site has its own update queue, ``fedmq.updates.<id>``, bound by that site's routing key and
bounded to ``SITE_UPDATE_QUEUE_LENGTH`` messages (and ``SITE_UPDATE_QUEUE_BYTES``) with ``x-overflow =
reject-publish``. The coordinator consumes every site's queue with its own small prefetch, so the broker hands it
the sites' updates side by side instead of in one first-come line: a site that queues a thousand updates waits
behind its own backlog only, and an honest update that arrives after the flood is handled at once, not after it.
What does not fit is refused at the broker: the publisher's confirm is a nack (``PublishRefused`` at the agent),
which means "try later", and nothing is dropped without its sender knowing. We chose this over one shared queue
because RabbitMQ has no per-publisher bound inside a queue (a queue length limit on a shared queue lets one site
fill it and refuse everybody else; per-user limits in 3.10 count connections and channels, not messages). The
cost is one queue per site, created and deleted with the site by provisioning. Acks stay per delivery after the
group commit, so the coordinator's guarantees (ack only what is durable, count nothing twice) are unchanged.

The dead-letter queue is bounded too (``DEAD_LETTER_MAX_LENGTH`` messages, ``DEAD_LETTER_MAX_BYTES``) and drops
from the head: it keeps the newest rejections for an operator to inspect; the audit log keeps every rejection's
reason and digest for ever.

Permission regexes end in ``\z``, not ``$``: in RabbitMQ's (PCRE) regexes ``$`` also matches before a final
newline, so ``site.a.update\n`` would pass ``^site\.a\.[a-z]+$``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from broker.errors import BrokerError

VHOST = "fedmq"
COORDINATOR_USER = "fedmq-coordinator"
BROADCAST_SITE = "all"

# A site id becomes part of user names, queue names and routing keys, so keep it to a safe alphabet.
SITE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
RESERVED_SITE_IDS = frozenset({BROADCAST_SITE, COORDINATOR_USER, "guest", "admin"})


class Exchange(str, Enum):
    UPDATES = "fedmq.updates"
    MODELS = "fedmq.models"
    STATUS = "fedmq.status"
    CONTROL = "fedmq.control"
    DEAD_LETTERS = "fedmq.dead"


class Queue(str, Enum):
    COORDINATOR_STATUS = "fedmq.coordinator.status"
    DEAD_LETTERS = "fedmq.dead-letters"


class Kind(str, Enum):
    """The last segment of a routing key: what the message is."""

    UPDATE = "update"
    HEARTBEAT = "heartbeat"
    EVAL = "eval"
    MODEL = "model"
    CONTROL = "control"


# Flood control: the updates one site may have waiting at the broker; beyond this its publishes are nacked. An
# honest agent has one or two updates in flight; a model of 256 MiB still fits a few times into the byte bound.
SITE_UPDATE_QUEUE_LENGTH = 8
SITE_UPDATE_QUEUE_BYTES = 2 * 1024**3
# The dead-letter queue keeps the newest rejections only (drop-head): for inspection, not an archive.
DEAD_LETTER_MAX_LENGTH = 10_000
DEAD_LETTER_MAX_BYTES = 1024**3
# How often the update queue may return one update to the queue (a consumer died holding it) before RabbitMQ
# dead-letters it itself: in effect never. The coordinator's handler guard turns an update it fails on into an
# audited, dead-lettered ``internal-error`` rejection, so a broker-side limit only ever counted crashes of the
# coordinator holding valid updates: with a limit of 5, eight kills of a crash-looping coordinator dead-lettered 86
# confirmed updates with no audit record. The value is explicit, never RabbitMQ's default, because the default
# differs between versions (none in 3.x, 20 in 4.x, where -1 means none but 3.x refuses -1); a million returns is
# beyond any restart loop (years of Docker's one-a-minute backoff; systemd's start limit stops far sooner).
# What this gives up: a message that kills the process outright (not an exception: the guard catches those) comes
# back after every restart. That is visible instead of silent: the coordinator exports the highest
# ``x-delivery-count`` it has seen (``fedmq_update_delivery_count_max``) and FedmqUpdateReturnedRepeatedly fires;
# the operator moves the message aside (docs/DEPLOYMENT.md, "A message that crashes the coordinator").
# A queue declared with other arguments (the earlier limit of 5) must be re-declared, see docs/DEPLOYMENT.md,
# "Re-declaring the update queue": RabbitMQ refuses to change a queue's arguments (406 PRECONDITION_FAILED).
UPDATE_DELIVERY_LIMIT = 1_000_000
# Header carrying the reason a message was dead-lettered by the coordinator.
REJECT_REASON_HEADER = "x-fedmq-reject-reason"


class TopologyError(BrokerError, ValueError):
    """A name that cannot be used in the topology (for example an invalid site id)."""


def validate_site_id(site_id: str) -> str:
    if not SITE_ID_PATTERN.match(site_id) or site_id in RESERVED_SITE_IDS:
        raise TopologyError(
            f"invalid site id {site_id!r}: use 1-63 lowercase letters, digits and '-', "
            f"not one of {sorted(RESERVED_SITE_IDS)}"
        )
    return site_id


def routing_key(site_id: str, kind: Kind) -> str:
    return f"site.{site_id}.{kind.value}"


def site_inbox(site_id: str) -> str:
    """The queue holding only the newest global model for one site."""
    return f"fedmq.site.{site_id}.inbox"


def site_control_queue(site_id: str) -> str:
    return f"fedmq.site.{site_id}.control"


def site_update_queue(site_id: str) -> str:
    """The queue holding one site's updates for the coordinator (bounded: flood control)."""
    return f"fedmq.updates.{site_id}"


def site_update_queues(site_ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(site_update_queue(validate_site_id(site_id)) for site_id in sorted(set(site_ids)))


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: str = "topic"
    durable: bool = True


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    durable: bool = True


@dataclass(frozen=True)
class BindingSpec:
    queue: str
    exchange: str
    routing_key: str


EXCHANGES: tuple[ExchangeSpec, ...] = tuple(ExchangeSpec(exchange.value) for exchange in Exchange)

SHARED_QUEUES: tuple[QueueSpec, ...] = (
    QueueSpec(Queue.COORDINATOR_STATUS.value, {"x-queue-type": "quorum"}),
    QueueSpec(
        Queue.DEAD_LETTERS.value,
        {
            "x-queue-type": "quorum",
            "x-max-length": DEAD_LETTER_MAX_LENGTH,
            "x-max-length-bytes": DEAD_LETTER_MAX_BYTES,
            "x-overflow": "drop-head",
        },
    ),
)

SHARED_BINDINGS: tuple[BindingSpec, ...] = (
    BindingSpec(Queue.COORDINATOR_STATUS.value, Exchange.STATUS.value, f"site.*.{Kind.HEARTBEAT.value}"),
    BindingSpec(Queue.COORDINATOR_STATUS.value, Exchange.STATUS.value, f"site.*.{Kind.EVAL.value}"),
    BindingSpec(Queue.DEAD_LETTERS.value, Exchange.DEAD_LETTERS.value, "#"),
)


def site_queues(site_id: str) -> tuple[QueueSpec, ...]:
    """A site's inbox keeps only the newest global model (older ones are dropped from the head); its update queue
    refuses what does not fit (the publisher is told: a nack), so a flood stays at the flooding site."""
    validate_site_id(site_id)
    return (
        QueueSpec(site_inbox(site_id), {"x-max-length": 1, "x-overflow": "drop-head"}),
        QueueSpec(site_control_queue(site_id), {"x-max-length": 100, "x-overflow": "drop-head"}),
        QueueSpec(
            site_update_queue(site_id),
            {
                "x-queue-type": "quorum",
                "x-delivery-limit": UPDATE_DELIVERY_LIMIT,
                "x-dead-letter-exchange": Exchange.DEAD_LETTERS.value,
                "x-max-length": SITE_UPDATE_QUEUE_LENGTH,
                "x-max-length-bytes": SITE_UPDATE_QUEUE_BYTES,
                "x-overflow": "reject-publish",
            },
        ),
    )


def site_bindings(site_id: str) -> tuple[BindingSpec, ...]:
    validate_site_id(site_id)
    inbox, control = site_inbox(site_id), site_control_queue(site_id)
    return (
        BindingSpec(inbox, Exchange.MODELS.value, routing_key(site_id, Kind.MODEL)),
        BindingSpec(inbox, Exchange.MODELS.value, routing_key(BROADCAST_SITE, Kind.MODEL)),
        BindingSpec(control, Exchange.CONTROL.value, routing_key(site_id, Kind.CONTROL)),
        BindingSpec(control, Exchange.CONTROL.value, routing_key(BROADCAST_SITE, Kind.CONTROL)),
        BindingSpec(site_update_queue(site_id), Exchange.UPDATES.value, routing_key(site_id, Kind.UPDATE)),
    )


@dataclass(frozen=True)
class Permissions:
    """RabbitMQ vhost permissions (configure, write, read regexes) plus topic write rules per exchange."""

    configure: str
    write: str
    read: str
    topic_write: dict[str, str] = field(default_factory=dict)


def site_permissions(site_id: str) -> Permissions:
    """A site may publish only to the update and status exchanges, only with its own routing keys,
    and read only its own inbox and control queue. It can declare nothing."""
    validate_site_id(site_id)
    own_keys = rf"^site\.{re.escape(site_id)}\.[a-z]+\z"
    return Permissions(
        configure=r"^\z",
        write=rf"^({re.escape(Exchange.UPDATES.value)}|{re.escape(Exchange.STATUS.value)})\z",
        read=rf"^fedmq\.site\.{re.escape(site_id)}\.(inbox|control)\z",
        topic_write={Exchange.UPDATES.value: own_keys, Exchange.STATUS.value: own_keys},
    )


def coordinator_permissions() -> Permissions:
    """The coordinator declares and owns everything in the vhost."""
    return Permissions(configure="^fedmq\\..*", write="^fedmq\\..*", read="^fedmq\\..*")
