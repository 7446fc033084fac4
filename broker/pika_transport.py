"""The pika implementation of ``Transport``, and the reconnecting wrapper (capped, jittered backoff) around whoever
uses it.

One BlockingConnection, owned by one thread, with up to three channels: one consumes, one publishes with publisher
confirms and waits for them, and one publishes with confirms it does not wait for (``wait=False``: they arrive
while the connection is polled, and a refusal is logged). A refused publish closes only its publishing channel,
which is reopened on the next publish, so a consumer keeps its deliveries. pika exceptions never leave this
module: they become ``TransportError``s.

An exception raised by a consumer's handler is the handler's, not the connection's: it leaves ``poll`` as it was
raised, never translated. (``OSError`` is in the list of connection errors because pika's sockets raise it; a
handler's failed disk write is an ``OSError`` too, and taking it for a lost connection would reconnect in the same
process and carry on with state that is not durable.)
"""

from __future__ import annotations

import copy
import logging
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pika
import pika.channel
import pika.exceptions
import pika.frame
from pika.adapters.blocking_connection import BlockingChannel
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential
from tenacity.wait import wait_base

from broker.transport import (
    ConsumeRefused,
    Delivery,
    Handler,
    PublishRefused,
    Transport,
    TransportClosed,
    TransportConnectionError,
    TransportError,
)
from broker.urls import redact_url

log = logging.getLogger(__name__)

PERSISTENT = pika.DeliveryMode.Persistent
TRANSIENT = pika.DeliveryMode.Transient
SOCKET_READ_BYTES = 128 * 1024  # one AMQP frame at RabbitMQ's default frame_max


@dataclass(frozen=True)
class ConnectionSettings:
    """Where and how to connect: an amqp(s) URL, plus certificate paths for TLS with client certificates."""

    url: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    heartbeat_seconds: int = 30
    connection_name: str = "fedmq"
    blocked_connection_timeout: float = 300.0

    @property
    def uses_tls(self) -> bool:
        return self.url.startswith("amqps://")

    def safe_url(self) -> str:
        """The URL without its password, for logs."""
        return redact_url(self.url)

    def parameters(self) -> pika.URLParameters:
        params = pika.URLParameters(self.url)
        params.heartbeat = self.heartbeat_seconds
        params.blocked_connection_timeout = self.blocked_connection_timeout
        params.client_properties = {"connection_name": self.connection_name}
        if self.uses_tls:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
            params.ssl_options = pika.SSLOptions(context, params.host)
            # pika fills in guest/guest when the URL has no user, so ask the URL itself: no user + a client
            # certificate means the certificate is the login (the broker takes the user from its CN).
            if self.cert_file and not urllib.parse.urlsplit(self.url).username:
                params.credentials = pika.credentials.ExternalCredentials()
        return params


def read_in_frame_sized_chunks(connection: pika.BlockingConnection) -> None:
    """Make this connection read the socket a frame at a time instead of pika 1.4's 4 KiB.

    pika 1.4 appends every read to an immutable bytes buffer until a whole frame is there, so a 128 KiB frame read
    4 KiB at a time is copied about 16 times over: receiving one 4 MB update costs ~60 MB of copying and most of a
    consumer's CPU (fixed upstream by pika PR #1653, not yet in a stable release). Frame-sized reads make a bare
    consumer of 1M-parameter updates about 3x faster (``fedmq bench throughput``, column "raw, frame reads").

    Relies on pika 1.4 internals (``BlockingConnection._impl._transport._MAX_RECV_BYTES``), hence the pin to pika
    1.4.x and ``tests/unit/test_pika_internals.py``; if they moved anyway, the connection works at pika's speed and
    says so in the log.
    """
    stream = getattr(getattr(connection, "_impl", None), "_transport", None)
    if stream is None or not hasattr(stream, "_MAX_RECV_BYTES"):
        log.warning("pika %s has no _MAX_RECV_BYTES where 1.4 has it: reading 4 KiB at a time", pika.__version__)
        return
    stream._MAX_RECV_BYTES = SOCKET_READ_BYTES


_CONNECTION_ERRORS = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionClosed,
    pika.exceptions.StreamLostError,
    pika.exceptions.ChannelWrongStateError,
    ConnectionError,
    OSError,
)


class _HandlerFailed(Exception):
    """Carries a handler's exception out through pika, past the connection-error translation in ``poll``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


class PikaTransport(Transport):
    def __init__(self, connection: pika.BlockingConnection) -> None:
        self._connection = connection
        self._consume_channel: BlockingChannel | None = None
        self._publish_channel: BlockingChannel | None = None
        self._background_channel: BlockingChannel | None = None
        self._closed = False

    @classmethod
    def connect(cls, settings: ConnectionSettings) -> PikaTransport:
        try:
            connection = pika.BlockingConnection(settings.parameters())
        except pika.exceptions.ProbableAuthenticationError as exc:
            raise TransportConnectionError(f"login refused by {settings.safe_url()}: {exc}") from exc
        except _CONNECTION_ERRORS as exc:
            raise TransportConnectionError(f"cannot connect to {settings.safe_url()}: {exc!r}") from exc
        read_in_frame_sized_chunks(connection)
        return cls(connection)

    # -- channels
    def _publisher(self) -> BlockingChannel:
        if self._closed:
            raise TransportClosed("transport is closed")
        if self._publish_channel is None or not self._publish_channel.is_open:
            self._publish_channel = self._connection.channel()
            self._publish_channel.confirm_delivery()
        return self._publish_channel

    def _background_publisher(self) -> pika.channel.Channel:
        """A confirming channel that does not wait: the callback-style channel pika keeps under a blocking one
        (``_impl``, a pika 1.4 internal checked by ``tests/unit/test_pika_internals.py``), whose confirms and
        returns arrive as callbacks while the connection is polled."""
        if self._closed:
            raise TransportClosed("transport is closed")
        if self._background_channel is None or not self._background_channel.is_open:
            self._background_channel = self._connection.channel()
            self._background_channel._impl.confirm_delivery(_log_refusal)
            self._background_channel._impl.add_on_return_callback(_log_return)
        return self._background_channel._impl

    def _consumer(self) -> BlockingChannel:
        if self._closed:
            raise TransportClosed("transport is closed")
        if self._consume_channel is None or not self._consume_channel.is_open:
            self._consume_channel = self._connection.channel()
        return self._consume_channel

    # -- Transport
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
        properties = pika.BasicProperties(
            delivery_mode=PERSISTENT if persistent else TRANSIENT,
            headers=dict(headers) if headers else None,
            user_id=user_id,
            message_id=message_id,
            content_type="application/msgpack",
        )
        if not wait:
            try:
                self._background_publisher().basic_publish(exchange, routing_key, body, properties, mandatory=True)
            except _CONNECTION_ERRORS as exc:
                raise TransportConnectionError(f"connection lost while publishing: {exc!r}") from exc
            return
        try:
            self._publisher().basic_publish(exchange, routing_key, body, properties, mandatory=True)
        except pika.exceptions.UnroutableError as exc:
            raise PublishRefused(f"message to {exchange}/{routing_key} routed to no queue", 312) from exc
        except pika.exceptions.NackError as exc:
            raise PublishRefused(f"broker nacked message to {exchange}/{routing_key}") from exc
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._publish_channel = None
            raise PublishRefused(
                f"broker refused publish to {exchange}/{routing_key}: {exc.reply_text}", exc.reply_code
            ) from exc
        except _CONNECTION_ERRORS as exc:
            raise TransportConnectionError(f"connection lost while publishing: {exc!r}") from exc

    def consume(self, queue: str, handler: Handler, *, prefetch: int = 1) -> None:
        def on_message(
            channel: BlockingChannel,
            method: pika.spec.Basic.Deliver,
            properties: pika.BasicProperties,
            body: bytes,
        ) -> None:
            delivery = Delivery(
                body=body,
                routing_key=method.routing_key,
                delivery_tag=method.delivery_tag,
                user_id=properties.user_id,
                message_id=properties.message_id,
                headers=properties.headers or {},
                redelivered=bool(method.redelivered),
                exchange=method.exchange,
            )
            try:
                handler(delivery)
            except Exception as exc:
                raise _HandlerFailed(exc) from exc

        try:
            channel = self._consumer()
            channel.basic_qos(prefetch_count=prefetch)
            channel.basic_consume(queue, on_message)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._consume_channel = None
            raise ConsumeRefused(
                f"broker refused consuming {queue}: {exc.reply_text}", queue=queue, reply_code=exc.reply_code
            ) from exc
        except _CONNECTION_ERRORS as exc:
            raise TransportConnectionError(f"connection lost while subscribing to {queue}: {exc!r}") from exc

    def ack(self, delivery: Delivery) -> None:
        try:
            self._consumer().basic_ack(delivery.delivery_tag)
        except _CONNECTION_ERRORS as exc:
            raise TransportConnectionError(f"connection lost before ack: {exc!r}") from exc

    def poll(self, timeout: float) -> None:
        if self._closed:
            raise TransportClosed("transport is closed")
        try:
            self._connection.process_data_events(time_limit=timeout)
        except _HandlerFailed as failed:
            raise failed.error from None  # its own traceback still shows where the handler raised it
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise TransportConnectionError(f"broker closed the channel: {exc.reply_text}") from exc
        except _CONNECTION_ERRORS as exc:
            raise TransportConnectionError(f"connection lost: {exc!r}") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._connection.is_open:
                self._connection.close()
        except Exception as exc:  # closing a dead connection: nothing left to clean up
            log.debug("ignoring error while closing connection: %r", exc)


def _log_refusal(frame: pika.frame.Method) -> None:
    """A ``wait=False`` publish the broker nacked (it acks all the others)."""
    if isinstance(frame.method, pika.spec.Basic.Nack):
        log.warning(
            "the broker refused a message published without waiting (delivery tag %s)", frame.method.delivery_tag
        )


def _log_return(
    channel: pika.channel.Channel, method: pika.spec.Basic.Return, properties: pika.BasicProperties, body: bytes
) -> None:
    """A ``wait=False`` publish that no queue took."""
    log.warning("message to %s/%s routed to no queue (%s)", method.exchange, method.routing_key, method.reply_text)


ResultT = TypeVar("ResultT")

HEALTHY_SESSION_SECONDS = 10.0  # a session that lasted this long had a working connection: start the backoff afresh
RECONNECT_MIN_WAIT_SECONDS = 0.2  # even the first retry waits a little: a refusal repeats at once otherwise
STOP_CHECK_SECONDS = 0.1


class SessionBackoff(wait_base):
    """A tenacity wait: capped, jittered exponential backoff over the sessions that failed in a row.

    A session that ran at least ``healthy_after_seconds`` was a working connection that dropped, so the count
    starts again and the next connect comes quickly. One that failed at once (a deleted queue, a refused login:
    the connect succeeds and the session dies in milliseconds) makes each next wait longer, up to the cap, instead
    of opening thousands of connections a second.
    """

    def __init__(
        self,
        *,
        max_wait_seconds: float,
        healthy_after_seconds: float = HEALTHY_SESSION_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._jittered = wait_random_exponential(
            multiplier=0.5, min=min(RECONNECT_MIN_WAIT_SECONDS, max_wait_seconds), max=max_wait_seconds
        )
        self._healthy_after_seconds = healthy_after_seconds
        self._clock = clock
        self._started = clock()
        self.failures_in_a_row = 0

    def session_started(self) -> None:
        self._started = self._clock()

    def __call__(self, retry_state: RetryCallState) -> float:
        ran_for = self._clock() - self._started
        self.failures_in_a_row = 1 if ran_for >= self._healthy_after_seconds else self.failures_in_a_row + 1
        counted = copy.copy(retry_state)
        counted.attempt_number = self.failures_in_a_row
        return float(self._jittered(counted))


def _sleep_unless_stopped(should_stop: Callable[[], bool]) -> Callable[[float], None]:
    """A sleep that ends early when ``should_stop`` turns true, so SIGTERM is not kept waiting for a backoff."""

    def sleep(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not should_stop() and (remaining := deadline - time.monotonic()) > 0:
            time.sleep(min(STOP_CHECK_SECONDS, remaining))

    return sleep


def _log_reconnect(retry_state: RetryCallState) -> None:
    error = retry_state.outcome.exception() if retry_state.outcome is not None else None
    wait = retry_state.next_action.sleep if retry_state.next_action is not None else 0.0
    log.warning("connection to the broker lost (%s); reconnecting in %.1f s", error, wait)


def run_reconnecting(
    settings: ConnectionSettings,
    session: Callable[[PikaTransport], ResultT],
    *,
    should_stop: Callable[[], bool],
    max_wait_seconds: float = 30.0,
    retry_on: tuple[type[TransportError], ...] = (TransportConnectionError,),
    healthy_after_seconds: float = HEALTHY_SESSION_SECONDS,
    connect: Callable[[ConnectionSettings], PikaTransport] = PikaTransport.connect,
) -> ResultT | None:
    """Connect and run ``session``; when either ends in one of ``retry_on``, wait and do both again.

    ``session`` returns when its work is finished; a ``TransportConnectionError`` from it or from the connect means
    "connection lost or not there yet". Anything else (a coordinator's ``StorageError`` above all) ends the retrying
    and leaves this function: it is no reason to reconnect. A site also passes ``ConsumeRefused`` (its queue is not
    provisioned yet, or was deleted): it waits for an operator rather than exit. One ``SessionBackoff`` spans
    connect and session, so a session that fails at once is retried ever more slowly, not in a loop. Unacked
    deliveries return to their queues when a connection dies, so the next session sees them again. None when
    stopped before finishing.
    """
    backoff = SessionBackoff(max_wait_seconds=max_wait_seconds, healthy_after_seconds=healthy_after_seconds)

    def one_session() -> ResultT | None:
        if should_stop():  # told to stop during the last wait
            return None
        backoff.session_started()
        transport = connect(settings)
        log.info("connected to %s", settings.safe_url())
        try:
            return session(transport)
        finally:
            transport.close()

    retrying = Retrying(
        retry=retry_if_exception_type(retry_on),
        wait=backoff,
        stop=lambda _retry_state: should_stop(),
        sleep=_sleep_unless_stopped(should_stop),
        before_sleep=_log_reconnect,
        reraise=True,
    )
    try:
        return retrying(one_session)
    except retry_on:
        if should_stop():
            return None
        raise
