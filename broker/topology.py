"""Every RabbitMQ name fedmq uses, in one place.

The federation is a handful of exchanges and queues in one vhost::

    site agent --(site.<id>.update)-------> [fedmq.updates  topic] --> fedmq.coordinator.updates (quorum)
    site agent --(site.<id>.heartbeat|eval)> [fedmq.status   topic] --> fedmq.coordinator.status
    coordinator --(site.all.model)--------> [fedmq.models   topic] --> fedmq.site.<id>.inbox   (keeps newest only)
    coordinator --(site.<id>|all.control)-> [fedmq.control  topic] --> fedmq.site.<id>.control
    coordinator / broker -----------------> [fedmq.dead     topic] --> fedmq.dead-letters

Sites never declare anything: the coordinator (or ``fedmq broker declare``) declares the shared topology, and
provisioning a site declares that site's two queues. Routing keys always have the form ``site.<site_id>.<kind>``;
``all`` is reserved as the broadcast site id.
"""

from __future__ import annotations

import re
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
    COORDINATOR_UPDATES = "fedmq.coordinator.updates"
    COORDINATOR_STATUS = "fedmq.coordinator.status"
    DEAD_LETTERS = "fedmq.dead-letters"


class Kind(str, Enum):
    """The last segment of a routing key: what the message is."""

    UPDATE = "update"
    HEARTBEAT = "heartbeat"
    EVAL = "eval"
    MODEL = "model"
    CONTROL = "control"


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
    QueueSpec(
        Queue.COORDINATOR_UPDATES.value,
        {
            "x-queue-type": "quorum",
            "x-delivery-limit": UPDATE_DELIVERY_LIMIT,
            "x-dead-letter-exchange": Exchange.DEAD_LETTERS.value,
        },
    ),
    QueueSpec(Queue.COORDINATOR_STATUS.value, {"x-queue-type": "quorum"}),
    QueueSpec(Queue.DEAD_LETTERS.value, {"x-queue-type": "quorum"}),
)

SHARED_BINDINGS: tuple[BindingSpec, ...] = (
    BindingSpec(Queue.COORDINATOR_UPDATES.value, Exchange.UPDATES.value, f"site.*.{Kind.UPDATE.value}"),
    BindingSpec(Queue.COORDINATOR_STATUS.value, Exchange.STATUS.value, f"site.*.{Kind.HEARTBEAT.value}"),
    BindingSpec(Queue.COORDINATOR_STATUS.value, Exchange.STATUS.value, f"site.*.{Kind.EVAL.value}"),
    BindingSpec(Queue.DEAD_LETTERS.value, Exchange.DEAD_LETTERS.value, "#"),
)


def site_queues(site_id: str) -> tuple[QueueSpec, ...]:
    """A site's inbox keeps only the newest global model (older ones are dropped from the head)."""
    validate_site_id(site_id)
    return (
        QueueSpec(site_inbox(site_id), {"x-max-length": 1, "x-overflow": "drop-head"}),
        QueueSpec(site_control_queue(site_id), {"x-max-length": 100, "x-overflow": "drop-head"}),
    )


def site_bindings(site_id: str) -> tuple[BindingSpec, ...]:
    validate_site_id(site_id)
    inbox, control = site_inbox(site_id), site_control_queue(site_id)
    return (
        BindingSpec(inbox, Exchange.MODELS.value, routing_key(site_id, Kind.MODEL)),
        BindingSpec(inbox, Exchange.MODELS.value, routing_key(BROADCAST_SITE, Kind.MODEL)),
        BindingSpec(control, Exchange.CONTROL.value, routing_key(site_id, Kind.CONTROL)),
        BindingSpec(control, Exchange.CONTROL.value, routing_key(BROADCAST_SITE, Kind.CONTROL)),
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
    own_keys = rf"^site\.{re.escape(site_id)}\.[a-z]+$"
    return Permissions(
        configure="^$",
        write=rf"^({re.escape(Exchange.UPDATES.value)}|{re.escape(Exchange.STATUS.value)})$",
        read=rf"^fedmq\.site\.{re.escape(site_id)}\.(inbox|control)$",
        topic_write={Exchange.UPDATES.value: own_keys, Exchange.STATUS.value: own_keys},
    )


def coordinator_permissions() -> Permissions:
    """The coordinator declares and owns everything in the vhost."""
    return Permissions(configure="^fedmq\\..*", write="^fedmq\\..*", read="^fedmq\\..*")
