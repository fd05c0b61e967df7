"""The loop that makes libvirt match the desired state, and back.

nodeplan.plan_node() says what to do (pure: desired record + observed domain -> steps).
The Reconciler owns the queue, bounded concurrency, retries with backoff and phases; the
Provisioner does the side effects. A node is reconciled by at most one worker at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time

from common.backoff import Backoff
from common.errors import ProvisioningError
from hostagent.config import ReconcilerConfig
from hostagent.errors import ImageNotReady, LibvirtUnavailable, StoreFull
from hostagent.metrics import Metrics
from hostagent.model import NodeKey, Phase
from hostagent.nodeplan import Step, plan_node
from hostagent.provisioner import Provisioner
from hostagent.store import NodeRecord, Store
from hostagent.testhooks import Point
from hostagent.virt.domain import DomainInfo
from pki.errors import BackendUnavailable

log = logging.getLogger(__name__)
# How often a node waiting for its image looks again (and updates its message).
IMAGE_WAIT_S = 2.0


class StartHistory:
    """Starts per node in a sliding window: a VM that keeps stopping is not started forever."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._starts: dict[NodeKey, list[float]] = {}

    def note(self, key: NodeKey) -> None:
        now = time.monotonic()
        recent = [t for t in self._starts.get(key, []) if now - t < self.window_s]
        if len(recent) >= self.limit:
            raise ProvisioningError(
                f"the VM was started {len(recent)} times in the last {self.window_s:.0f}s and "
                "stopped again each time; look at its serial console log "
                "(<state_dir>/nodes/<cluster>/<node>/console.log)"
            )
        self._starts[key] = [*recent, now]

    def forget(self, key: NodeKey) -> None:
        self._starts.pop(key, None)

    def recent(self, key: NodeKey) -> list[float]:
        """When the node was started within the window (monotonic seconds, oldest first)."""
        now = time.monotonic()
        return [t for t in self._starts.get(key, []) if now - t < self.window_s]


class Reconciler:
    def __init__(
        self,
        store: Store,
        provisioner: Provisioner,
        config: ReconcilerConfig,
        metrics: Metrics,
        host_id: str,
        shutdown_timeout_s: float,
    ) -> None:
        self.store = store
        self.provisioner = provisioner
        self.config = config
        self.metrics = metrics
        self.host_id = host_id
        self.shutdown_timeout_s = shutdown_timeout_s
        self._queue: asyncio.Queue[NodeKey] = asyncio.Queue()
        self._queued: set[NodeKey] = set()
        self._active: set[NodeKey] = set()
        self._again: set[NodeKey] = set()
        self.starts = StartHistory(config.crash_loop_starts, config.crash_loop_window_s)
        self._unowned: set[str] = set()  # domains whose bad metadata was warned about

    def enqueue(self, key: NodeKey) -> None:
        if key in self._active:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def enqueue_domain(self, domain_name: str) -> None:
        """A libvirt event for a domain; only ours matter, resync finds those by metadata."""
        for record in self.store.all():
            if record.key.domain == domain_name:
                self.enqueue(record.key)
                return
        self.enqueue_orphans_later()

    def enqueue_orphans_later(self) -> None:
        asyncio.get_running_loop().create_task(self.resync())

    async def resync(self) -> None:
        """Queue every desired node and every domain of ours that has no desired node."""
        records = self.store.all()
        for record in records:
            self.enqueue(record.key)
        try:
            domains = await self.provisioner.virt.owned_domains(self.host_id)
        except ProvisioningError as exc:
            log.warning("resync could not list domains, retrying at the next resync: %s", exc)
            return
        desired = {record.key.domain for record in records}
        for domain in domains:
            if domain.name not in desired and (key := self._key_of(domain)) is not None:
                self.enqueue(key)

    def _key_of(self, domain: DomainInfo) -> NodeKey | None:
        """The node key of an orphan domain; None (warned once) when its metadata names
        no valid cluster/node: names are re-validated before reaching a path."""
        try:
            return NodeKey(cluster=domain.meta.cluster, name=domain.meta.node)
        except ValueError as exc:
            if domain.name not in self._unowned:
                self._unowned.add(domain.name)
                self.metrics.loop_error("reconciler")
                log.warning(
                    "domain %s carries this host's metadata with a bad cluster/node, so the "
                    "agent leaves it alone; fix or remove it with virsh: %s",
                    domain.name,
                    exc,
                )
            return None

    async def _resync_networks(self) -> None:
        """Put back what someone else changed (a bridge deleted, ip_forward rewritten)."""
        try:
            await self.provisioner.ensure_networks(self.store.all())
        except ProvisioningError as exc:
            log.warning("network resync failed, retrying at the next resync: %s", exc)

    def load(self) -> dict[str, int]:
        """Nodes waiting for and in reconciliation: both 0 once the world matches."""
        return {"queued": len(self._queued), "active": len(self._active)}

    async def run(self) -> None:
        workers = [
            asyncio.create_task(self._worker(), name=f"reconcile-{n}")
            for n in range(self.config.concurrency)
        ]
        try:
            while True:
                await asyncio.sleep(self.config.resync_interval_s)
                try:
                    await self.resync()
                    await self._resync_networks()
                except Exception:  # this loop ending would restart the agent (watchdog)
                    log.exception("resync crashed; the next one retries")
                    self.metrics.loop_error("reconciler")
        finally:
            for worker in workers:
                worker.cancel()

    async def _worker(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._active.add(key)
            try:
                await self._reconcile_with_retries(key)
            except StoreFull as exc:
                # Nothing can be recorded while the disk is full: the node is tried again
                # later, from what the store holds (a step done meanwhile is not done twice).
                self.metrics.reconcile_errors.inc()
                retry_s = self.config.backoff_max_s
                log.warning("%s: %s; retrying in %.0fs", key, exc, retry_s)
                asyncio.get_running_loop().call_later(retry_s, self.enqueue, key)
            except Exception:
                log.exception("reconcile of %s crashed", key)
                self.metrics.loop_error("reconciler")
            finally:
                self._active.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self.enqueue(key)

    async def _reconcile_with_retries(self, key: NodeKey) -> None:
        retry = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        attempt = 1
        while True:
            started = time.monotonic()
            delay = retry.next()  # the wait, should this try fail
            try:
                await self.reconcile(key)
                self.metrics.reconcile_seconds.observe(time.monotonic() - started)
                return
            except ImageNotReady as exc:
                # Not a failure: the node waits for as long as the pull goes on.
                await self._note(key, Phase.PENDING, str(exc))
                retry.reset()
                delay = IMAGE_WAIT_S
            except LibvirtUnavailable as exc:
                self.metrics.reconcile_errors.inc()
                await self._note(key, None, f"waiting for libvirt: {exc}")
                await self.provisioner.virt.connected.wait()
            except BackendUnavailable as exc:
                # Vault down: wait and retry for as long as it takes, the node never fails.
                self.metrics.reconcile_errors.inc()
                log.warning("%s: %s; retrying in %.1fs", key, exc, delay)
                await self._note(key, None, f"waiting for the certificate backend: {exc}")
            except ProvisioningError as exc:
                self.metrics.reconcile_errors.inc()
                if attempt >= self.config.max_attempts:
                    await self._fail(key, str(exc), attempt)
                    return
                log.warning(
                    "%s: attempt %d failed: %s; retrying in %.1fs", key, attempt, exc, delay
                )
                await self._note(key, None, f"attempt {attempt} failed, retrying: {exc}")
                attempt += 1
            await asyncio.sleep(delay)

    async def _note(self, key: NodeKey, phase: Phase | None, message: str) -> None:
        record = self.store.get(key)
        if record is not None and not record.deleting:
            await self.store.set_phase(key, phase or record.phase, message)

    async def _fail(self, key: NodeKey, error: str, attempts: int) -> None:
        self.starts.forget(key)  # a retry (PUT again) starts with a clean history
        record = self.store.get(key)
        if record is None:
            log.error("cleaning up orphan domain %s failed: %s", key.domain, error)
            return
        what = "deleting" if record.deleting else "creating"
        message = (
            f"{what} the node failed after {attempts} attempts: {error}. Fix the cause, then "
            + ("DELETE the node again" if record.deleting else "PUT the node again or DELETE it")
        )
        log.error("%s: %s", key, message)
        await self.store.set_phase(key, Phase.FAILED, message, event="failed")

    async def reconcile(self, key: NodeKey) -> None:
        record = self.store.get(key)
        if record is not None and record.phase is Phase.FAILED:
            return
        domain = await self.provisioner.virt.domain(key.domain, self.host_id)
        steps = plan_node(record, domain)
        if record is not None and not record.deleting and Step.PREPARE in steps:
            self.provisioner.image(record.spec)  # waits here, before touching anything
        if steps:
            log.info("%s: %s", key, ", ".join(step.value for step in steps))
        for step in steps:
            await self._do(step, key)

    async def _do(self, step: Step, key: NodeKey) -> None:
        p = self.provisioner
        if step is Step.NETWORK:
            await p.ensure_networks(self.store.all())
            record = self.store.get(key)
            creating = record is not None and not record.deleting
            p.hook.reached(Point.NETWORK if creating else Point.NETWORK_TEARDOWN)
        elif step is Step.PREPARE:
            record = self._record(key)
            if record.phase is not Phase.PROVISIONING:  # a retry keeps its cause in view
                await self.store.set_phase(key, Phase.PROVISIONING, step.value)
            await p.prepare_files(record, self.store.all())
        elif step is Step.DEFINE:
            await p.define(self._record(key))
            p.hook.reached(Point.DEFINE)
        elif step in (Step.START, Step.MARK_RUNNING):
            domain_id = None
            if step is Step.START:
                self.starts.note(key)
                was = self._record(key).phase
                domain_id = await p.virt.start(key.domain)
                p.hook.reached(Point.START)
                await self._started(key, was)
            if domain_id is None:
                info = await p.virt.domain(key.domain, self.host_id)
                domain_id = info.domain_id if info else None
            await self.store.set_phase(key, Phase.RUNNING, "", domain_id=domain_id)
            p.hook.reached(Point.RUNNING)
        else:
            await self._teardown(step, key)

    async def _started(self, key: NodeKey, was: Phase) -> None:
        """The event of a start: the first, or again after the VM stopped by itself."""
        if was in (Phase.RUNNING, Phase.READY):
            starts = len(self.starts.recent(key))
            message = (
                f"the VM had stopped by itself (phase {was.value}); started again "
                f"({starts} starts in the last {self.starts.window_s:.0f}s)"
            )
            await self.store.add_event(key, "restarted", message)
        else:
            await self.store.add_event(key, "started", f"domain {key.domain} started")

    async def _teardown(self, step: Step, key: NodeKey) -> None:
        p = self.provisioner
        if step is Step.SHUTDOWN:
            await p.virt.shutdown(key.domain, self.shutdown_timeout_s)
            p.hook.reached(Point.SHUTDOWN)
        elif step is Step.DESTROY:
            await p.virt.destroy(key.domain)
            p.hook.reached(Point.DESTROY)
        elif step is Step.UNDEFINE:
            await p.virt.undefine(key.domain)
            p.hook.reached(Point.UNDEFINE)
        elif step is Step.REMOVE_FILES:
            await p.remove_files(key)
            p.hook.reached(Point.REMOVE_FILES)
        elif step is Step.CLUSTER_GONE:
            # Before the record (or the orphan's domain) goes, which is what makes a
            # restarted agent do it again. Nodes being deleted do not count: two last
            # nodes deleted at once must not each wait for the other.
            if not any(
                r.key.cluster == key.cluster and r.key != key and not r.deleting
                for r in self.store.all()
            ):
                await p.cluster_gone(key.cluster)
                p.hook.reached(Point.CLUSTER_GONE)
        elif step is Step.FORGET:
            await self.store.remove(key)
            self.starts.forget(key)
            p.hook.reached(Point.FORGET)

    def _record(self, key: NodeKey) -> NodeRecord:
        record = self.store.get(key)
        if record is None:
            raise ProvisioningError(f"node {key} vanished from the store while being created")
        return record
