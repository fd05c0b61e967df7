"""Pure: the plan of a lab's replicated zone (`lab up --zone-replicas N`): N zone replicas
and an etcd cluster of ETCD_MEMBERS, all in the root namespace on the bridge's address (a
lab address, so two labs on their own subnets never share a port), each on its own ports.

    <root>/zone/state            shared by the replicas (api-token, host-secret, CAs)
    <root>/zone/r<i>/            replica i: zone.toml, zone.log, pid (one replica: the
                                 files are in <root>/zone itself, as they always were)
    <root>/etcd/ca/              the lab's etcd CA (members' and clients' certificates)
    <root>/etcd/client/          the replicas' client certificate of etcd
    <root>/etcd/m<i>/            member i: data/, its certificate, etcd.log, pid
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ETCD_MEMBERS = 3
FIRST_ZONE_PORT = 8471  # replica i listens on FIRST_ZONE_PORT + i - 1
ETCD_CLIENT_PORT = 23790  # member i: clients on ETCD_CLIENT_PORT + i, peers ETCD_PEER_PORT + i
ETCD_PEER_PORT = 23800
MAX_REPLICAS = 9
ETCD_MAX_TXN_OPS = 2048  # docs/zone.md: etcd's default (128) fits ~40 nodes per cluster
PID_FILE = "pid"


@dataclass(frozen=True)
class ReplicaPlan:
    id: str
    address: str
    port: int
    dir: Path

    @property
    def listen(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.listen}"

    @property
    def config(self) -> Path:
        return self.dir / "zone.toml"

    @property
    def log(self) -> Path:
        return self.dir / "zone.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / PID_FILE


@dataclass(frozen=True)
class MemberPlan:
    name: str
    address: str
    client_port: int
    peer_port: int
    dir: Path

    @property
    def client_url(self) -> str:
        return f"https://{self.address}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.address}:{self.peer_port}"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log(self) -> Path:
        return self.dir / "etcd.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / PID_FILE


@dataclass(frozen=True)
class ZonePlan:
    state_dir: Path
    replicas: tuple[ReplicaPlan, ...]
    members: tuple[MemberPlan, ...]  # empty: one zone on SQLite
    etcd_dir: Path
    cluster_token: str  # etcd's --initial-cluster-token: unique per lab root

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def etcd_ca_dir(self) -> Path:
        return self.etcd_dir / "ca"

    @property
    def etcd_client_dir(self) -> Path:
        return self.etcd_dir / "client"

    def replica(self, replica_id: str) -> ReplicaPlan:
        for replica in self.replicas:
            if replica.id == replica_id:
                return replica
        raise KeyError(f"no replica {replica_id!r} (replicas: {[r.id for r in self.replicas]})")

    def member(self, name: str) -> MemberPlan:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(f"no etcd member {name!r} (members: {[m.name for m in self.members]})")


def plan_zone(root: Path, address: str, replicas: int) -> ZonePlan:
    """replicas 1: the zone as it always was (one process on SQLite, <root>/zone); more: that
    many replicas r1..rN on an etcd cluster of ETCD_MEMBERS members m1..m3."""
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"zone replicas must be 1..{MAX_REPLICAS}, not {replicas}")
    zone, etcd = root / "zone", root / "etcd"
    members = () if replicas == 1 else _members(etcd, address)
    return ZonePlan(
        state_dir=zone / "state",
        replicas=tuple(
            ReplicaPlan(f"r{i}", address, FIRST_ZONE_PORT + i - 1, zone / f"r{i}")
            for i in range(1, replicas + 1)
        )
        if replicas > 1
        else (ReplicaPlan("zone", address, FIRST_ZONE_PORT, zone),),
        members=members,
        etcd_dir=etcd,
        cluster_token=f"hostagent-lab-{address}",
    )


def _members(etcd: Path, address: str) -> tuple[MemberPlan, ...]:
    return tuple(
        MemberPlan(f"m{i}", address, ETCD_CLIENT_PORT + i, ETCD_PEER_PORT + i, etcd / f"m{i}")
        for i in range(1, ETCD_MEMBERS + 1)
    )


def etcd_argv(plan: ZonePlan, member: MemberPlan, binary: str = "etcd") -> list[str]:
    """The command line of one member: TLS for clients and peers, both asking for a
    certificate of the lab's etcd CA."""
    cert = member.dir / f"{member.name}.crt"
    key = member.dir / f"{member.name}.key"
    ca = plan.etcd_ca_dir / "ca.crt"
    cluster = ",".join(f"{m.name}={m.peer_url}" for m in plan.members)
    return [
        binary,
        f"--name={member.name}",
        f"--data-dir={member.data_dir}",
        f"--listen-client-urls={member.client_url}",
        f"--advertise-client-urls={member.client_url}",
        f"--listen-peer-urls={member.peer_url}",
        f"--initial-advertise-peer-urls={member.peer_url}",
        f"--initial-cluster={cluster}",
        "--initial-cluster-state=new",
        f"--initial-cluster-token={plan.cluster_token}",
        f"--cert-file={cert}",
        f"--key-file={key}",
        f"--trusted-ca-file={ca}",
        "--client-cert-auth",
        f"--peer-cert-file={cert}",
        f"--peer-key-file={key}",
        f"--peer-trusted-ca-file={ca}",
        "--peer-client-cert-auth",
        f"--max-txn-ops={ETCD_MAX_TXN_OPS}",
        "--auto-compaction-retention=1",
        "--logger=zap",
        "--log-level=warn",
    ]
