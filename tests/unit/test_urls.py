"""One way to show a broker URL without its password, used by the CLI, the declarer and the transport's logs."""

from __future__ import annotations

import pytest

from broker.pika_transport import ConnectionSettings
from broker.provisioning import amqp_url
from broker.urls import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            amqp_url("hospital-a", "s3cr@t:/pw", "127.0.0.1", 5672, "fedmq"),
            "amqp://hospital-a:****@127.0.0.1:5672/fedmq",
        ),
        (amqp_url("fedmq-admin", "pw", "::1", 5672, "/"), "amqp://fedmq-admin:****@[::1]:5672/%2F"),
        ("amqps://mq.example.org:5671/fedmq", "amqps://mq.example.org:5671/fedmq"),
        ("amqp://guest@localhost/", "amqp://guest@localhost/"),
    ],
    ids=["password-with-separators", "ipv6", "certificate-login", "user-only"],
)
def test_a_url_is_shown_with_everything_but_its_password(url: str, shown: str) -> None:
    # Execute / Assert: the helper and the transport's log form agree
    assert redact_url(url) == shown
    assert ConnectionSettings(url).safe_url() == shown
