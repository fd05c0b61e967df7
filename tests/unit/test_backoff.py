"""common.backoff: growth, cap, jitter range, reset, and determinism under a fixed random."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from common.backoff import Backoff, jittered


def fixed(value: float) -> Callable[[], float]:
    """A random source that always draws `value`."""
    return lambda: value


def test_without_jitter_it_doubles_from_initial_to_the_maximum() -> None:
    retry = Backoff(1.0, 10.0, jitter=0.0)
    assert [retry.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert retry.failures == 6


def test_reset_starts_again_at_initial() -> None:
    retry = Backoff(0.5, 30.0, jitter=0.0)
    for _ in range(4):
        retry.next()
    retry.reset()
    assert retry.failures == 0
    assert retry.next() == 0.5


def test_delay_counts_nothing() -> None:
    retry = Backoff(5.0, 300.0, jitter=0.0)
    assert [retry.delay(n) for n in (0, 1, 2, 3, 7)] == [5.0, 5.0, 10.0, 20.0, 300.0]
    assert retry.failures == 0


def test_a_huge_count_is_the_maximum_not_an_overflow() -> None:
    assert Backoff(5.0, 300.0, jitter=0.0).delay(100_000) == 300.0
    assert Backoff(1.0, 1e6, factor=10.0, jitter=0.0).delay(10_000) == 1e6


def test_an_initial_above_the_maximum_is_capped() -> None:
    assert Backoff(20.0, 5.0, jitter=0.0).next() == 5.0


@pytest.mark.parametrize("jitter", [0.1, 0.5, 1.0])
def test_jitter_shortens_by_up_to_its_fraction(jitter: float) -> None:
    rng = random.Random(7)
    retry = Backoff(1.0, 60.0, jitter=jitter, rng=rng.random)
    for failures in range(1, 12):
        base = min(2.0 ** (failures - 1), 60.0)
        for _ in range(50):
            assert base * (1 - jitter) <= retry.delay(failures) <= base


def test_the_random_source_decides_where_in_the_range() -> None:
    assert Backoff(4.0, 60.0, rng=fixed(0.0)).delay(1) == 4.0  # the longest
    assert Backoff(4.0, 60.0, rng=fixed(0.5)).delay(1) == 3.0  # default jitter 0.5
    assert Backoff(4.0, 60.0, jitter=1.0, rng=fixed(0.75)).delay(1) == 1.0


def test_jitter_spreads_hosts_that_failed_together() -> None:
    hosts = [Backoff(1.0, 30.0, rng=random.Random(seed).random) for seed in range(20)]
    first = {round(host.next(), 6) for host in hosts}
    assert len(first) == 20  # no two hosts retry in the same instant


def test_the_same_seed_gives_the_same_delays() -> None:
    one = Backoff(1.0, 30.0, rng=random.Random(3).random)
    two = Backoff(1.0, 30.0, rng=random.Random(3).random)
    assert [one.next() for _ in range(8)] == [two.next() for _ in range(8)]


def test_jittered() -> None:
    assert jittered(10.0, 0.0) == 10.0
    assert jittered(10.0, 0.5, fixed(0.5)) == 7.5
    assert all(5.0 <= jittered(10.0) <= 10.0 for _ in range(100))


@pytest.mark.parametrize(
    ("initial", "maximum", "kwargs", "message"),
    [
        (0.0, 1.0, {}, "positive"),
        (1.0, -1.0, {}, "positive"),
        (1.0, 2.0, {"factor": 1.0}, "factor"),
        (1.0, 2.0, {"jitter": 1.5}, "jitter"),
        (1.0, 2.0, {"jitter": -0.1}, "jitter"),
    ],
)
def test_bad_parameters_are_refused(
    initial: float, maximum: float, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(initial, maximum, **kwargs)  # type: ignore[arg-type]
