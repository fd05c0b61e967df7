"""The Roller: the leader's rollouts and remediations, one task per cluster.

Every `[rollout] interval_s` (and when a PUT starts a rollout) each cluster that has no
task running gets one, which reads the cluster from the store (zone/observe.py), asks
rollout.plan what to do while a rollout is on, else remediation.decide which unhealthy
nodes to replace, calls the drain hook before any removal or re-creation, and writes the
outcome to the store; the Deliverer then makes the agents match. Nothing lives only in
this replica: a new leader starts from the store and carries on (a drain hook that was
being called when the old leader died is called again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Sequence

from common import http
from common import tasks as tasks_
from common.errors import HostAgentError
from hostagent.errors import ConfigError, StoreUnavailable
from hostagent.model import Role
from hostagent.zone import drain, observe
from hostagent.zone.config import RemediationConfig, RolloutConfig
from hostagent.zone.remediation import Limits, decide
from hostagent.zone.rollout import Action, AddWorker, Plan, Recreate, RemoveWorker
from hostagent.zone.service import ZoneService
from hostagent.zone.store import ClusterEvent, ClusterRecord, NodeRecord, Stale

log = logging.getLogger(__name__)

ROLLOUT, DRAIN = "rollout", "drain"


class Roller:
    def __init__(
        self,
        service: ZoneService,
        rollout: RolloutConfig,
        remediation: RemediationConfig,
        tls: ssl.SSLContext,
    ) -> None:
        """tls: trust for https drain hooks (drain_tls)."""
        self.service = service
        self._tls = tls
        self.config = rollout
        self.remediation = remediation
        self.limits = Limits(
            remediation.unhealthy_for_s, remediation.window_s, remediation.max_fraction
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._http: http.AsyncClient | None = None

    async def start(self) -> None:
        self._http = http.async_client(tls=self._tls)
        self.service.on_rollout = self.kick
        self._loop = asyncio.create_task(self._run(), name="roller")

    async def close(self) -> None:
        self.service.on_rollout = lambda cluster: None
        tasks = [t for t in [self._loop, *self._tasks.values()] if t is not None]
        await tasks_.cancel(*tasks)
        self._tasks.clear()
        if self._http is not None:
            await self._http.aclose()

    def kick(self, cluster: str) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                clusters = self.service.store.clusters()
            except StoreUnavailable:
                continue
            self._tasks = {c: t for c, t in self._tasks.items() if not t.done()}
            for record in clusters:
                running = self._tasks.get(record.name)
                if record.deleting or (running is not None and not running.done()):
                    continue
                self._tasks[record.name] = asyncio.create_task(
                    self._cluster(record.name), name=f"roll-{record.name}"
                )

    async def _cluster(self, name: str) -> None:
        try:
            await self.step(name)
        except (HostAgentError, Stale) as exc:  # no room for a new worker, lead lost, ...
            log.warning("cluster %s: rollout or remediation step failed: %s", name, exc)
        except Exception:
            log.exception("cluster %s: rollout or remediation step failed", name)

    async def step(self, name: str) -> None:
        """One look at the cluster: a rollout's next actions, else its remediations."""
        service, store = self.service, self.service.store
        record = store.cluster(name)
        if record is None or record.deleting:
            return
        observed = service.observed(record)
        nodes = [o.node for o in observed]
        step_running = False
        if observe.rollout_on(record, observed):
            plan = observe.rollout_plan(record, observed, service.clock())
            if plan.stopped:
                await self._stopped(record, plan)
            elif plan.actions:
                await self._act(record, nodes, plan.actions)
                return
            step_running = not plan.stopped and not plan.done
        if not self.remediation.enabled:
            return
        decision = decide(
            observe.health(observed),
            observe.remediated(store.events(name)),
            self.limits,
            service.clock(),
            step_running,
        )
        by_name = {o.node.name: o for o in observed}
        for node in decision.replace:
            await self._remediate(record, by_name[node])

    async def _stopped(self, record: ClusterRecord, plan: Plan) -> None:
        """Say once (an event) why the rollout stopped."""
        last = [e for e in self.service.store.events(record.name) if e.kind == ROLLOUT]
        if last and last[-1].message == plan.stopped:
            return
        log.warning("cluster %s: rollout stopped: %s", record.name, plan.stopped)
        node = plan.stopped.split(" ")[1] if plan.stopped.count(" ") else ""
        role = Role.MASTER if plan.stopped.startswith("master") else Role.WORKER
        await self._event(record.name, ROLLOUT, node, role, plan.stopped)

    async def _act(
        self, record: ClusterRecord, nodes: Sequence[NodeRecord], actions: Sequence[Action]
    ) -> None:
        service, name = self.service, record.name
        by_name = {n.name: n for n in nodes}
        target = observe.target(record)
        added = [a.node for a in actions if isinstance(a, AddWorker)]
        removed = [by_name[a.node] for a in actions if isinstance(a, RemoveWorker)]
        for action in actions:
            if isinstance(action, Recreate):
                master = by_name[action.node]
                await self._drain(record, master, f"rollout to {target.masters.kubernetes_version}")
                log.info("cluster %s: re-creating master %s at the new spec", name, master.name)
                await service.recreate(name, master, target.masters)
        if added:
            log.info("cluster %s: adding workers %s", name, ", ".join(added))
            await service.add_workers(name, added)
        if removed:
            reason = f"rollout to {target.workers.kubernetes_version}"
            await asyncio.gather(*(self._drain(record, w, reason) for w in removed))
            log.info("cluster %s: removing workers %s", name, ", ".join(n.name for n in removed))
            await service.remove_nodes(name, [w.name for w in removed])

    async def _remediate(self, record: ClusterRecord, found: observe.Observed) -> None:
        node, name = found.node, record.name
        if node.role is Role.MASTER and found.reason.startswith("host "):
            return  # a master is re-created in place only, which needs its host
        why = found.reason or "unhealthy"
        if node.role is Role.MASTER:
            message = f"re-creating master {node.name} in place: {why}"
        else:
            new = _next_worker(self.service.store.nodes(name))  # after any made just now
            self.service.check_room(name, new, node.name)  # else no drain, no budget spent
            message = f"replacing worker {node.name} by {new}: {why}"
        await self._drain(record, node, f"remediation: {why}")
        # Recorded before it is done: the window counts it even if this leader dies now.
        await self._event(name, observe.REMEDIATION, node.name, node.role, message)
        log.warning("cluster %s: %s", name, message)
        if node.role is Role.MASTER:
            await self.service.recreate(name, node, None)
        else:
            await self.service.replace_workers(name, [new], [node.name])

    async def _drain(self, record: ClusterRecord, node: NodeRecord, reason: str) -> None:
        hook = record.spec.drain_hook
        if hook is None:
            return
        assert self._http is not None, "start() first"
        said = await drain.call(self._http, hook, record.name, node.name, node.role, reason)
        await self._event(record.name, DRAIN, node.name, node.role, f"{said} ({reason})")

    async def _event(self, cluster: str, kind: str, node: str, role: Role, message: str) -> None:
        event = ClusterEvent(self.service.clock(), kind, node, role, message)
        await self.service.store.add_event(cluster, event)


def drain_tls(config: RolloutConfig) -> ssl.SSLContext:
    """Trust for the drain hooks: `[rollout] drain_hook_ca_file`, else the system's CAs."""
    try:
        return http.tls_context(config.drain_hook_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"rollout.drain_hook_ca_file: cannot load {config.drain_hook_ca_file}: {exc}"
        ) from exc


def _next_worker(nodes: Sequence[NodeRecord]) -> str:
    """A worker name no node of the cluster has: one above the highest."""
    numbers = [
        int(match.group(1))
        for n in nodes
        if n.role is Role.WORKER and (match := re.fullmatch(r"w(\d+)", n.name))
    ]
    return f"w{max(numbers, default=0) + 1}"
