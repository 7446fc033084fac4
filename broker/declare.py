"""Declare the federation's exchanges, queues and bindings over AMQP, from ``broker.topology``.

Declaring is idempotent in AMQP: an exchange or queue that exists with the same arguments is left as it is,
and a binding is a set member. So the coordinator and ``fedmq broker declare`` can both call this on every
start. A queue that exists with *other* arguments is refused by the broker (406 PRECONDITION_FAILED); that
becomes a ``DeclarationError`` naming the queue. Sites never call this: they may not declare anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from broker import topology
from broker.errors import BrokerNotReachable, DeclarationError
from broker.urls import redact_url

PRECONDITION_FAILED = 406
REDECLARE_DOC = '"Re-declaring the update queue"'


def declare_site(channel: BlockingChannel, site_id: str) -> None:
    """One site's inbox (newest global model only) and control queue, bound to their exchanges."""
    for queue in topology.site_queues(site_id):
        channel.queue_declare(queue=queue.name, durable=queue.durable, arguments=queue.arguments)
    for binding in topology.site_bindings(site_id):
        channel.queue_bind(queue=binding.queue, exchange=binding.exchange, routing_key=binding.routing_key)


def declare_topology(channel: BlockingChannel, site_ids: Iterable[str] = ()) -> None:
    """Exchanges, the shared queues and their bindings, then each given site's queues."""
    for exchange in topology.EXCHANGES:
        channel.exchange_declare(exchange=exchange.name, exchange_type=exchange.type, durable=exchange.durable)
    for queue in topology.SHARED_QUEUES:
        channel.queue_declare(queue=queue.name, durable=queue.durable, arguments=queue.arguments)
    for binding in topology.SHARED_BINDINGS:
        channel.queue_bind(queue=binding.queue, exchange=binding.exchange, routing_key=binding.routing_key)
    for site_id in site_ids:
        declare_site(channel, site_id)


@contextmanager
def _channel_at(target: str | pika.ConnectionParameters, doing: str) -> Iterator[BlockingChannel]:
    """A channel on a short-lived connection, with pika's errors turned into ``BrokerError``s naming ``doing``."""
    parameters = pika.URLParameters(target) if isinstance(target, str) else target
    shown = redact_url(target) if isinstance(target, str) else f"{parameters.host}:{parameters.port}"
    try:
        connection = pika.BlockingConnection(parameters)
    except pika.exceptions.AMQPConnectionError as exc:
        raise BrokerNotReachable(f"cannot connect to {shown} to {doing}: {exc!r}") from exc
    try:
        yield connection.channel()
    except pika.exceptions.ChannelClosedByBroker as exc:
        hint = ""
        if exc.reply_code == PRECONDITION_FAILED and "inequivalent arg" in str(exc.reply_text):
            hint = "; a queue declared by an earlier release must be re-declared: docs/DEPLOYMENT.md, " + REDECLARE_DOC
        raise DeclarationError(f"the broker refused to {doing} ({exc.reply_code} {exc.reply_text}){hint}") from exc
    except pika.exceptions.AMQPConnectionError as exc:
        raise BrokerNotReachable(f"lost the connection to {shown} while trying to {doing}: {exc!r}") from exc
    finally:
        if connection.is_open:
            connection.close()


def declare_topology_at(target: str | pika.ConnectionParameters, site_ids: Iterable[str] = ()) -> None:
    """Connect (a URL, or parameters carrying TLS settings) as a user allowed to configure ``fedmq.*``,
    declare everything, disconnect."""
    with _channel_at(target, "declare the topology") as channel:
        declare_topology(channel, site_ids)


def purge_queues_at(target: str | pika.ConnectionParameters, queues: Iterable[str]) -> int:
    """Drop the ready messages of existing queues (a fresh demo run); returns how many were dropped."""
    dropped = 0
    with _channel_at(target, "purge queues") as channel:
        for queue in queues:
            dropped += channel.queue_purge(queue).method.message_count
    return dropped
