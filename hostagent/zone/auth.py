"""The zone's tokens: one admin token for controllers and people, and per-host tokens that
carry the host id, a generation and an HMAC of both under the zone's secret, so the zone
keeps no list and an agent can only ever speak for its own host.

Where the zone serves TLS a host token only bootstraps the host's client certificate,
once: the zone records the generation it took, and refuses that generation and the ones
before it afterwards (`hostagent zone host-token HOST` prints the next one)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from common.files import same_secret
from common.names import DNS1123_LABEL

_HOST_PREFIX = "host"


@dataclass(frozen=True)
class HostToken:
    host: str
    generation: int


def _mac(secret: str, host: str, generation: int) -> str:
    message = f"{_HOST_PREFIX}:{host}:{generation}".encode()
    digest = hmac.new(secret.encode(), message, hashlib.sha256)
    return base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")


def host_token(secret: str, host: str, generation: int = 1) -> str:
    if not DNS1123_LABEL.fullmatch(host):
        raise ValueError(f"host id {host[:80]!r} is not a DNS-1123 label")
    if generation < 1:
        raise ValueError(f"generation {generation} must be 1 or more")
    return f"{_HOST_PREFIX}.{host}.{generation}.{_mac(secret, host, generation)}"


def parse_host_token(secret: str, token: str) -> HostToken | None:
    """The host and generation a host token was made for, None when it is not a valid
    host token."""
    prefix, _, rest = token.partition(".")
    parts = rest.split(".")
    if prefix != _HOST_PREFIX or len(parts) != 3:
        return None
    host, generation, mac = parts
    if not DNS1123_LABEL.fullmatch(host) or not generation.isascii():
        return None
    if not generation.isdigit() or generation.startswith("0") or len(generation) > 9:
        return None
    number = int(generation)
    return HostToken(host, number) if same_secret(mac, _mac(secret, host, number)) else None
