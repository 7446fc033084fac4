"""An in-process broker and ``Transport`` for unit tests of the federation logic (no RabbitMQ needed).

It keeps the rules the logic relies on: topic routing with ``*`` and ``#``, the topology's bindings, an inbox
that keeps only the newest message, a full ``reject-publish`` queue (a site's update queue) refusing the publish
as RabbitMQ's nack does, user_id checked against the login, unroutable publishes refused, and
unacked deliveries returned to their queue when a transport closes. It does not model permissions: those are
RabbitMQ's job and are tested against the real broker.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker import topology
from broker.transport import ConsumeRefused, Delivery, Handler, PublishRefused, Transport, TransportClosed


def topic_matches(pattern: str, key: str) -> bool:
    regex = "^" + re.escape(pattern).replace(r"\*", r"[^.]+").replace(r"\#", r".*") + "$"
    return re.match(regex, key) is not None


@dataclass
class _Queue:
    name: str
    max_length: int | None = None
    reject_when_full: bool = False
    messages: deque[Delivery] = field(default_factory=deque)


def _queue_of(spec: topology.QueueSpec) -> _Queue:
    max_length = spec.arguments.get("x-max-length")
    return _Queue(spec.name, max_length, reject_when_full=spec.arguments.get("x-overflow") == "reject-publish")


class MemoryBroker:
    def __init__(self) -> None:
        self.queues: dict[str, _Queue] = {}
        self.bindings: list[topology.BindingSpec] = []
        self._tags = itertools.count(1)

    def declare(self, site_ids: Iterable[str] = ()) -> None:
        for spec in topology.SHARED_QUEUES:
            self.queues.setdefault(spec.name, _queue_of(spec))
        self.bindings.extend(topology.SHARED_BINDINGS)
        for site_id in site_ids:
            for spec in topology.site_queues(site_id):
                self.queues.setdefault(spec.name, _queue_of(spec))
            self.bindings.extend(topology.site_bindings(site_id))

    def route(self, exchange: str, routing_key: str, delivery: Delivery) -> tuple[int, int]:
        """Into every bound queue that has room: (queues bound, queues that refused it because they were full)."""
        targets = {
            binding.queue
            for binding in self.bindings
            if binding.exchange == exchange and topic_matches(binding.routing_key, routing_key)
        }
        refused = 0
        for name in targets:
            queue = self.queues[name]
            if queue.reject_when_full and queue.max_length is not None and len(queue.messages) >= queue.max_length:
                refused += 1
                continue
            queue.messages.append(delivery)
            if queue.max_length is not None:
                while len(queue.messages) > queue.max_length:
                    queue.messages.popleft()
        return len(targets), refused

    def queued_updates(self) -> list[Delivery]:
        """The updates waiting in every site's update queue, site by site."""
        return [
            delivery
            for name, queue in sorted(self.queues.items())
            if name.startswith(topology.site_update_queue(""))
            for delivery in queue.messages
        ]

    def next_tag(self) -> int:
        return next(self._tags)

    def connect(self, login: str) -> MemoryTransport:
        return MemoryTransport(self, login)


class MemoryTransport(Transport):
    def __init__(self, broker: MemoryBroker, login: str) -> None:
        self.broker = broker
        self.login = login
        self.consumers: list[tuple[str, Handler, int]] = []
        self.unacked: dict[int, tuple[str, Delivery]] = {}
        self.published: list[tuple[str, str, bytes, Mapping[str, Any]]] = []
        self.closed = False

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        user_id: str | None = None,
        message_id: str | None = None,
        persistent: bool = True,
        wait: bool = True,
    ) -> None:
        # ``persistent`` changes nothing here (this broker never restarts), nor ``wait`` (it routes at once).
        if self.closed:
            raise TransportClosed("transport is closed")
        if user_id is not None and user_id != self.login:
            raise PublishRefused(f"user_id {user_id!r} is not the login {self.login!r}", 406)
        delivery = Delivery(
            body=bytes(body),
            routing_key=routing_key,
            delivery_tag=0,
            user_id=user_id,
            message_id=message_id,
            headers=dict(headers or {}),
            exchange=exchange,
        )
        self.published.append((exchange, routing_key, bytes(body), dict(headers or {})))
        bound, refused = self.broker.route(exchange, routing_key, delivery)
        if bound == 0:
            raise PublishRefused(f"message to {exchange}/{routing_key} routed to no queue", 312)
        if refused:
            raise PublishRefused(f"broker nacked message to {exchange}/{routing_key} (queue full)")

    def consume(self, queue: str, handler: Handler, *, prefetch: int = 1) -> None:
        if queue not in self.broker.queues:
            raise ConsumeRefused(f"no queue {queue!r}", queue=queue, reply_code=404)
        self.consumers.append((queue, handler, prefetch))

    def ack(self, delivery: Delivery) -> None:
        self.unacked.pop(delivery.delivery_tag, None)

    def poll(self, timeout: float = 0.0) -> None:
        """Deliver everything deliverable now (respecting prefetch); never sleeps."""
        if self.closed:
            raise TransportClosed("transport is closed")
        progress = True
        while progress:
            progress = False
            for queue_name, handler, prefetch in self.consumers:
                in_flight = sum(1 for name, _ in self.unacked.values() if name == queue_name)
                messages = self.broker.queues[queue_name].messages
                if messages and in_flight < prefetch:
                    original = messages.popleft()
                    tag = self.broker.next_tag()
                    delivery = Delivery(
                        body=original.body,
                        routing_key=original.routing_key,
                        delivery_tag=tag,
                        user_id=original.user_id,
                        message_id=original.message_id,
                        headers=original.headers,
                        redelivered=original.redelivered,
                        exchange=original.exchange,
                    )
                    self.unacked[tag] = (queue_name, delivery)
                    handler(delivery)
                    progress = True

    def close(self) -> None:
        """Like a dropped connection: unacked deliveries go back to the head of their queues."""
        for queue_name, delivery in reversed(list(self.unacked.values())):
            returned = Delivery(**{**delivery.__dict__, "redelivered": True})
            self.broker.queues[queue_name].messages.appendleft(returned)
        self.unacked.clear()
        self.closed = True
