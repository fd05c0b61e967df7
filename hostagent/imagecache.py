"""Image cache collection: pulled images that no node on this host has named for
`[images] unused_ttl_s` are removed, now and then (`[images] gc_interval_s`).

Only pulled images: the folders the operator put in the image directory (and the lab's
builds, cached by recipe) are never touched. Never one a node names (whatever its phase,
Deleting included), and never one being downloaded: the store decides which in one
transaction with the nodes, so a node PUT naming an image and its collection cannot
cross (the PUT then sees no image and answers 422).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from hostagent.config import ImagesConfig
from hostagent.imagepull import ImagePuller
from hostagent.store import Store

log = logging.getLogger(__name__)


def stamp(seconds: float) -> str:
    """A Unix time as the store writes its times (they compare as strings)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ImageCollector:
    def __init__(
        self,
        store: Store,
        puller: ImagePuller,
        config: ImagesConfig,
        removed: Callable[[int], None],
        failed: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.puller = puller
        self.config = config
        self._removed = removed  # bytes freed
        self._failed = failed
        self._clock = clock

    async def collect(self) -> list[str]:
        """One pass: the names of the images removed."""
        expired = await self.store.collect_images(stamp(self._clock() - self.config.unused_ttl_s))
        for record in expired:
            log.info(
                "image %s: no node has named it since %s (unused_ttl_s %.0f): removed",
                record.name,
                record.unused_since,
                self.config.unused_ttl_s,
            )
        self._removed(await self.puller.sweep())
        return [record.name for record in expired]

    async def run(self) -> None:
        while True:
            try:
                await self.collect()
            except Exception:  # this loop ending would restart the agent (watchdog)
                log.exception("image cache collection crashed; the next pass retries")
                self._failed()
            await asyncio.sleep(self.config.gc_interval_s)
