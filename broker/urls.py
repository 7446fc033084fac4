"""Broker URLs as they may be shown: one place that hides a password before a URL reaches a log or a terminal."""

from __future__ import annotations

import urllib.parse

REDACTED = "****"


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``****`` (user, host, port and vhost stay, for diagnosis)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:{REDACTED}@{host}"))
