"""Storage errors are not connection errors: a handler's failed write leaves the transport's poll and the reconnecting
wrapper as it was raised, so the coordinator stops instead of reconnecting with state that is not durable.

No broker: a stand-in for pika's BlockingConnection delivers one message to the handler, as ``process_data_events``
does, or fails the way its socket would.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pika
import pytest

from broker.pika_transport import ConnectionSettings, PikaTransport, run_reconnecting
from broker.transport import Delivery, TransportConnectionError
from coordinator.errors import StorageError
from coordinator.storage import DiskSpace, make_directory, storage_writes


class OneMessageConnection:
    """Delivers one message to whoever consumes, inside ``process_data_events``; or raises ``socket_error``."""

    def __init__(self, socket_error: BaseException | None = None) -> None:
        self.socket_error = socket_error
        self.callback: Callable[..., None] | None = None
        self.is_open = True

    def channel(self) -> Any:
        def basic_consume(queue: str, callback: Callable[..., None]) -> None:
            self.callback = callback

        return SimpleNamespace(is_open=True, basic_qos=lambda prefetch_count: None, basic_consume=basic_consume)

    def process_data_events(self, time_limit: float) -> None:
        if self.socket_error is not None:
            raise self.socket_error
        assert self.callback is not None
        method = SimpleNamespace(routing_key="site.a.update", delivery_tag=1, redelivered=False, exchange="x")
        properties = SimpleNamespace(user_id="a", message_id=None, headers=None)
        self.callback(None, method, properties, b"update")

    def close(self) -> None:
        self.is_open = False


def transport_with(connection: OneMessageConnection) -> PikaTransport:
    return PikaTransport(cast(pika.BlockingConnection, connection))


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), StorageError("could not write the checkpoint")],
    ids=["OSError", "StorageError"],
)
def test_an_exception_of_the_handler_leaves_poll_untranslated(error: Exception) -> None:
    # Prepare: a handler whose disk write fails
    transport = transport_with(OneMessageConnection())

    def handler(delivery: Delivery) -> None:
        raise error

    transport.consume("fedmq.coordinator.updates", handler)

    # Execute / Assert: the very exception, not a TransportConnectionError to reconnect on
    with pytest.raises(type(error)) as raised:
        transport.poll(0.1)
    assert raised.value is error
    assert not isinstance(raised.value, TransportConnectionError)


def test_an_oserror_of_the_socket_is_still_a_lost_connection() -> None:
    transport = transport_with(OneMessageConnection(socket_error=ConnectionResetError(104, "reset by peer")))
    transport.consume("fedmq.coordinator.updates", lambda delivery: None)

    with pytest.raises(TransportConnectionError, match="reset by peer"):
        transport.poll(0.1)


def test_the_reconnecting_wrapper_does_not_retry_a_storage_error() -> None:
    # Prepare: a session whose commit fails on the disk
    sessions: list[int] = []

    def session(transport: PikaTransport) -> None:
        sessions.append(1)
        raise StorageError("could not write the checkpoint: [Errno 28] No space left on device")

    # Execute / Assert: one session, then the error leaves the wrapper (the process exits; systemd restarts it)
    with pytest.raises(StorageError):
        run_reconnecting(
            ConnectionSettings(url="amqp://127.0.0.1:1/fedmq"),
            session,
            should_stop=lambda: False,
            connect=lambda settings: transport_with(OneMessageConnection()),
        )
    assert sessions == [1]


def test_a_failed_write_is_a_storage_error_naming_what_was_written() -> None:
    with (
        pytest.raises(StorageError, match=r"the audit log: .*Read-only file system") as raised,
        storage_writes("the audit log"),
    ):
        raise OSError(errno.EROFS, "Read-only file system")
    assert isinstance(raised.value.__cause__, OSError) and not isinstance(raised.value, OSError)


def test_directories_created_for_the_state_are_made_durable_in_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)

    # Execute
    make_directory(tmp_path / "state" / "checkpoint" / "tensors")

    # Assert: each new directory's entry, parent first
    assert synced == [str(tmp_path), str(tmp_path / "state"), str(tmp_path / "state" / "checkpoint")]


def test_a_commit_may_start_only_with_its_bytes_and_the_reserve_free(tmp_path: Path) -> None:
    space = DiskSpace(tmp_path, reserve_bytes=1000, free=lambda path: 5000)

    assert space.shortfall(4000) == 0
    assert space.shortfall(4500) == 500
    assert space.free_now() == 5000
