"""A cluster's status from the zone's records and the hosts' reports. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from hostagent.imagesource import ImagePhase
from hostagent.model import Phase
from hostagent.zone.desired import api_endpoint, node_shape
from hostagent.zone.hostimages import reported
from hostagent.zone.model import UNKNOWN, ClusterPhase, HostState
from hostagent.zone.rollout import Plan
from hostagent.zone.store import (
    CatalogueImage,
    ClusterEvent,
    ClusterRecord,
    HostCertificate,
    HostRecord,
    NodeRecord,
)


def host_state(record: HostRecord, now: float, timeout_s: float) -> HostState:
    """Ready while the host's lease lives (etcd), else while its last heartbeat is at most
    timeout_s old (SQLite)."""
    ready = record.alive if record.alive is not None else now - record.last_heartbeat <= timeout_s
    return HostState.READY if ready else HostState.NOT_READY


def host_view(
    record: HostRecord, now: float, timeout_s: float, certificate: HostCertificate | None = None
) -> dict[str, Any]:
    """certificate: the last client certificate issued to the host (mutual TLS)."""
    report = record.report.model_dump(mode="json", exclude={"api_token"})
    return {
        "host": record.id,
        **report,
        "state": host_state(record, now, timeout_s).value,
        "registered_at": record.registered_at,
        "last_heartbeat_s_ago": round(max(0.0, now - record.last_heartbeat), 1),
        "certificate": None
        if certificate is None
        else {
            "not_after": certificate.not_after,
            "token_generation": certificate.token_generation,
        },
    }


def node_view(
    node: NodeRecord,
    hosts: Mapping[str, HostRecord],
    now: float,
    timeout_s: float,
    refused: Mapping[str, str],
) -> dict[str, Any]:
    """phase: Deleting while being removed, Unknown when its host stopped reporting, the
    host's reported phase, else Pending (not on the host yet); message says why."""
    host = hosts.get(node.host)
    reported = _reported(node, host)
    refusal = refused.get(f"{node.cluster}/{node.name}")
    phase, message = ("Pending", "") if refusal is None else (Phase.FAILED.value, refusal)
    updated_at = node.created_at
    if node.deleting:
        phase, message = Phase.DELETING.value, ""
    elif host is None or host_state(host, now, timeout_s) is HostState.NOT_READY:
        phase, message = UNKNOWN, f"host {node.host} is not reporting"
    elif reported is not None and refusal is None:
        phase, message, updated_at = reported.phase, reported.message, reported.updated_at
    return {
        "name": node.name,
        "role": node.role.value,
        "host": node.host,
        "address": node.address,
        "phase": phase,
        "message": message,
        "updated_at": updated_at,
        "created_at": node.created_at,
    }


def _reported(node: NodeRecord, host: HostRecord | None) -> Any:
    if host is None:
        return None
    return next(
        (r for r in host.report.nodes if (r.cluster, r.name) == (node.cluster, node.name)),
        None,
    )


def _image_wait(view: dict[str, Any], host: HostRecord | None, image: CatalogueImage) -> None:
    """A node not on its host yet: its image's state there, as the host reports it (the
    pull failed: Failed with the agent's message; downloading: Pending, waiting)."""
    entry = None if host is None else reported(host.report, image)
    if host is None or entry is None:
        return
    if entry.phase == ImagePhase.FAILED.value:
        view["phase"] = Phase.FAILED.value
        view["message"] = f"host {host.id} could not pull image {image.name}: {entry.message}"
    elif entry.phase == ImagePhase.DOWNLOADING.value:
        view["message"] = f"waiting for image {image.name} to download on host {host.id}"


def cluster_phase(deleting: bool, nodes: Iterable[Mapping[str, Any]]) -> tuple[str, str]:
    if deleting:
        return ClusterPhase.DELETING.value, ""
    live = [n for n in nodes if n["phase"] != Phase.DELETING.value]
    bad = [n for n in live if n["phase"] in (Phase.FAILED.value, UNKNOWN)]
    if bad:
        reasons = "; ".join(
            f"{n['name']} on {n['host']}: {n['phase']} ({n['message']})" for n in bad
        )
        return ClusterPhase.DEGRADED.value, reasons
    if live and all(n["phase"] == Phase.READY.value for n in live):
        return ClusterPhase.READY.value, ""
    waiting = [n["name"] for n in live if n["phase"] != Phase.READY.value]
    return ClusterPhase.PROVISIONING.value, f"waiting for {', '.join(waiting)}" if waiting else ""


def rollout_view(plan: Plan | None) -> dict[str, Any] | None:
    """state: Rolling, Stopped (message: why; nothing further is touched) or Done."""
    if plan is None:
        return None
    state = "Stopped" if plan.stopped else "Done" if plan.done else "Rolling"
    return {"state": state, "progress": plan.progress, "message": plan.stopped or plan.waiting}


def event_view(event: ClusterEvent) -> dict[str, Any]:
    return {
        "at": datetime.fromtimestamp(event.at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "kind": event.kind,
        "node": event.node,
        "role": event.role and event.role.value,
        "message": event.message,
    }


def cluster_view(
    cluster: ClusterRecord,
    nodes: Iterable[NodeRecord],
    hosts: Mapping[str, HostRecord],
    now: float,
    timeout_s: float,
    refused: Mapping[str, str],
    *,
    rollout: Plan | None = None,
    events: Iterable[ClusterEvent] = (),
    catalogue: Mapping[str, CatalogueImage] | None = None,
) -> dict[str, Any]:
    """rollout: the plan of the cluster's rollout while one is on (phase Upgrading, its
    progress and, stopped or waiting, why in the message); catalogue: the zone's images
    the nodes name (a node its host does not have yet waits for its image there)."""
    members = list(nodes)
    views = []
    for node in members:
        view = node_view(node, hosts, now, timeout_s, refused)
        shape = node_shape(cluster, node)
        view["kubernetes_version"], view["image"] = shape.kubernetes_version, shape.image
        image = (catalogue or {}).get(shape.image)
        if image is not None and view["phase"] == "Pending" and not view["message"]:
            _image_wait(view, hosts.get(node.host), image)
        views.append(view)
    phase, message = cluster_phase(cluster.deleting, views)
    if rollout is not None and not cluster.deleting:
        phase = ClusterPhase.UPGRADING.value
        message = "; ".join(m for m in (rollout.progress, rollout.stopped or rollout.waiting) if m)
    return {
        "name": cluster.name,
        "spec": cluster.spec.model_dump(mode="json"),
        "status": {
            "phase": phase,
            "message": message,
            "vni": cluster.vni,
            "node_subnet": cluster.node_subnet,
            "pod_cidr": cluster.pod_cidr,
            "service_cidr": cluster.service_cidr,
            "api_endpoint": api_endpoint(members, cluster.vip),
            "vip": cluster.vip,
            "created_at": cluster.created_at,
            "nodes": views,
            "rollout": rollout_view(rollout),
            "events": [event_view(e) for e in reversed(list(events))],
        },
    }
