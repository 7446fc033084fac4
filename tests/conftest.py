"""Shared by both test tiers: the ``integration`` mark and free TCP ports.

Everything under tests/integration is marked ``integration`` here, so ``pytest -m "not integration"`` runs the
tests that need no broker.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

INTEGRATION_DIR = Path(__file__).parent / "integration"
# rabbitmqctl listens on these for its own Erlang distribution; a node must not take them.
RABBITMQCTL_PORTS = range(35672, 35683)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


def pick_free_tcp_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports nothing listens on right now (all held open together, so they are distinct)."""
    ports: list[int] = []
    with ExitStack() as stack:
        while len(ports) < count:
            probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.bind((host, 0))
            port = probe.getsockname()[1]
            if port not in RABBITMQCTL_PORTS:
                ports.append(port)
    return ports


@pytest.fixture(scope="session")
def free_tcp_ports() -> Callable[[int], list[int]]:
    """``free_tcp_ports(4)`` -> four distinct ports free on 127.0.0.1."""
    return pick_free_tcp_ports
