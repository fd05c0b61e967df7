"""Exponential backoff with jitter: the one helper every retry loop uses.

A delay starts at `initial`, doubles (`factor`) with every consecutive failure and never
exceeds `maximum`; each is then shortened by a random part of up to `jitter` of itself
(1.0 is "full jitter", 0.1 keeps 90-100 %), so hosts that lost the same peer at the same
moment do not all come back in step. Deterministic under an injected random source.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

Random = Callable[[], float]  # uniform in [0, 1), like random.random
DEFAULT_JITTER = 0.5


def jittered(seconds: float, jitter: float = DEFAULT_JITTER, rng: Random = random.random) -> float:
    """`seconds` shortened by a random part of up to `jitter` of it."""
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be between 0 and 1, not {jitter}")
    return seconds * (1.0 - jitter * rng())


class Backoff:
    """Delays for consecutive failures: `next()` after each failure, `reset()` after a
    success; `delay(n)` is the delay after n failures without counting."""

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        jitter: float = DEFAULT_JITTER,
        factor: float = 2.0,
        rng: Random = random.random,
    ) -> None:
        if initial <= 0 or maximum <= 0:
            raise ValueError(f"initial and maximum must be positive, not {initial}, {maximum}")
        if factor <= 1.0:
            raise ValueError(f"factor must be above 1, not {factor}")
        jittered(1.0, jitter)  # checks the fraction
        self.initial = min(initial, maximum)
        self.maximum = maximum
        self.jitter = jitter
        self.factor = factor
        self._rng = rng
        # Beyond this many doublings the delay is the maximum (and factor ** n could overflow).
        self._capped_after = math.ceil(math.log(self.maximum / self.initial, factor))
        self.failures = 0

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failures (1, 2, ...; 0 counts as 1)."""
        steps = max(failures - 1, 0)
        if steps >= self._capped_after:
            base = self.maximum
        else:
            base = min(self.initial * self.factor**steps, self.maximum)
        return jittered(base, self.jitter, self._rng)

    def next(self) -> float:
        """Count one more failure; the seconds to wait before trying again."""
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        """A success: the next failure waits `initial` again."""
        self.failures = 0
