"""pki.lifetime and pki.renewal's arithmetic: when a certificate is due, when to look again,
backoff."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pki.lifetime import due, next_check, renew_at
from pki.renewal import Renewer

START = datetime(2026, 1, 1, tzinfo=UTC)
END = START + timedelta(days=90)


def test_renew_at_two_thirds_of_the_real_lifetime() -> None:
    assert renew_at(START, END) == START + timedelta(days=60)
    assert renew_at(START, END, 0.5) == START + timedelta(days=45)
    assert renew_at(START, END, 1.0) == END
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="fraction"):
            renew_at(START, END, bad)


def test_due() -> None:
    assert not due(START, END, now=START)
    assert not due(START, END, now=START + timedelta(days=59, hours=23))
    assert due(START, END, now=START + timedelta(days=60))
    assert due(START, END, now=END + timedelta(days=1))  # expired: certainly due
    assert due(START, END, 0.5, now=START + timedelta(days=45))


def test_next_check() -> None:
    assert next_check(START, END, now=START) == timedelta(days=60)
    assert next_check(START, END, now=START + timedelta(days=10)) == timedelta(days=50)
    assert next_check(START, END, now=END) == timedelta(0)
    # A short-lived certificate: the lifetime, not the TTL asked for, decides.
    short_end = START + timedelta(hours=3)
    assert next_check(START, short_end, now=START) == timedelta(hours=2)


def renewer(**kwargs: float) -> Renewer:
    return Renewer(None, list, **kwargs)  # type: ignore[arg-type]  # no backend needed


def test_backoff_doubles_and_caps_with_jitter() -> None:
    retry = renewer().retry()
    for failures, base in [(1, 5.0), (2, 10.0), (3, 20.0), (7, 300.0), (50, 300.0), (5000, 300.0)]:
        for _ in range(20):
            assert base * 0.9 <= retry.delay(failures) <= base
    assert 0.9 <= renewer(backoff_initial=1.0, backoff_max=2.0).retry().delay(1) <= 1.0
    assert retry.delay(0) <= 5.0
