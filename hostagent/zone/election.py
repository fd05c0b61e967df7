"""The election of the zone's leader among replicas sharing one etcd (leadership.py decides,
this module acts): one lease per replica, renewed every third of its TTL, which also binds
the replica's registration key; the leader key is created with it when absent. On winning,
``on_lead`` runs (the Deliverer starts); on losing the lead, ``on_follow`` (it stops) and the
store's fence is dropped. A replica whose lease may have lapsed (no renewal answered within
the TTL) steps down on its own; one paused past its lease is stopped by the fence instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial

from common import tasks as tasks_
from common.backoff import Backoff
from hostagent.errors import StoreUnavailable
from hostagent.zone.etcdstore import EtcdZoneStore
from hostagent.zone.leadership import Step, View, decide, lease_left
from hostagent.zone.mirror import Mirror

log = logging.getLogger(__name__)


class Election:
    def __init__(
        self,
        store: EtcdZoneStore,
        replica: str,
        registration: dict[str, str],
        ttl_s: int,
        *,
        on_lead: Callable[[], Awaitable[None]],
        on_follow: Callable[[], Awaitable[None]],
        on_leader_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.replica = replica
        self.registration = registration
        self.ttl_s = ttl_s
        self.on_lead = on_lead
        self.on_follow = on_follow
        self.on_leader_change = on_leader_change
        self.lease: int | None = None
        self._sent_at = 0.0
        self._granted = 0.0
        self._seen: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        return self.store.fence is not None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="zone-election")

    async def close(self) -> None:
        """Stop campaigning; a leader steps down and revokes its lease, so that another
        replica takes over at once instead of after the TTL."""
        await tasks_.cancel(self._task)
        await self._step_down()
        if self.lease is not None:
            with contextlib.suppress(StoreUnavailable):
                await self.store.etcd.revoke(self.lease)
            self.lease = None

    async def _run(self) -> None:
        retry = Backoff(0.2, self.ttl_s / 2)
        while True:
            try:
                await self._term()
                retry.reset()
            except StoreUnavailable as exc:
                log.warning("zone election: %s; trying again", exc)
                await self._step_down()
                await asyncio.sleep(retry.next())
            except Exception:  # never leave the replica leading with nobody watching
                log.exception("zone election failed; stepping down and trying again")
                await self._step_down()
                await asyncio.sleep(retry.next())

    async def _term(self) -> None:
        """One lease's life: campaign, lead or follow until the lease may have lapsed."""
        loop = asyncio.get_running_loop()
        etcd, mirror = self.store.etcd, self.store.mirror
        self._sent_at = loop.time()
        self.lease = await etcd.grant(self.ttl_s)
        self._granted = self.ttl_s
        await self.store.register(self.replica, json.dumps(self.registration).encode(), self.lease)
        keeper = asyncio.create_task(self._keep(self.lease), name="zone-lease")
        try:
            while True:
                left = lease_left(self._sent_at, self._granted, loop.time())
                leader = mirror.leader
                self._notice(leader)
                step = decide(View(self.replica, leader, self.store.fence, left))
                if step is Step.RENEW:
                    log.warning("zone replica %s: its lease may have expired", self.replica)
                    await self._step_down()
                    return
                if step is Step.STEP_DOWN:
                    await self._step_down()
                elif step is Step.CAMPAIGN:
                    fence = await self.store.campaign(self.replica, self.lease)
                    if fence is not None:
                        self.store.fence = fence
                        log.info("zone replica %s leads (term revision %d)", self.replica, fence)
                        await self.on_lead()
                    continue
                await mirror.until(partial(_moved, mirror, leader), max(min(left, 1.0), 0.05))
        finally:
            await tasks_.cancel(keeper)

    async def _keep(self, lease: int) -> None:
        """Renew the lease every third of its TTL; a failed renewal is retried until the
        lease may have lapsed (then _term sees a lease with nothing left)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            sent = loop.time()
            try:
                ttl = await self.store.keeper.renew(lease)
            except StoreUnavailable as exc:
                log.warning("zone replica %s: lease renewal failed: %s", self.replica, exc)
                continue
            self._sent_at, self._granted = sent, ttl

    def _notice(self, leader: tuple[str, int] | None) -> None:
        if leader is not None and leader[0] != self._seen:
            if self._seen is not None:
                log.info("zone leader is now %s (was %s)", leader[0], self._seen)
            self._seen = leader[0]
            self.on_leader_change()

    async def _step_down(self) -> None:
        if self.store.fence is not None:
            self.store.fence = None
            log.info("zone replica %s no longer leads", self.replica)
            await self.on_follow()


def _moved(mirror: Mirror, leader: tuple[str, int] | None) -> bool:
    return mirror.leader != leader
