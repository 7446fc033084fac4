"""The pika internals ``broker.pika_transport`` relies on are still where pika 1.4 has them.

pyproject pins pika to 1.4.x for these; a new pika fails here, loudly, before it silently makes the transport slow
(socket reads of 4 KiB instead of a frame) or breaks publishing without waiting for confirms.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pika
import pika.channel
from pika.adapters import base_connection, blocking_connection
from pika.adapters.utils import io_services_utils

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def source(function: object) -> str:
    return inspect.getsource(function)  # type: ignore[arg-type]


def test_the_installed_pika_is_the_minor_version_pyproject_pins() -> None:
    # Prepare
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    [pin] = [dependency for dependency in dependencies if re.match(r"pika\b", dependency)]

    # Assert: the pin allows one minor version only, and it is the one installed (the one checked below)
    match = re.fullmatch(r"pika>=(\d+)\.(\d+)\.\d+,<(\d+)\.(\d+)", pin)
    assert match is not None, f"pika must be pinned to one minor version, not {pin!r}"
    low_major, low_minor, high_major, high_minor = map(int, match.groups())
    assert (high_major, high_minor) == (low_major, low_minor + 1), pin
    assert pika.__version__.split(".")[:2] == [str(low_major), str(low_minor)]


def test_a_blocking_connection_keeps_its_stream_transport_where_frame_sized_reads_set_it() -> None:
    """``read_in_frame_sized_chunks`` sets ``connection._impl._transport._MAX_RECV_BYTES``."""
    # Assert: BlockingConnection._impl is the callback connection, whose _transport is the stream transport
    assert "self._impl = " in source(blocking_connection.BlockingConnection.__init__)
    assert "self._transport = transport" in source(base_connection.BaseConnection._proto_connection_made)
    for transport in (io_services_utils._AsyncPlaintextTransport, io_services_utils._AsyncSSLTransport):
        assert issubclass(transport, io_services_utils._AsyncTransportBase)
    # the read size is a class attribute read through ``self`` on every read, so one instance can override it
    assert io_services_utils._AsyncTransportBase._MAX_RECV_BYTES == 4096
    assert "self._MAX_RECV_BYTES" in source(io_services_utils._AsyncTransportBase._consume)


def test_a_blocking_channel_exposes_the_callback_channel_publishing_without_waiting_uses() -> None:
    """``PikaTransport._background_publisher`` confirms and publishes on ``BlockingChannel._impl``."""
    # Assert
    assert "self._impl = channel_impl" in source(blocking_connection.BlockingChannel.__init__)
    assert list(inspect.signature(pika.channel.Channel.confirm_delivery).parameters) == [
        "self",
        "ack_nack_callback",
        "callback",
    ]
    assert list(inspect.signature(pika.channel.Channel.add_on_return_callback).parameters) == ["self", "callback"]
    assert list(inspect.signature(pika.channel.Channel.basic_publish).parameters)[:6] == [
        "self",
        "exchange",
        "routing_key",
        "body",
        "properties",
        "mandatory",
    ]
