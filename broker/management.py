"""A small client for the RabbitMQ management HTTP API.

Provisioning needs users, permissions and vhosts, which AMQP cannot manage; tests need to list and close
connections and to read queue depths. The standard library is enough for that (JSON over HTTP with basic
auth), so no HTTP client dependency is added. Errors become ``broker.errors`` exceptions here, at the boundary.

Queue counts and connection lists come from the broker's statistics, which refresh every
``collect_statistics_interval`` (5 s by default): poll for them, or use a passive ``queue_declare`` over AMQP
when an exact count is needed right now.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from broker.errors import BrokerNotReachable, ManagementError
from broker.topology import BindingSpec, Permissions, QueueSpec

NOT_FOUND = 404


@dataclass(frozen=True)
class ConnectionInfo:
    """One client connection as the broker sees it; ``name`` is what ``close_connection`` takes."""

    name: str
    user: str
    vhost: str
    peer_host: str
    peer_port: int


@dataclass(frozen=True)
class QueueInfo:
    name: str
    messages: int
    messages_ready: int
    messages_unacknowledged: int
    consumers: int
    arguments: dict[str, Any]


def _segment(value: str) -> str:
    """Quote one path segment: vhost and user names may contain '/'."""
    return urllib.parse.quote(value, safe="")


class ManagementClient:
    """Blocking calls to one broker's management API as one (administrator) user."""

    def __init__(self, base_url: str, user: str, password: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.user = user
        self.timeout = timeout
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        self._authorization = f"Basic {token}"

    def request(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None) -> Any:
        """Send one request; return the decoded JSON answer (None when the answer is empty)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base_url}/api/{path}", data=data, method=method)
        request.add_header("Authorization", self._authorization)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            if exc.code == 401:
                raise BrokerNotReachable(
                    f"the management API at {self.base_url} refused the login of {self.user!r}"
                ) from exc
            raise ManagementError(
                f"{method} {path} failed with HTTP {exc.code}: {detail or exc.reason}", exc.code
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BrokerNotReachable(f"cannot reach the management API at {self.base_url}: {reason}") from exc
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError as exc:
            raise ManagementError(f"{method} {path} returned something that is not JSON", 200) from exc

    def _get_or_none(self, path: str) -> Any:
        try:
            return self.request("GET", path)
        except ManagementError as exc:
            if exc.status == NOT_FOUND:
                return None
            raise

    def _delete(self, path: str, *, missing_ok: bool, headers: dict[str, str] | None = None) -> bool:
        """Return whether something was deleted."""
        try:
            self.request("DELETE", path, headers=headers)
        except ManagementError as exc:
            if exc.status == NOT_FOUND and missing_ok:
                return False
            raise
        return True

    def overview(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "overview")
        return result

    # vhosts

    def create_vhost(self, name: str, *, description: str = "fedmq federation") -> None:
        """Idempotent: creating an existing vhost changes nothing."""
        self.request("PUT", f"vhosts/{_segment(name)}", {"description": description})

    def delete_vhost(self, name: str, *, missing_ok: bool = True) -> bool:
        """Deleting a vhost drops its queues and closes its connections."""
        return self._delete(f"vhosts/{_segment(name)}", missing_ok=missing_ok)

    def list_vhosts(self) -> list[str]:
        return [vhost["name"] for vhost in self.request("GET", "vhosts")]

    # users and permissions

    def create_user(self, name: str, password: str, *, tags: Iterable[str] = ()) -> None:
        """Create the user, or replace the password and tags of an existing one."""
        self.request("PUT", f"users/{_segment(name)}", {"password": password, "tags": ",".join(tags)})

    def get_user(self, name: str) -> dict[str, Any] | None:
        user: dict[str, Any] | None = self._get_or_none(f"users/{_segment(name)}")
        return user

    def list_users(self) -> list[dict[str, Any]]:
        users: list[dict[str, Any]] = self.request("GET", "users")
        return users

    def delete_user(self, name: str, *, missing_ok: bool = True) -> bool:
        """Deleting a user removes its permissions in every vhost; open connections stay until closed."""
        return self._delete(f"users/{_segment(name)}", missing_ok=missing_ok)

    def set_permissions(self, vhost: str, user: str, *, configure: str, write: str, read: str) -> None:
        self.request(
            "PUT",
            f"permissions/{_segment(vhost)}/{_segment(user)}",
            {"configure": configure, "write": write, "read": read},
        )

    def set_topic_permissions(self, vhost: str, user: str, *, exchange: str, write: str, read: str) -> None:
        """Restrict the routing keys ``user`` may publish with (write) to one topic exchange."""
        self.request(
            "PUT",
            f"topic-permissions/{_segment(vhost)}/{_segment(user)}",
            {"exchange": exchange, "write": write, "read": read},
        )

    def apply_permissions(self, vhost: str, user: str, permissions: Permissions) -> None:
        """Vhost permissions plus one topic rule per exchange, as topology describes them."""
        self.set_permissions(
            vhost, user, configure=permissions.configure, write=permissions.write, read=permissions.read
        )
        for exchange, write in permissions.topic_write.items():
            self.set_topic_permissions(vhost, user, exchange=exchange, write=write, read="^$")

    def list_permissions(self, vhost: str) -> list[dict[str, Any]]:
        permissions: list[dict[str, Any]] = self.request("GET", f"vhosts/{_segment(vhost)}/permissions")
        return permissions

    # connections

    def list_connections(self, *, vhost: str | None = None, user: str | None = None) -> list[ConnectionInfo]:
        path = "connections" if vhost is None else f"vhosts/{_segment(vhost)}/connections"
        connections = [
            ConnectionInfo(
                name=item["name"],
                user=item.get("user", ""),
                vhost=item.get("vhost", ""),
                peer_host=str(item.get("peer_host", "")),
                peer_port=int(item.get("peer_port") or 0),
            )
            for item in self.request("GET", path)
        ]
        return [connection for connection in connections if user is None or connection.user == user]

    def close_connection(self, name: str, *, reason: str = "closed by fedmq") -> bool:
        """Force-close one client connection (the client sees CONNECTION_FORCED, 320)."""
        return self._delete(f"connections/{_segment(name)}", missing_ok=True, headers={"X-Reason": reason})

    def close_user_connections(self, user: str, *, vhost: str | None = None, reason: str = "closed by fedmq") -> int:
        """Return how many connections were closed."""
        return sum(
            self.close_connection(connection.name, reason=reason)
            for connection in self.list_connections(vhost=vhost, user=user)
        )

    # queues and bindings

    def list_queues(self, vhost: str) -> list[QueueInfo]:
        return [_queue_info(item) for item in self.request("GET", f"queues/{_segment(vhost)}")]

    def declare_queue(self, vhost: str, spec: QueueSpec) -> None:
        """Idempotent for the same arguments; other arguments for an existing queue are refused (HTTP 400)."""
        self.request(
            "PUT",
            f"queues/{_segment(vhost)}/{_segment(spec.name)}",
            {"durable": spec.durable, "auto_delete": False, "arguments": spec.arguments},
        )

    def delete_queue(self, vhost: str, name: str, *, missing_ok: bool = True) -> bool:
        return self._delete(f"queues/{_segment(vhost)}/{_segment(name)}", missing_ok=missing_ok)

    def bind_queue(self, vhost: str, binding: BindingSpec) -> None:
        """Bindings are a set: binding twice leaves one binding."""
        self.request(
            "POST",
            f"bindings/{_segment(vhost)}/e/{_segment(binding.exchange)}/q/{_segment(binding.queue)}",
            {"routing_key": binding.routing_key, "arguments": {}},
        )


def _queue_info(item: dict[str, Any]) -> QueueInfo:
    return QueueInfo(
        name=item["name"],
        messages=int(item.get("messages") or 0),
        messages_ready=int(item.get("messages_ready") or 0),
        messages_unacknowledged=int(item.get("messages_unacknowledged") or 0),
        consumers=int(item.get("consumers") or 0),
        arguments=dict(item.get("arguments") or {}),
    )
