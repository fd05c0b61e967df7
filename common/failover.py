"""Several URLs of one replicated service (the zone's replicas): which to call, and moving
on to the next when a call meets a connection error or a 503 (the replica cannot serve:
its store is out of reach). Pure; the clients that use it wait with common.backoff between
rounds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

FAILOVER_STATUS = 503
T = TypeVar("T")


class Urls:
    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("at least one URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self._index = 0

    @property
    def current(self) -> str:
        return self.urls[self._index]

    def round(self) -> list[str]:
        """Every URL once, the current one first."""
        return self.urls[self._index :] + self.urls[: self._index]

    def failed(self, url: str) -> None:
        """url did not serve: the next one is current (unless another call moved on)."""
        if url.rstrip("/") == self.current:
            self._index = (self._index + 1) % len(self.urls)


def split_urls(value: str) -> list[str]:
    """A comma-separated list of URLs (a flag or environment variable) as a list."""
    return [part.strip() for part in value.split(",") if part.strip()]


async def first_serving(
    urls: Urls, attempt: Callable[[str], Awaitable[T]], moves_on: Callable[[Exception], bool]
) -> T:
    """attempt(url) on each URL of one round until one serves; an error moves_on does not
    accept ends the round at once; the last error when no URL served."""
    last: Exception | None = None
    for url in urls.round():
        try:
            return await attempt(url)
        except Exception as exc:
            if not moves_on(exc):
                raise
            last = exc
            urls.failed(url)
    assert last is not None
    raise last
