"""fedmq: asynchronous, staleness-aware federated learning for hospitals over RabbitMQ.

``__version__`` is the installed distribution's version (pyproject.toml is the one place it is written); the
coordinator's info metric and every site's heartbeat carry it.
"""

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The version of the installed ``fedmq`` distribution, or ``0+unknown`` for a tree that was never installed."""
    try:
        return version("fedmq")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = package_version()
