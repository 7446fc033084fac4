"""Shared by both test tiers: the ``integration`` mark and free TCP ports.

Everything under tests/integration is marked ``integration`` here, so ``pytest -m "not integration"`` runs the
tests that need no broker.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from broker.node import free_tcp_ports as pick_free_tcp_ports

INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def free_tcp_ports() -> Callable[[int], list[int]]:
    """``free_tcp_ports(4)`` -> four distinct ports free on 127.0.0.1."""
    return pick_free_tcp_ports
