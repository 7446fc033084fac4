"""The one seam between federation logic and the broker.

The coordinator and the site agent speak only to ``Transport``: publish (confirmed), consume, ack, poll. The pika
implementation is ``broker.pika_transport``; ``broker.memory`` is an in-process one for unit tests of the logic.
A transport is used from one thread (the I/O thread); handlers run on that thread inside ``poll``.

Errors::

    TransportError                 root
    ├── TransportConnectionError   the connection is gone or could not be opened (reconnect and carry on)
    ├── PublishRefused             the broker refused one message (nack, unroutable, access refused); has reply_code
    ├── ConsumeRefused             the broker refused to deliver a queue: no such queue (404) or no right to read it
    │                              (403); a provisioning problem, not a lost connection; has reply_code and queue
    └── TransportClosed            used after close()
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class TransportError(Exception):
    """Root of transport errors; foreign (pika) exceptions are translated into these at the boundary."""


class TransportConnectionError(TransportError):
    pass


class PublishRefused(TransportError):
    def __init__(self, message: str, reply_code: int | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class ConsumeRefused(TransportError):
    """Consuming a queue was refused: the queue is missing (404 NOT_FOUND) or this login may not read it (403
    ACCESS_REFUSED). It lasts until someone provisions the site again, so retrying at once cannot help."""

    def __init__(self, message: str, *, queue: str, reply_code: int | None = None) -> None:
        super().__init__(message)
        self.queue = queue
        self.reply_code = reply_code


class TransportClosed(TransportError):
    pass


@dataclass(frozen=True)
class Delivery:
    """One received message, as the logic sees it: the body and the properties the broker vouches for."""

    body: bytes
    routing_key: str
    delivery_tag: int
    user_id: str | None = None
    message_id: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    exchange: str = ""


Handler = Callable[[Delivery], None]


class Transport(ABC):
    @abstractmethod
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
        """Publish and return once the broker confirmed it; raise PublishRefused otherwise. ``persistent=False``
        for what the broker need not keep across its own restart (the publisher sends it again).
        ``wait=False`` returns once the message is handed to the connection: the broker's confirm, or its
        refusal, arrives during a later ``poll`` and is logged. Only for messages a later one supersedes."""

    @abstractmethod
    def consume(self, queue: str, handler: Handler, *, prefetch: int = 1) -> None:
        """Deliver the queue's messages to handler (inside ``poll``); the handler must ack each one. Raise
        ConsumeRefused when the queue is missing or this login may not read it."""

    @abstractmethod
    def ack(self, delivery: Delivery) -> None:
        """Tell the broker this delivery is done with; until then it is redelivered after a disconnect."""

    @abstractmethod
    def poll(self, timeout: float) -> None:
        """Do I/O and run handlers for up to ``timeout`` seconds."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection; unacked deliveries return to their queues."""
