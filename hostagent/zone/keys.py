"""The zone's keys in etcd and their JSON values (docs/zone.md, "The zone's keys in etcd").
Pure: the etcd store and its mirror build and read keys only here.

One key per record, under a configurable prefix P (default ``/hostagent/zone/``):

    P hosts/<host>/report              the host's last report, registered_at, last_heartbeat
                                       (written when it changes or every report_interval_s)
    P hosts/<host>/alive               the id of the host's lease, bound to it: the host is
                                       Ready while the key exists
    P hosts/<host>/placed              bumped whenever a node is placed on the host
    P clusters/<cluster>               spec, allocations, created_at, deleting, vip
    P nodes/<cluster>/<node>           role, host, address, created_at, deleting, shape
                                       (what it runs), generation
    P events/<cluster>                 the cluster's last events (remediations, drain
                                       hooks, stopped rollouts), a JSON list
    P gateways/<cluster>/<host>        the host's address on the cluster network
    P images/<name>                    an image of the catalogue: its source, created_at
    P deliveries/<host>/<kind>/<key>   the digest the host's agent acknowledged
    P alloc/<kind>/<value>             the cluster holding a VNI or range (kind: vni,
                                       node-subnet, pod-cidr, service-cidr)
    P certificates/<host>              the host's last client certificate and the host
                                       token generation that bootstrapped it (kept when
                                       the host is removed: a spent token stays spent)
    P replicas/<id>                    a running zone replica (id, api_url, started), bound
                                       to its lease
    P leader                           the leading replica's id, bound to its lease; its
                                       create revision fences the leader's writes

An allocation key is created only if absent, in the transaction that creates its cluster,
and deleted in the one that removes it: two zones allocating at once cannot both get it.
"""

from __future__ import annotations

import json
from typing import Any

from hostagent.imagesource import ImageSource
from hostagent.model import Role
from hostagent.zone.model import STORED, ClusterSpec, HostReport
from hostagent.zone.store import (
    CatalogueImage,
    ClusterEvent,
    ClusterRecord,
    Gateway,
    HostCertificate,
    HostRecord,
    NodeRecord,
    events_json,
    shape_data,
    shape_of_json,
)

DEFAULT_PREFIX = "/hostagent/zone/"
ALLOCATIONS = ("vni", "node-subnet", "pod-cidr", "service-cidr")


class Layout:
    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"

    def host(self, host: str) -> str:
        return f"{self.prefix}hosts/{host}/report"

    def alive(self, host: str) -> str:
        return f"{self.prefix}hosts/{host}/alive"

    def placed(self, host: str) -> str:
        return f"{self.prefix}hosts/{host}/placed"

    def host_keys(self, host: str) -> str:
        return f"{self.prefix}hosts/{host}/"

    def cluster(self, name: str) -> str:
        return f"{self.prefix}clusters/{name}"

    def node(self, cluster: str, node: str) -> str:
        return f"{self.prefix}nodes/{cluster}/{node}"

    def nodes_of(self, cluster: str) -> str:
        return f"{self.prefix}nodes/{cluster}/"

    def events(self, cluster: str) -> str:
        return f"{self.prefix}events/{cluster}"

    def image(self, name: str) -> str:
        return f"{self.prefix}images/{name}"

    def gateway(self, cluster: str, host: str) -> str:
        return f"{self.prefix}gateways/{cluster}/{host}"

    def gateways_of(self, cluster: str) -> str:
        return f"{self.prefix}gateways/{cluster}/"

    def delivery(self, host: str, kind: str, key: str) -> str:
        return f"{self.prefix}deliveries/{host}/{kind}/{key}"

    def deliveries_of(self, host: str) -> str:
        return f"{self.prefix}deliveries/{host}/"

    def certificate(self, host: str) -> str:
        return f"{self.prefix}certificates/{host}"

    def replica(self, replica: str) -> str:
        return f"{self.prefix}replicas/{replica}"

    @property
    def leader(self) -> str:
        return f"{self.prefix}leader"

    def allocations(self, cluster: ClusterRecord) -> list[str]:
        values = (str(cluster.vni), cluster.node_subnet, cluster.pod_cidr, cluster.service_cidr)
        return [
            f"{self.prefix}alloc/{kind}/{v}" for kind, v in zip(ALLOCATIONS, values, strict=True)
        ]

    def parse(self, key: str) -> tuple[str, ...]:
        """A key as (kind, names...): ("hosts", host, "report"), ("clusters", name),
        ("nodes", cluster, node), ("events", cluster), ("gateways", cluster, host),
        ("images", name),
        ("deliveries", host, kind, key), ("alloc", kind, value), ("certificates", host),
        ("replicas", id), ("leader",); () for a key of no known kind."""
        rest = key.removeprefix(self.prefix)
        if rest == key:
            return ()
        if rest == "leader":
            return ("leader",)
        kind, _, tail = rest.partition("/")
        # How many parts each kind has; the last part of a delivery's or an allocation's
        # key may hold slashes ("demo/m1", "10.128.0.0/24"), the names of the others not.
        counts = {
            "hosts": 2,
            "clusters": 1,
            "events": 1,
            "nodes": 2,
            "gateways": 2,
            "certificates": 1,
            "replicas": 1,
            "images": 1,
        }
        last_free = {"deliveries": 3, "alloc": 2}
        if kind in counts:
            parts = tuple(tail.split("/"))
            count = counts[kind]
        elif kind in last_free:
            count = last_free[kind]
            parts = tuple(tail.split("/", count - 1))
        else:
            return ()
        return (kind, *parts) if len(parts) == count and all(parts) else ()


def host_value(report: HostReport, registered_at: str, last_heartbeat: float) -> bytes:
    data = {
        "report": report.model_dump(mode="json"),
        "registered_at": registered_at,
        "last_heartbeat": last_heartbeat,
    }
    return json.dumps(data, separators=(",", ":")).encode()


def host_record(host: str, data: dict[str, Any]) -> HostRecord:
    report = HostReport.model_validate(data["report"], context=STORED)
    return HostRecord(host, report, data["registered_at"], data["last_heartbeat"])


def cluster_value(cluster: ClusterRecord) -> bytes:
    data = {
        "spec": cluster.spec.model_dump(mode="json"),
        "vni": cluster.vni,
        "node_subnet": cluster.node_subnet,
        "pod_cidr": cluster.pod_cidr,
        "service_cidr": cluster.service_cidr,
        "created_at": cluster.created_at,
        "deleting": cluster.deleting,
    }
    if cluster.vip is not None:  # a cluster made before VIPs has no key (reads as None)
        data["vip"] = cluster.vip
    return json.dumps(data, separators=(",", ":")).encode()


def cluster_record(name: str, value: bytes) -> ClusterRecord:
    data = json.loads(value)
    return ClusterRecord(
        name=name,
        spec=ClusterSpec.model_validate(data["spec"]),
        vni=data["vni"],
        node_subnet=data["node_subnet"],
        pod_cidr=data["pod_cidr"],
        service_cidr=data["service_cidr"],
        created_at=data["created_at"],
        deleting=data["deleting"],
        vip=data.get("vip"),
    )


def image_value(image: CatalogueImage) -> bytes:
    data = {"source": image.source.model_dump(mode="json"), "created_at": image.created_at}
    return json.dumps(data, separators=(",", ":")).encode()


def image_record(name: str, value: bytes) -> CatalogueImage:
    data = json.loads(value)
    return CatalogueImage(name, ImageSource.model_validate(data["source"]), data["created_at"])


def node_value(node: NodeRecord) -> bytes:
    data = {
        "role": node.role.value,
        "host": node.host,
        "address": node.address,
        "created_at": node.created_at,
        "deleting": node.deleting,
        "shape": None if node.shape is None else shape_data(node.shape),
        "generation": node.generation,
    }
    return json.dumps(data, separators=(",", ":")).encode()


def node_record(cluster: str, name: str, value: bytes) -> NodeRecord:
    data = json.loads(value)
    return NodeRecord(
        cluster,
        name,
        Role(data["role"]),
        data["host"],
        data["address"],
        data["created_at"],
        data["deleting"],
        None if data.get("shape") is None else shape_of_json(data["shape"]),
        data.get("generation", 0),
    )


def gateway_value(gateway: Gateway) -> bytes:
    return json.dumps({"address": gateway.address}).encode()


def gateway_record(cluster: str, host: str, value: bytes) -> Gateway:
    return Gateway(cluster, host, json.loads(value)["address"])


def certificate_value(certificate: HostCertificate) -> bytes:
    data = {"not_after": certificate.not_after, "generation": certificate.token_generation}
    return json.dumps(data, separators=(",", ":")).encode()


def certificate_record(value: bytes) -> HostCertificate:
    data = json.loads(value)
    return HostCertificate(data["not_after"], data["generation"])


def events_value(events: list[ClusterEvent]) -> bytes:
    return events_json(events).encode()
