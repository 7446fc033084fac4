"""``PikaTransport`` and ``run_reconnecting`` against a real RabbitMQ: what the agent and the coordinator rely on."""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from broker.pika_transport import SOCKET_READ_BYTES, ConnectionSettings, PikaTransport, run_reconnecting
from broker.topology import BROADCAST_SITE, Exchange, Kind, Queue, routing_key, site_inbox, site_update_queue
from broker.transport import ConsumeRefused, Delivery, PublishRefused, TransportConnectionError

if TYPE_CHECKING:
    from tests.integration.conftest import BrokerEnv

SITE = "hospital-a"
NOT_FOUND = 404
PRECONDITION_FAILED = 406
NO_ROUTE = 312
WAIT_SECONDS = 15.0
REFUSED_WINDOW_SECONDS = 5.0


@pytest.fixture
def open_transports() -> Iterator[Callable[[str], PikaTransport]]:
    """``connect(url)`` -> a PikaTransport closed at teardown."""
    transports: list[PikaTransport] = []

    def connect(url: str) -> PikaTransport:
        transport = PikaTransport.connect(ConnectionSettings(url=url, connection_name="fedmq-test"))
        transports.append(transport)
        return transport

    yield connect
    for transport in transports:
        transport.close()


def receive(transport: PikaTransport, queue: str, *, ack: bool) -> list[Delivery]:
    """Consume ``queue`` until one delivery arrives (acking it or not)."""
    received: list[Delivery] = []

    def handler(delivery: Delivery) -> None:
        received.append(delivery)
        if ack:
            transport.ack(delivery)

    transport.consume(queue, handler, prefetch=1)
    poll_until(transport, lambda: bool(received))
    return received


def poll_until(transport: PikaTransport, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, "nothing arrived in time"
        transport.poll(0.1)


def test_confirmed_publish_is_consumed_with_the_senders_identity_and_acked(
    broker_env: BrokerEnv, open_transports: Callable[[str], PikaTransport]
) -> None:
    # Prepare
    site = broker_env.add_site(SITE)
    site_transport = open_transports(site.url)
    coordinator = open_transports(broker_env.coordinator_url)

    # Execute: the site sends an update; the coordinator takes and acks it
    site_transport.publish(
        Exchange.UPDATES.value, routing_key(SITE, Kind.UPDATE), b"delta", user_id=SITE, message_id="update-1"
    )
    received = receive(coordinator, site_update_queue(SITE), ack=True)
    coordinator.close()

    # Assert
    [delivery] = received
    assert (delivery.body, delivery.user_id, delivery.message_id) == (b"delta", SITE, "update-1")
    assert (delivery.exchange, delivery.routing_key, delivery.redelivered) == (
        Exchange.UPDATES.value,
        routing_key(SITE, Kind.UPDATE),
        False,
    )
    assert broker_env.message_count(site_update_queue(SITE)) == 0


def test_bodies_across_frame_boundaries_arrive_byte_for_byte(
    broker_env: BrokerEnv, open_transports: Callable[[str], PikaTransport]
) -> None:
    """The transport reads the socket in frame-sized chunks (not pika's 4 KiB): frames split across reads, bodies
    spanning many frames and several messages in one read must still come out intact and in order."""
    # Prepare: sizes around the 128 KiB frame and a 5 MB update-sized body
    site = broker_env.add_site(SITE)
    site_transport = open_transports(site.url)
    coordinator = open_transports(broker_env.coordinator_url)
    sizes = [
        0,
        1,
        SOCKET_READ_BYTES - 8,
        SOCKET_READ_BYTES,
        SOCKET_READ_BYTES + 1,
        3 * SOCKET_READ_BYTES + 7,
        5_000_000,
    ]
    bodies = [random.Random(size).randbytes(size) for size in sizes]
    for number, body in enumerate(bodies):
        site_transport.publish(
            Exchange.UPDATES.value, routing_key(SITE, Kind.UPDATE), body, user_id=SITE, message_id=str(number)
        )

    # Execute
    received: list[Delivery] = []

    def handler(delivery: Delivery) -> None:
        received.append(delivery)
        coordinator.ack(delivery)

    coordinator.consume(site_update_queue(SITE), handler, prefetch=len(bodies))
    poll_until(coordinator, lambda: len(received) == len(bodies))

    # Assert: intact, in order, and read a frame at a time (the pika internal took the setting)
    assert [delivery.message_id for delivery in received] == [str(number) for number in range(len(bodies))]
    assert [delivery.body for delivery in received] == bodies
    assert coordinator._connection._impl._transport._MAX_RECV_BYTES == SOCKET_READ_BYTES


def test_a_publish_without_waiting_arrives_and_a_refused_one_is_logged_not_raised(
    broker_env: BrokerEnv, open_transports: Callable[[str], PikaTransport], caplog: pytest.LogCaptureFixture
) -> None:
    """How the coordinator publishes models: confirmed in the background, a refusal logged when it arrives."""
    # Prepare
    site = open_transports(broker_env.add_site(SITE).url)
    coordinator = open_transports(broker_env.coordinator_url)

    # Execute: a model for every inbox, and a message no queue is bound for
    coordinator.publish(Exchange.MODELS.value, routing_key(BROADCAST_SITE, Kind.MODEL), b"model v1", wait=False)
    coordinator.publish(Exchange.MODELS.value, "site.nobody.model", b"lost", wait=False)
    with caplog.at_level(logging.WARNING, logger="broker.pika_transport"):
        poll_until(coordinator, lambda: "routed to no queue" in caplog.text)
    [model] = receive(site, site_inbox(SITE), ack=True)

    # Assert: the routed one arrived; the unroutable one was reported; the transport still confirms publishes
    assert model.body == b"model v1"
    assert "fedmq.models/site.nobody.model" in caplog.text
    coordinator.publish(Exchange.MODELS.value, routing_key(BROADCAST_SITE, Kind.MODEL), b"model v2")


def test_unacked_delivery_comes_back_redelivered_after_close(
    broker_env: BrokerEnv, open_transports: Callable[[str], PikaTransport]
) -> None:
    # Prepare
    site = broker_env.add_site(SITE)
    coordinator = open_transports(broker_env.coordinator_url)
    coordinator.publish(Exchange.MODELS.value, routing_key(BROADCAST_SITE, Kind.MODEL), b"model v3")

    # Execute: the site takes the model and drops the connection before acking it
    first_connection = open_transports(site.url)
    [first] = receive(first_connection, site_inbox(SITE), ack=False)
    first_connection.close()
    [again] = receive(open_transports(site.url), site_inbox(SITE), ack=True)

    # Assert
    assert (first.body, first.redelivered) == (b"model v3", False)
    assert (again.body, again.redelivered) == (b"model v3", True)


def test_the_update_queue_counts_each_return_of_an_update_in_its_x_delivery_count_header(
    broker_env: BrokerEnv, open_transports: Callable[[str], PikaTransport]
) -> None:
    # Prepare: the coordinator's fedmq_update_delivery_count_max (and its alert) reads this header of the quorum
    # queue; the queue's delivery limit must not dead-letter an update that came back a few times
    site = broker_env.add_site(SITE)
    open_transports(site.url).publish(Exchange.UPDATES.value, routing_key(SITE, Kind.UPDATE), b"delta", user_id=SITE)

    # Execute: two consumers die holding it, a third acks it
    counts = []
    for ack in (False, False, True):
        transport = open_transports(broker_env.coordinator_url)
        [delivery] = receive(transport, site_update_queue(SITE), ack=ack)
        counts.append(delivery.headers.get("x-delivery-count"))
        transport.close()

    # Assert
    assert counts == [None, 1, 2]
    assert broker_env.message_count(site_update_queue(SITE)) == 0


@pytest.mark.parametrize(
    ("exchange", "key", "user_id", "reply_code"),
    [
        ("fedmq.no-such-exchange", "site.hospital-a.update", None, NOT_FOUND),
        (Exchange.UPDATES.value, "site.hospital-a.update", "hospital-b", PRECONDITION_FAILED),
        (Exchange.MODELS.value, "site.nobody.model", None, NO_ROUTE),
    ],
    ids=["missing-exchange", "wrong-user-id", "unroutable"],
)
def test_refused_publish_raises_with_the_reply_code_and_the_transport_stays_usable(
    broker_env: BrokerEnv,
    open_transports: Callable[[str], PikaTransport],
    exchange: str,
    key: str,
    user_id: str | None,
    reply_code: int,
) -> None:
    # Prepare: the coordinator is consuming (a refused publish must not cost it its consumer)
    broker_env.add_site(SITE)
    coordinator = open_transports(broker_env.coordinator_url)
    received: list[Delivery] = []
    coordinator.consume(Queue.COORDINATOR_STATUS.value, lambda delivery: received.append(delivery), prefetch=5)

    # Execute
    with pytest.raises(PublishRefused) as refused:
        coordinator.publish(exchange, key, b"refused", user_id=user_id)
    coordinator.publish(Exchange.STATUS.value, routing_key(SITE, Kind.HEARTBEAT), b"still works")
    poll_until(coordinator, lambda: bool(received))

    # Assert
    assert refused.value.reply_code == reply_code
    assert [delivery.body for delivery in received] == [b"still works"]


def test_run_reconnecting_survives_the_broker_closing_the_connection(broker_env: BrokerEnv) -> None:
    # Prepare: a session that consumes the site's inbox until told to stop, run on its own thread
    site = broker_env.add_site(SITE)
    settings = ConnectionSettings(url=site.url, connection_name="fedmq-test-reconnecting")
    stop = threading.Event()
    sessions: list[int] = []
    received: list[bytes] = []

    def session(transport: PikaTransport) -> str:
        sessions.append(len(sessions) + 1)

        def handler(delivery: Delivery) -> None:
            received.append(delivery.body)
            transport.ack(delivery)

        transport.consume(site_inbox(SITE), handler)
        while not stop.is_set():
            transport.poll(0.1)
        return "finished"

    results: list[str | None] = []
    runner = threading.Thread(
        target=lambda: results.append(run_reconnecting(settings, session, should_stop=stop.is_set, max_wait_seconds=1))
    )
    runner.start()
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not sessions:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        # Execute: the broker closes the site's connection, then a model is published
        broker_env.close_connections(SITE)
        deadline = time.monotonic() + WAIT_SECONDS
        while len(sessions) < 2:
            assert time.monotonic() < deadline, "no new session after the connection was closed"
            time.sleep(0.05)
        coordinator = PikaTransport.connect(ConnectionSettings(url=broker_env.coordinator_url))
        try:
            coordinator.publish(Exchange.MODELS.value, routing_key(BROADCAST_SITE, Kind.MODEL), b"model v1")
        finally:
            coordinator.close()
        deadline = time.monotonic() + WAIT_SECONDS
        while not received:
            assert time.monotonic() < deadline, "the reconnected session received nothing"
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join(timeout=WAIT_SECONDS)

    # Assert
    assert sessions == [1, 2]
    assert received == [b"model v1"]
    assert results == ["finished"] and not runner.is_alive()


def test_consuming_a_deleted_queue_is_refused_as_such_and_not_as_a_publish(
    broker_env: BrokerEnv, open_transports: Callable[[str], PikaTransport]
) -> None:
    # Prepare: the site's inbox was deleted (by an operator, or a remove-site half done)
    site = broker_env.add_site(SITE)
    broker_env.management.delete_queue(broker_env.vhost, site_inbox(SITE))
    transport = open_transports(site.url)

    # Execute
    with pytest.raises(ConsumeRefused) as refused:
        transport.consume(site_inbox(SITE), lambda delivery: None)

    # Assert
    assert not isinstance(refused.value, PublishRefused)
    assert (refused.value.queue, refused.value.reply_code) == (site_inbox(SITE), NOT_FOUND)


def test_a_session_refused_at_once_is_retried_a_handful_of_times_not_thousands(broker_env: BrokerEnv) -> None:
    """The connect succeeds and the session fails within milliseconds (its queue is gone): without one backoff
    around the whole session this reconnected in a loop, hundreds of sessions a second against the broker."""
    # Prepare: a site whose inbox was deleted, run as the site agent runs (a refused consume is waited out)
    site = broker_env.add_site(SITE)
    broker_env.management.delete_queue(broker_env.vhost, site_inbox(SITE))
    settings = ConnectionSettings(url=site.url, connection_name="fedmq-test-refused")
    stop = threading.Event()
    sessions: list[float] = []

    def session(transport: PikaTransport) -> None:
        sessions.append(time.monotonic())
        transport.consume(site_inbox(SITE), lambda delivery: None)
        while not stop.is_set():
            transport.poll(0.1)

    runner = threading.Thread(
        target=run_reconnecting,
        args=(settings, session),
        kwargs={
            "should_stop": stop.is_set,
            "max_wait_seconds": 30,
            "retry_on": (TransportConnectionError, ConsumeRefused),
        },
    )

    # Execute
    runner.start()
    time.sleep(REFUSED_WINDOW_SECONDS)
    stop.set()
    runner.join(timeout=WAIT_SECONDS)

    # Assert: a handful of sessions, each wait no shorter than the minimum, and a prompt exit when told to stop
    assert 2 <= len(sessions) <= 12, f"{len(sessions)} sessions in {REFUSED_WINDOW_SECONDS:.0f} s"
    assert all(later - earlier >= 0.15 for earlier, later in itertools.pairwise(sessions))
    assert not runner.is_alive()
