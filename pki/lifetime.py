"""When a certificate is due for renewal (pure): at a fraction of its actual lifetime.

Like cert-manager: 2/3 of the way from its real notBefore to its real notAfter, not of
the TTL that was asked for. The Renewer (pki.renewal) and provisioning (pki.provision)
both ask here.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

RENEW_FRACTION = 2 / 3


def renew_at(
    not_before: datetime, not_after: datetime, fraction: float = RENEW_FRACTION
) -> datetime:
    """The instant at `fraction` of the certificate's lifetime."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} must be in (0, 1]")
    return not_before + (not_after - not_before) * fraction


def due(
    not_before: datetime,
    not_after: datetime,
    fraction: float = RENEW_FRACTION,
    now: datetime | None = None,
) -> bool:
    now = now or datetime.now(UTC)
    return now >= renew_at(not_before, not_after, fraction)


def next_check(
    not_before: datetime,
    not_after: datetime,
    fraction: float = RENEW_FRACTION,
    now: datetime | None = None,
) -> timedelta:
    """How long until the certificate is due; zero when it already is."""
    now = now or datetime.now(UTC)
    return max(renew_at(not_before, not_after, fraction) - now, timedelta(0))
