"""The next host token of a host, as `hostagent zone host-token` and the lab make it: the
generation after the one that last bootstrapped the host, read from the zone's store
read-only (the running zone owns it; a zone that never ran has none: generation 1)."""

from __future__ import annotations

from pathlib import Path

from common.files import ensure_secret
from hostagent.zone.auth import host_token
from hostagent.zone.store import token_generation_in


def next_host_token(state_dir: Path, host: str) -> str:
    """ValueError for a host id that is no DNS-1123 label."""
    secret = ensure_secret(state_dir / "host-secret")
    return host_token(secret, host, token_generation_in(state_dir / "zone.db", host) + 1)
