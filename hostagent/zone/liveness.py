"""When a heartbeat to a zone on etcd writes the host's full report, and when it only
renews the host's lease (pure; the Kubernetes node-lease pattern, KEP-589).

A host is Ready while its ``alive`` key exists: the key is bound to a lease of its own that
any replica renews when the host heartbeats to it (LeaseKeepAlive, which in etcd 3.4 the
leader answers without a Raft write or an fsync). The report, a few hundred bytes to a few
kB, is written only when it changed or once every ``report_interval_s``.
"""

from __future__ import annotations

import math

DEFAULT_REPORT_INTERVAL_S = 60.0


def report_due(
    stored: object | None,
    report: object,
    written_at: float,
    now: float,
    report_interval_s: float,
) -> bool:
    """True when the report must be written: none stored, it differs from the stored one,
    or the stored one is report_interval_s old."""
    return stored is None or stored != report or now - written_at >= report_interval_s


def lease_ttl(ttl_s: float | None, heartbeat_interval_s: float) -> int:
    """A host lease's TTL in whole seconds (etcd's unit): ttl_s, else three heartbeat
    intervals; at least 2 s (etcd's least is about 1.5 s)."""
    wanted = 3 * heartbeat_interval_s if ttl_s is None else ttl_s
    return max(2, math.ceil(wanted))
