"""Errors of the broker tooling (local node, management API, declaring, provisioning, names).

Every foreign exception (subprocess, urllib, pika) is translated into one of these at the boundary, so the
CLI can print one clear line instead of a traceback::

    BrokerError                  root
    ├── BrokerNotInstalled       rabbitmq-server is missing; the message says how to install it
    ├── BrokerNotConfigured      no broker set up under the state dir (run ``fedmq broker up``)
    ├── BrokerStartError         the local node did not start or stop; the message points at its log
    ├── BrokerNotReachable       nothing answers on the AMQP or management port, or the login is refused
    ├── ManagementError          the management HTTP API answered with an error; has ``status``
    ├── DeclarationError         the broker refused to declare the topology (e.g. a queue with other arguments)
    ├── ProvisioningError        a site or user cannot be added or removed (exists already, unknown, bad name)
    ├── CertificateError         a certificate or key cannot be made or read (``broker.certs``)
    └── TopologyError            a name the topology cannot use, e.g. an invalid site id (``broker.topology``;
                                 also a ValueError)

The pika transport has its own tree (``broker.transport.TransportError``): it is about messages in flight,
these are about setting the broker up.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Root of the broker tooling's errors; the message is meant for the operator."""


class BrokerNotInstalled(BrokerError):
    pass


class BrokerNotConfigured(BrokerError):
    pass


class BrokerStartError(BrokerError):
    pass


class BrokerNotReachable(BrokerError):
    pass


class ManagementError(BrokerError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class DeclarationError(BrokerError):
    pass


class ProvisioningError(BrokerError):
    pass
