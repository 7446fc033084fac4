"""The broker itself enforces each hospital's identity: what a site may publish, read and declare.

These talk to RabbitMQ with pika's BlockingConnection directly: they test the broker's rules (users,
permissions, topic permissions, user_id validation), not fedmq's transport.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from broker import topology
from broker.topology import Exchange, Kind, Queue, routing_key, site_inbox, site_update_queue

if TYPE_CHECKING:
    from tests.integration.conftest import BrokerEnv

ACCESS_REFUSED = 403
PRECONDITION_FAILED = 406


def confirmed_channel(env: BrokerEnv, url: str) -> BlockingChannel:
    channel = env.connect(url).channel()
    channel.confirm_delivery()
    return channel


def publish(channel: BlockingChannel, exchange: str, key: str, body: bytes, *, user_id: str | None = None) -> None:
    channel.basic_publish(
        exchange=exchange,
        routing_key=key,
        body=body,
        properties=pika.BasicProperties(user_id=user_id, delivery_mode=pika.DeliveryMode.Persistent),
        mandatory=True,
    )


def test_guest_user_does_not_exist_and_cannot_log_in(broker_env: BrokerEnv) -> None:
    # Prepare
    guest_url = broker_env.amqp_url("guest", "guest")

    # Execute / Assert
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(guest_url))
    assert "guest" not in {user["name"] for user in broker_env.management.list_users()}


def test_site_publishes_its_own_update_and_reads_its_own_inbox(broker_env: BrokerEnv) -> None:
    # Prepare
    site = broker_env.add_site("hospital-a")
    site_channel = confirmed_channel(broker_env, site.url)
    coordinator_channel = confirmed_channel(broker_env, broker_env.coordinator_url)

    # Execute: the site sends an update; the coordinator broadcasts two models
    publish(
        site_channel, Exchange.UPDATES.value, routing_key("hospital-a", Kind.UPDATE), b"delta", user_id="hospital-a"
    )
    publish(
        site_channel, Exchange.STATUS.value, routing_key("hospital-a", Kind.HEARTBEAT), b"alive", user_id="hospital-a"
    )
    publish(coordinator_channel, Exchange.MODELS.value, routing_key(topology.BROADCAST_SITE, Kind.MODEL), b"model v1")
    publish(coordinator_channel, Exchange.MODELS.value, routing_key("hospital-a", Kind.MODEL), b"model v2")

    # Assert: the coordinator receives the update stamped with the site's verified identity ...
    method, properties, body = coordinator_channel.basic_get(site_update_queue("hospital-a"), auto_ack=True)
    assert method is not None
    assert (body, properties.user_id, method.routing_key) == (b"delta", "hospital-a", "site.hospital-a.update")
    assert broker_env.message_count(Queue.COORDINATOR_STATUS.value) == 1
    # ... and the site's inbox holds only the newest model, which the site may read
    method, _, body = site_channel.basic_get(site_inbox("hospital-a"), auto_ack=True)
    assert body == b"model v2"
    assert site_channel.basic_get(site_inbox("hospital-a"), auto_ack=True)[0] is None


def _publish_with_other_sites_key(channel: BlockingChannel) -> None:
    publish(channel, Exchange.UPDATES.value, routing_key("hospital-b", Kind.UPDATE), b"x", user_id="hospital-a")


def _publish_with_trailing_newline_key(channel: BlockingChannel) -> None:
    # "$" would let this key through (it matches before a final newline); "\\z" does not
    key = routing_key("hospital-a", Kind.UPDATE) + "\n"
    publish(channel, Exchange.UPDATES.value, key, b"x", user_id="hospital-a")


def _publish_as_other_site(channel: BlockingChannel) -> None:
    publish(channel, Exchange.UPDATES.value, routing_key("hospital-a", Kind.UPDATE), b"x", user_id="hospital-b")


def _publish_other_sites_heartbeat(channel: BlockingChannel) -> None:
    publish(channel, Exchange.STATUS.value, routing_key("hospital-b", Kind.HEARTBEAT), b"x", user_id="hospital-a")


def _publish_global_model(channel: BlockingChannel) -> None:
    publish(
        channel, Exchange.MODELS.value, routing_key(topology.BROADCAST_SITE, Kind.MODEL), b"x", user_id="hospital-a"
    )


def _publish_control(channel: BlockingChannel) -> None:
    publish(channel, Exchange.CONTROL.value, routing_key("hospital-b", Kind.CONTROL), b"stop", user_id="hospital-a")


def _consume_other_sites_inbox(channel: BlockingChannel) -> None:
    channel.basic_consume(site_inbox("hospital-b"), lambda *_: None)


def _consume_coordinator_queue(channel: BlockingChannel) -> None:
    channel.basic_consume(site_update_queue("hospital-b"), lambda *_: None)


def _consume_own_update_queue(channel: BlockingChannel) -> None:
    channel.basic_consume(site_update_queue("hospital-a"), lambda *_: None)


def _get_from_dead_letters(channel: BlockingChannel) -> None:
    channel.basic_get(Queue.DEAD_LETTERS.value)


def _declare_queue(channel: BlockingChannel) -> None:
    channel.queue_declare("fedmq.site.hospital-a.sneaky", durable=True)


def _delete_own_inbox(channel: BlockingChannel) -> None:
    channel.queue_delete(site_inbox("hospital-a"))


def _bind_own_inbox_to_updates(channel: BlockingChannel) -> None:
    channel.queue_bind(site_inbox("hospital-a"), Exchange.UPDATES.value, "site.*.update")


@pytest.mark.parametrize(
    ("action", "reply_code"),
    [
        (_publish_with_other_sites_key, ACCESS_REFUSED),
        (_publish_as_other_site, PRECONDITION_FAILED),
        (_publish_other_sites_heartbeat, ACCESS_REFUSED),
        (_publish_global_model, ACCESS_REFUSED),
        (_publish_control, ACCESS_REFUSED),
        (_consume_other_sites_inbox, ACCESS_REFUSED),
        (_consume_coordinator_queue, ACCESS_REFUSED),
        (_consume_own_update_queue, ACCESS_REFUSED),
        (_publish_with_trailing_newline_key, ACCESS_REFUSED),
        (_get_from_dead_letters, ACCESS_REFUSED),
        (_declare_queue, ACCESS_REFUSED),
        (_delete_own_inbox, ACCESS_REFUSED),
        (_bind_own_inbox_to_updates, ACCESS_REFUSED),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else str(value),
)
def test_broker_refuses_what_a_site_may_not_do(
    broker_env: BrokerEnv, action: Callable[[BlockingChannel], None], reply_code: int
) -> None:
    # Prepare
    site = broker_env.add_site("hospital-a")
    broker_env.add_site("hospital-b")
    channel = confirmed_channel(broker_env, site.url)

    # Execute
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refusal:
        action(channel)

    # Assert: refused with the expected AMQP code, and nothing reached or changed the federation's queues
    assert refusal.value.reply_code == reply_code
    for queue in (
        site_update_queue("hospital-a"),
        site_update_queue("hospital-b"),
        Queue.COORDINATOR_STATUS.value,
        site_inbox("hospital-a"),
        site_inbox("hospital-b"),
    ):
        assert broker_env.message_count(queue) == 0
    assert {binding["destination"] for binding in _bindings_of(broker_env, Exchange.UPDATES.value)} == {
        site_update_queue("hospital-a"),
        site_update_queue("hospital-b"),
    }


def _bindings_of(env: BrokerEnv, exchange: str) -> list[dict[str, str]]:
    path = f"exchanges/{env.vhost}/{exchange}/bindings/source"
    bindings: list[dict[str, str]] = env.management.request("GET", path)
    return bindings


@pytest.mark.parametrize(
    ("who", "exchange", "key"),
    [
        ("site", Exchange.UPDATES.value, "site.hospital-a.unknownkind"),
        ("coordinator", Exchange.MODELS.value, routing_key("no-such-site", Kind.MODEL)),
    ],
)
def test_publish_that_routes_nowhere_is_detected(broker_env: BrokerEnv, who: str, exchange: str, key: str) -> None:
    # Prepare
    site = broker_env.add_site("hospital-a")
    url = site.url if who == "site" else broker_env.coordinator_url
    channel = confirmed_channel(broker_env, url)
    user_id = "hospital-a" if who == "site" else None

    # Execute / Assert
    with pytest.raises(pika.exceptions.UnroutableError):
        publish(channel, exchange, key, b"lost?", user_id=user_id)


def test_what_a_site_can_observe_of_other_queues_by_passive_declare(broker_env: BrokerEnv) -> None:
    """RabbitMQ checks no permission for a passive queue.declare (vhost access is enough): a site that knows or
    guesses a queue's name learns whether it exists and its message and consumer counts, never a message.
    docs/DEPLOYMENT.md says so; this test keeps that statement true against the real broker."""
    # Prepare: hospital-b has two updates waiting
    site_a = broker_env.add_site("hospital-a")
    site_b = broker_env.add_site("hospital-b")
    b_channel = confirmed_channel(broker_env, site_b.url)
    for _ in range(2):
        publish(b_channel, Exchange.UPDATES.value, routing_key("hospital-b", Kind.UPDATE), b"x", user_id="hospital-b")
    a_channel = broker_env.connect(site_a.url).channel()

    # Execute
    frame = a_channel.queue_declare(site_update_queue("hospital-b"), passive=True)

    # Assert: counts only; reading the queue is refused
    assert (frame.method.message_count, frame.method.consumer_count) == (2, 0)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refusal:
        a_channel.basic_get(site_update_queue("hospital-b"))
    assert refusal.value.reply_code == ACCESS_REFUSED
