"""The zone's tokens: one admin token for controllers and people, and per-host tokens that
carry the host id and an HMAC of it under the zone's secret, so the zone keeps no list and
an agent can only ever speak for its own host."""

from __future__ import annotations

import base64
import hashlib
import hmac

from common.files import same_secret
from common.names import DNS1123_LABEL

_HOST_PREFIX = "host"


def _mac(secret: str, host: str) -> str:
    digest = hmac.new(secret.encode(), f"{_HOST_PREFIX}:{host}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")


def host_token(secret: str, host: str) -> str:
    if not DNS1123_LABEL.fullmatch(host):
        raise ValueError(f"host id {host[:80]!r} is not a DNS-1123 label")
    return f"{_HOST_PREFIX}.{host}.{_mac(secret, host)}"


def host_of(secret: str, token: str) -> str | None:
    """The host a host token was made for, None when it is not a valid host token."""
    prefix, _, rest = token.partition(".")
    host, _, mac = rest.rpartition(".")
    if prefix != _HOST_PREFIX or not DNS1123_LABEL.fullmatch(host):
        return None
    return host if same_secret(mac, _mac(secret, host)) else None
