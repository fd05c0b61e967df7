"""The plan of a lab's zone (pure): one replica keeps the lab's files as they always were;
more replicas each get their own port and directory, on a 3-member etcd cluster whose
members ask clients and peers for certificates."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent.lab.haplan import etcd_argv, plan_zone

ROOT = Path("/var/lib/lab")


def test_one_replica_is_the_zone_as_it_was() -> None:
    plan = plan_zone(ROOT, "10.250.0.1", 1)
    (zone,) = plan.replicas
    assert plan.members == ()
    assert zone.config == ROOT / "zone" / "zone.toml"
    assert zone.pid_file == ROOT / "zone" / "pid"
    assert plan.urls == ["https://10.250.0.1:8471"]


def test_replicas_and_members_get_their_own_ports_and_directories() -> None:
    plan = plan_zone(ROOT, "10.254.14.1", 3)
    assert plan.urls == [f"https://10.254.14.1:{p}" for p in (8471, 8472, 8473)]
    assert [r.dir for r in plan.replicas] == [ROOT / "zone" / f"r{i}" for i in (1, 2, 3)]
    assert plan.state_dir == ROOT / "zone" / "state"  # shared: api-token, CAs
    assert plan.endpoints == [f"https://10.254.14.1:{p}" for p in (23791, 23792, 23793)]
    ports = [r.port for r in plan.replicas]
    ports += [p for m in plan.members for p in (m.client_port, m.peer_port)]
    assert len(set(ports)) == len(ports)
    assert plan.replica("r2").listen == "10.254.14.1:8472"
    with pytest.raises(KeyError, match="r4"):
        plan.replica("r4")


def test_every_member_asks_for_certificates_of_the_lab_etcd_ca() -> None:
    plan = plan_zone(ROOT, "10.254.14.1", 3)
    args = etcd_argv(plan, plan.member("m2"))
    assert "--client-cert-auth" in args and "--peer-client-cert-auth" in args
    assert f"--trusted-ca-file={ROOT}/etcd/ca/ca.crt" in args
    assert f"--peer-trusted-ca-file={ROOT}/etcd/ca/ca.crt" in args
    assert "--listen-client-urls=https://10.254.14.1:23792" in args
    cluster = next(a for a in args if a.startswith("--initial-cluster="))
    assert cluster.count("https://") == 3
    assert f"--data-dir={ROOT}/etcd/m2/data" in args


@pytest.mark.parametrize("replicas", [0, 10])
def test_replica_count_is_bounded(replicas: int) -> None:
    with pytest.raises(ValueError, match="zone replicas"):
        plan_zone(ROOT, "10.250.0.1", replicas)
