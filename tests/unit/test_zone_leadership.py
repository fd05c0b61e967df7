"""The election's decisions and the report-write throttling (pure), and the mirror telling
the leader which hosts' work a watched change touched and which hosts' leases live."""

from __future__ import annotations

import json

from hostagent.model import Role
from hostagent.zone.etcd import Event
from hostagent.zone.keys import Layout, node_value
from hostagent.zone.leadership import Step, View, decide, lease_left
from hostagent.zone.liveness import lease_ttl, report_due
from hostagent.zone.mirror import Mirror
from hostagent.zone.store import NodeRecord


def view(**changes: object) -> View:
    base = {"me": "a", "leader": None, "fence": None, "lease_left_s": 3.0}
    return View(**{**base, **changes})  # type: ignore[arg-type]


def test_a_replica_campaigns_only_when_no_one_leads() -> None:
    assert decide(view()) is Step.CAMPAIGN
    assert decide(view(leader=("b", 7))) is Step.FOLLOW
    # Its own key of an earlier term (before a restart with the same id) is not a lead.
    assert decide(view(leader=("a", 7))) is Step.FOLLOW


def test_a_leader_leads_only_while_the_watch_shows_the_key_of_its_term() -> None:
    assert decide(view(leader=("a", 7), fence=7)) is Step.LEAD
    assert decide(view(leader=None, fence=7)) is Step.STEP_DOWN  # its lease expired
    assert decide(view(leader=("b", 9), fence=7)) is Step.STEP_DOWN
    assert decide(view(leader=("a", 9), fence=7)) is Step.STEP_DOWN  # another term


def test_a_lease_that_may_have_lapsed_ends_the_term_whatever_the_watch_shows() -> None:
    assert decide(view(leader=("a", 7), fence=7, lease_left_s=0.0)) is Step.RENEW
    assert decide(view(lease_left_s=-1.0)) is Step.RENEW


def test_the_lease_counts_from_when_the_renewal_was_sent() -> None:
    assert lease_left(sent_at=100.0, granted_ttl_s=5, now=103.0) == 2.0
    assert lease_left(sent_at=100.0, granted_ttl_s=5, now=106.0) < 0
    assert lease_left(sent_at=100.0, granted_ttl_s=0, now=100.0) == 0  # etcd: expired


def node(name: str, host: str) -> NodeRecord:
    return NodeRecord("demo", name, Role.WORKER, host, "10.128.0.10", "now")


def report(at: float) -> bytes:
    size = {"vcpus": 1, "memory_mib": 1024, "disk_gib": 10}
    body = {"api_url": "http://127.0.0.1:8470", "api_token": "t", "allocatable": size}
    body["allocated"] = size
    return json.dumps({"report": body, "registered_at": "then", "last_heartbeat": at}).encode()


def test_the_mirror_names_the_hosts_a_change_touches() -> None:
    layout = Layout("/z/")
    woken: list[set[str]] = []
    mirror = Mirror(layout, on_hosts=woken.append)
    mirror.apply([Event(layout.node("demo", "w1"), node_value(node("w1", "h1")), 2)])
    assert woken.pop() == {"h1"}
    # A new node of the cluster changes every serving host's peers.
    mirror.apply([Event(layout.node("demo", "w2"), node_value(node("w2", "h2")), 3)])
    assert woken.pop() == {"h1", "h2"}
    mirror.apply([Event(layout.delivery("h2", "node", "demo/w2"), b"digest", 4)])
    assert woken == []  # the leader's own record of a delivery wakes no one
    mirror.apply([Event(layout.delivery("h2", "node", "demo/w2"), None, 5)])
    assert woken.pop() == {"h2"}  # a forgotten delivery is sent again
    mirror.apply([Event(layout.host("h3"), report(100.0), 6), Event(layout.alive("h3"), b"7", 6)])
    assert woken.pop() == {"h3"}  # registered
    mirror.apply([Event(layout.host("h3"), report(160.0), 7), Event(layout.alive("h3"), b"7", 7)])
    assert woken == []  # the report written again, a minute on
    record = mirror.host("h3")
    assert record is not None and record.alive
    mirror.apply([Event(layout.alive("h3"), None, 8)])  # its lease expired
    record = mirror.host("h3")
    assert record is not None and record.alive is False
    mirror.apply([Event(layout.alive("h3"), b"9", 9)])
    assert woken.pop() == {"h3"}  # reporting again after it was NotReady
    mirror.apply([Event(layout.leader, b"a", 9)])
    assert woken == [] and mirror.leader == ("a", 9)
    mirror.apply([Event(layout.leader, None, 10)])
    assert mirror.leader is None


def test_a_report_is_written_when_it_changed_or_once_a_minute() -> None:
    stored = {"allocated": {"vcpus": 1.0}}
    assert report_due(None, stored, 0.0, 1.0, 60.0)  # the first
    assert not report_due(stored, {"allocated": {"vcpus": 1.0}}, 100.0, 159.0, 60.0)
    assert report_due(stored, {"allocated": {"vcpus": 2.0}}, 100.0, 101.0, 60.0)
    assert report_due(stored, stored, 100.0, 160.0, 60.0)


def test_a_host_lease_lasts_three_heartbeats_unless_configured() -> None:
    assert lease_ttl(None, 5.0) == 15
    assert lease_ttl(None, 0.5) == 2  # etcd's least
    assert lease_ttl(7.5, 5.0) == 8
