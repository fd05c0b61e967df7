"""The agent's operations on nodes, between the HTTP layer and the store.

Each write validates everything first and then persists in one transaction (a PUT's
checks inside that transaction); a rejected request changes nothing. The reconciler is
told after the change is committed.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cloudconfig.versions import UnsupportedVersion, template_folder
from common.files import same_secret
from hostagent import capacity, console
from hostagent.config import Config
from hostagent.errors import (
    Conflict,
    Invalid,
    MalformedRequest,
    NotFound,
    Unauthorized,
    parse_body,
    validation_problems,
)
from hostagent.images import ImageCatalog
from hostagent.imagesource import ImagePhase
from hostagent.model import Node, NodeEventBody, NodeHealth, NodeKey, NodeSpec, NodeStatus, Phase
from hostagent.nodehealth import HealthBook, etcd_report
from hostagent.store import NodeRecord, Store
from hostagent.store import now as store_now
from pki import layout
from pki.files import read_expiries


def parse_key(cluster: str, name: str) -> NodeKey:
    try:
        return NodeKey(cluster=cluster, name=name)
    except ValidationError as exc:
        raise Invalid(validation_problems(exc, plain=True)) from exc


def parse_spec(body: bytes) -> NodeSpec:
    return parse_body(body, NodeSpec, "a NodeSpec")


def to_node(record: NodeRecord, nodes_dir: Path | None, health: NodeHealth) -> Node:
    return Node(
        cluster=record.key.cluster,
        name=record.key.name,
        spec=record.spec,
        status=NodeStatus(
            phase=record.phase,
            message=record.message,
            domain=record.key.domain,
            updated_at=record.updated_at,
            guest=record.guest,
            certificates=_expiries(record, nodes_dir),
            health=health,
        ),
    )


def _expiries(record: NodeRecord, nodes_dir: Path | None) -> dict[str, str]:
    if nodes_dir is None:
        return {}
    directory = layout.host_dir(nodes_dir / record.key.cluster / record.key.name)
    expiries = read_expiries(directory)
    return {name: when.strftime("%Y-%m-%dT%H:%M:%SZ") for name, when in sorted(expiries.items())}


class NodeService:
    def __init__(
        self,
        config: Config,
        store: Store,
        images: ImageCatalog,
        physical: capacity.Resources,
        notify: Callable[[NodeKey], None],
        health: HealthBook | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.images = images
        self.physical = physical
        self.notify = notify
        self.health = health or HealthBook()

    def get(self, key: NodeKey) -> Node:
        node = self._node(self._existing(key))
        events = [
            NodeEventBody(kind=e.kind, message=e.message, at=e.at) for e in self.store.events(key)
        ]
        return node.model_copy(update={"events": events})

    def all(self) -> list[Node]:
        return [self._node(record) for record in self.store.all()]

    def _node(self, record: NodeRecord) -> Node:
        return to_node(record, self.config.nodes_dir, self.health.get(record.key))

    async def put(self, key: NodeKey, spec: NodeSpec) -> tuple[Node, bool]:
        def check(current: NodeRecord | None, others: list[NodeRecord]) -> None:
            self._check(key, spec, current, others)

        # The checks run in the store's write transaction: no other write comes between
        # the capacity and conflict checks and the write they allow.
        put = await self.store.put(key, spec, secrets.token_hex(16), check)
        if put.change is not None:
            self.notify(key)
        return self._node(put.record), put.change == "accepted"

    async def delete(self, key: NodeKey) -> Node:
        record = self._existing(key)
        if not record.deleting or record.phase is Phase.FAILED:
            await self.store.mark_deleting(key)
            self.notify(key)
        return self.get(key)

    async def phone_home(self, key: NodeKey, token: str | None, body: bytes) -> Node:
        report = self._guest_report(key, token, body)
        await self.store.set_ready(key, report)
        self.health.reported(key)
        return self.get(key)

    def guest_health(self, key: NodeKey, token: str | None, body: bytes) -> NodeHealth:
        """The guest's periodic report (its health timer): it is alive, and a master running
        etcd as a unit says whether its member is healthy (kept as health.etcd). The body
        is checked like a phone-home's; the rest of it is not kept."""
        report = self._guest_report(key, token, body)
        try:
            etcd_healthy = etcd_report(report)
        except ValueError as exc:
            raise MalformedRequest(f"the guest's health report: {exc}") from exc
        self.health.reported(key, etcd_healthy, store_now())
        return self.health.get(key)

    def _guest_report(self, key: NodeKey, token: str | None, body: bytes) -> dict[str, Any]:
        record = self.store.get(key)
        if record is None or token is None or not same_secret(token, record.token):
            raise Unauthorized("wrong or missing node token")
        if record.deleting:
            raise Conflict(f"node {key} is being deleted")
        try:
            report: Any = json.loads(body or b"{}")
        except ValueError as exc:
            raise MalformedRequest(f"the guest's report is not valid JSON: {exc}") from exc
        if not isinstance(report, dict):
            raise MalformedRequest("the guest's report must be a JSON object")
        return report

    def console(self, key: NodeKey, tail_bytes: int) -> bytes:
        """The last tail_bytes of the node's serial console (b"" before it first started)."""
        self._existing(key)
        return console.tail(console.log_path(self.config.nodes_dir, key), tail_bytes)

    def allocated(self) -> capacity.Resources:
        return capacity.allocated((r.spec for r in self.store.all()), self.config.capacity)

    def _existing(self, key: NodeKey) -> NodeRecord:
        record = self.store.get(key)
        if record is None:
            raise NotFound(f"node {key} does not exist on this host")
        return record

    def _check(
        self, key: NodeKey, spec: NodeSpec, current: NodeRecord | None, others: list[NodeRecord]
    ) -> None:
        if current is not None:
            _check_update(key, spec, current)
        for other in others:
            if other.key.domain == key.domain:
                raise Conflict(
                    f"node {key} would get the libvirt domain name {key.domain}, which node "
                    f"{other.key} already has; choose another cluster or node name"
                )
        try:
            template_folder(spec.kubernetes_version)
        except UnsupportedVersion as exc:
            raise Invalid(str(exc)) from exc
        self._check_image(spec.image)
        _check_network(key, spec, others)
        capacity.check_fits(spec, (r.spec for r in others), self.physical, self.config.capacity)

    def _check_image(self, name: str) -> None:
        """Ready, or being pulled (the node waits for it); else 422."""
        if self.images.get(name) is not None:
            return
        pulled = self.store.image(name)
        if pulled is not None and pulled.phase is ImagePhase.DOWNLOADING:
            return
        if pulled is not None and pulled.phase is ImagePhase.FAILED:
            raise Invalid(f"image {name!r} could not be pulled: {pulled.message}")
        known = ", ".join(self.images.names()) or "none"
        raise Invalid(f"image {name!r} is not on this host (known: {known})")


def _check_update(key: NodeKey, spec: NodeSpec, current: NodeRecord) -> None:
    if current.deleting:
        raise Conflict(f"node {key} is being deleted; wait until it is gone, then PUT it again")
    if current.spec.role != spec.role:
        raise Conflict(
            f"node {key} exists with role {current.spec.role.value}; a node cannot change "
            "its role: delete it and create it again"
        )
    if spec.disk_gib < current.spec.disk_gib:
        raise Invalid(
            f"disk_gib cannot shrink (from {current.spec.disk_gib} to {spec.disk_gib}): "
            "disks only grow"
        )


def _check_network(key: NodeKey, spec: NodeSpec, others: list[NodeRecord]) -> None:
    net = spec.network
    for other in others:
        theirs = other.spec.network
        same_cluster = other.key.cluster == key.cluster
        if same_cluster and (theirs.vni, theirs.gateway_interface, theirs.mtu) != (
            net.vni,
            net.gateway_interface,
            net.mtu,
        ):
            raise Conflict(
                f"cluster {key.cluster} already uses vni {theirs.vni}, gateway "
                f"{theirs.gateway_interface} and mtu {theirs.mtu} on this host (node "
                f"{other.key.name}); every node of a cluster shares its network"
            )
        if not same_cluster and theirs.vni == net.vni:
            raise Conflict(f"vni {net.vni} belongs to cluster {other.key.cluster} on this host")
        if not same_cluster and net.interface.network.overlaps(theirs.interface.network):
            raise Conflict(
                f"{net.interface.network} overlaps {theirs.interface.network} of cluster "
                f"{other.key.cluster} on this host"
            )
        if ipaddress.ip_interface(net.address).ip == theirs.interface.ip:
            raise Conflict(f"address {net.address} is already used by node {other.key}")
