"""hostagent.zone.placement: capacity with QEMU overhead, all or nothing, masters across
failure domains and hosts, workers spread, determinism, and random inputs."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from bench.placement import naive
from hostagent.capacity import Resources
from hostagent.errors import OutOfCapacity
from hostagent.model import Role
from hostagent.zone.placement import HostOffer, NodeRequest, Placement, PlacementError, place

MASTER, WORKER = Role.MASTER, Role.WORKER
# A 2048 MiB node costs 2048 + 192 + 16 * 2 = 2272 MiB under the default overhead.
COST_2G = 2272


def host(
    id: str,
    domain: str = "rack-1",
    vcpus: float = 16,
    memory_mib: int = 32768,
    disk_gib: int = 500,
    has_image: bool = False,
    **overhead: int,
) -> HostOffer:
    resources = Resources(vcpus, memory_mib, disk_gib)
    return HostOffer(id, domain, resources, **overhead, has_image=has_image)


def node(
    name: str, role: Role = WORKER, *, vcpus: int = 2, memory_mib: int = 2048, disk_gib: int = 20
) -> NodeRequest:
    return NodeRequest(name, role, vcpus, memory_mib, disk_gib)


def workers(count: int) -> list[NodeRequest]:
    return [node(f"w{i}") for i in range(1, count + 1)]


def masters(count: int) -> list[NodeRequest]:
    return [node(f"m{i}", MASTER) for i in range(1, count + 1)]


def per_host(placement: Placement) -> Counter[str]:
    return Counter(placement.assignments.values())


# --- capacity --------------------------------------------------------------------------------


def test_memory_includes_the_hosts_qemu_overhead() -> None:
    exact = host("h1", memory_mib=COST_2G)
    assert place([node("w1")], [exact]).assignments == {"w1": "h1"}
    with pytest.raises(PlacementError):
        place([node("w1")], [host("h1", memory_mib=COST_2G - 1)])
    # The overhead is the host's own: without any, 2048 MiB is enough.
    bare = host("h1", memory_mib=2048, overhead_base_mib=0, overhead_per_gib_mib=0)
    assert place([node("w1")], [bare]).assignments == {"w1": "h1"}


def test_nodes_placed_earlier_in_the_same_call_use_up_the_host() -> None:
    hosts = [host("h1", vcpus=4, memory_mib=2 * COST_2G), host("h2", vcpus=2)]
    got = place(workers(3), hosts)
    assert per_host(got) == {"h1": 2, "h2": 1}
    with pytest.raises(PlacementError, match="had room before the 3 nodes placed ahead") as exc:
        place(workers(4), hosts)
    assert exc.value.nodes == ("w4",)


def test_vcpus_and_disk_are_limits_too() -> None:
    hosts = [host("h1", vcpus=1.5), host("h2", disk_gib=19), host("h3", vcpus=2.0, disk_gib=20)]
    assert place([node("w1")], hosts).assignments == {"w1": "h3"}
    with pytest.raises(PlacementError):
        place(workers(2), hosts)


def test_a_node_larger_than_every_host_names_the_resource_and_hosts() -> None:
    hosts = [host(f"h{i}", memory_mib=1024 + i) for i in range(1000)]
    with pytest.raises(PlacementError) as exc:
        place([node("w1", memory_mib=8192)], hosts)
    message = str(exc.value)
    # 8192 + 192 + 16 * 8
    assert "memory_mib: 1000 hosts have less than 8512 MiB free" in message
    assert "(largest 2023 MiB on h999)" in message
    assert "w1" in message and "vcpus" not in message
    assert isinstance(exc.value, OutOfCapacity)  # the API's 507


def test_few_hosts_are_listed_one_by_one() -> None:
    hosts = [host("h1", disk_gib=10), host("h2", disk_gib=15, vcpus=1)]
    with pytest.raises(PlacementError) as exc:
        place([node("w1")], hosts)
    message = str(exc.value)
    assert "disk_gib: needs 20 GiB, free: h1 10 GiB, h2 15 GiB" in message
    assert "vcpus: needs 2, free: h2 1" in message
    assert "2 hosts (1 failure domain)" in message


def test_no_hosts_at_all() -> None:
    with pytest.raises(PlacementError, match="no host was offered"):
        place([node("w1")], [])
    assert place([], []) == Placement({}, ())


def test_all_or_nothing_names_only_the_nodes_that_found_no_room() -> None:
    nodes = [*workers(2), node("w3", memory_mib=65536)]
    with pytest.raises(PlacementError) as exc:
        place(nodes, [host("h1"), host("h2")])
    assert exc.value.nodes == ("w3",)
    assert str(exc.value).startswith("cannot place 1 of 3 nodes, none assigned:")


def test_many_failures_are_summarised() -> None:
    with pytest.raises(PlacementError) as exc:
        place(workers(20), [host("h1", vcpus=6)])
    assert exc.value.nodes == tuple(f"w{i}" for i in range(4, 21))
    assert "workers w4, w5, w6, ..., w20 (17 nodes, each 2 vCPU" in str(exc.value)


# --- masters ---------------------------------------------------------------------------------


def test_three_masters_take_three_failure_domains() -> None:
    # rack-a's hosts have the most memory: spreading by memory alone would stack them there.
    hosts = [
        host("a1", "rack-a", memory_mib=65536),
        host("a2", "rack-a", memory_mib=65536),
        host("b1", "rack-b"),
        host("b2", "rack-b"),
        host("c1", "rack-c"),
    ]
    got = place(masters(3), hosts)
    domains = {h.id: h.failure_domain for h in hosts}
    assert {domains[h] for h in got.assignments.values()} == {"rack-a", "rack-b", "rack-c"}
    assert got.warnings == ()


def test_three_masters_in_two_failure_domains_still_take_three_hosts() -> None:
    hosts = [host("h1", "rack-1"), host("h2", "rack-1"), host("h3", "rack-2")]
    got = place(masters(3), hosts)
    assert len(set(got.assignments.values())) == 3
    assert len(got.warnings) == 1
    assert "shares failure domain rack-1" in got.warnings[0]
    assert "every failure domain offered already has one" in got.warnings[0]


def test_three_masters_on_two_hosts_share_one_with_a_warning() -> None:
    got = place(masters(3), [host("h1", "rack-1"), host("h2", "rack-2")])
    assert sorted(per_host(got).values()) == [1, 2]
    assert any("shares host" in w for w in got.warnings)


def test_three_masters_on_two_hosts_without_room_for_two() -> None:
    with pytest.raises(PlacementError) as exc:
        place(masters(3), [host("h1", "rack-1", vcpus=3), host("h2", "rack-2", vcpus=3)])
    assert exc.value.nodes == ("m3",)


def test_masters_prefer_a_domain_without_a_master_over_memory() -> None:
    hosts = [host("h1", "rack-1", memory_mib=65536), host("h2", "rack-2", memory_mib=COST_2G)]
    got = place(masters(2), hosts)
    assert got.assignments == {"m1": "h1", "m2": "h2"}


def test_a_master_shares_a_domain_only_when_the_free_domains_are_full() -> None:
    hosts = [host("h1", "rack-1"), host("h2", "rack-1"), host("h3", "rack-2", memory_mib=100)]
    got = place(masters(2), hosts)
    assert set(got.assignments.values()) == {"h1", "h2"}
    assert "no failure domain without one has room for it (rack-2)" in got.warnings[0]


def test_masters_avoid_hosts_and_domains_with_a_placed_master() -> None:
    hosts = [host("h1", "rack-1", memory_mib=65536), host("h2", "rack-2"), host("h3", "rack-3")]
    placed = {"m1": (MASTER, "h1"), "w1": (WORKER, "h2")}
    got = place([node("m2", MASTER), node("m3", MASTER)], hosts, placed)
    assert sorted(got.assignments.values()) == ["h2", "h3"]
    assert got.warnings == ()


def test_masters_are_placed_before_workers() -> None:
    # Only h1 fits a master; a worker placed first would take it (it has the most memory).
    hosts = [host("h1", memory_mib=9000), host("h2", memory_mib=COST_2G)]
    nodes = [node("w1"), node("m1", MASTER, memory_mib=6000)]
    assert place(nodes, hosts).assignments == {"m1": "h1", "w1": "h2"}


# --- workers ---------------------------------------------------------------------------------


def test_workers_spread_evenly() -> None:
    got = place(workers(6), [host("h1"), host("h2"), host("h3")])
    assert per_host(got) == {"h1": 2, "h2": 2, "h3": 2}


def test_scale_up_counts_the_placed_nodes() -> None:
    placed = {f"w{i}": (WORKER, "h1") for i in range(1, 5)}
    new = [node(f"w{i}") for i in range(5, 9)]
    got = place(new, [host("h1"), host("h2"), host("h3")], placed)
    assert per_host(got) == {"h2": 2, "h3": 2}


def test_placed_nodes_on_hosts_not_offered_are_ignored() -> None:
    placed = {"m1": (MASTER, "gone"), "w1": (WORKER, "gone")}
    got = place([node("m2", MASTER)], [host("h1")], placed)
    assert got == Placement({"m2": "h1"}, ())


def test_workers_tie_break_by_free_memory_then_host_id() -> None:
    hosts = [host("h2", memory_mib=8000), host("h3", memory_mib=9000), host("h1", memory_mib=8000)]
    assert place([node("w1")], hosts).assignments == {"w1": "h3"}
    equal = [host("h3"), host("h2"), host("h1")]
    assert place([node("w1")], equal).assignments == {"w1": "h1"}


def test_a_host_holding_the_image_wins_a_tie_before_memory_and_id() -> None:
    hosts = [host("h1", memory_mib=64000), host("h2", has_image=True), host("h3")]
    assert place([node("w1")], hosts).assignments == {"w1": "h2"}
    # ... but spreading comes first: the second worker goes to the roomiest other host
    assert place(workers(2), hosts).assignments == {"w1": "h2", "w2": "h1"}


def test_masters_keep_their_domains_over_a_host_holding_the_image() -> None:
    hosts = [host("h1", "rack-1", has_image=True), host("h2", "rack-1", has_image=True)]
    hosts.append(host("h3", "rack-2"))
    got = place(masters(2), hosts).assignments
    assert got == {"m1": "h1", "m2": "h3"}  # m1: the image breaks the tie; m2: rack-2


def test_memory_after_the_node_counts_the_hosts_own_overhead() -> None:
    heavy = host("h1", memory_mib=10000, overhead_base_mib=2000)
    light = host("h2", memory_mib=9000)
    assert place([node("w1")], [heavy, light]).assignments == {"w1": "h2"}


def test_nodes_go_in_natural_name_order() -> None:
    # One slot with room for one node: w2 comes before w10 and takes it.
    hosts = [host("h1", vcpus=2)]
    with pytest.raises(PlacementError) as exc:
        place([node("w10"), node("w2")], hosts)
    assert exc.value.nodes == ("w10",)


# --- determinism and input -------------------------------------------------------------------


def test_same_result_whatever_the_order_of_hosts() -> None:
    rng = random.Random(3)
    hosts = [
        host(f"h{i}", f"rack-{i % 2}", memory_mib=rng.choice([8192, 16384])) for i in range(12)
    ]
    nodes = [*masters(3), *workers(20)]
    first = place(nodes, hosts)
    for _ in range(20):
        rng.shuffle(hosts)
        rng.shuffle(nodes)
        assert place(nodes, hosts) == first
    assert first.warnings  # two domains for three masters


@pytest.mark.parametrize(
    ("nodes", "hosts", "placed", "message"),
    [
        ([node("w1")], [host("h1"), host("h1")], {}, "duplicate host id"),
        ([node("w1"), node("w1")], [host("h1")], {}, "duplicate node name"),
        ([node("w1")], [host("h1")], {"w1": (WORKER, "h1")}, "already placed"),
        ([node("w1", memory_mib=0)], [host("h1")], {}, "must be positive"),
    ],
)
def test_malformed_input(
    nodes: list[NodeRequest],
    hosts: list[HostOffer],
    placed: dict[str, tuple[Role, str]],
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        place(nodes, hosts, placed)


# --- random inputs ---------------------------------------------------------------------------


def random_case(
    rng: random.Random,
) -> tuple[list[NodeRequest], list[HostOffer], dict[str, tuple[Role, str]]]:
    hosts = [
        HostOffer(
            f"h{i}",
            f"d{rng.randrange(rng.randint(1, 4))}",
            Resources(rng.choice([0, 1.5, 4, 8, 16]), rng.randrange(0, 20000), rng.randrange(60)),
            rng.choice([0, 192, 300]),
            rng.choice([0, 16]),
        )
        for i in range(rng.randint(0, 12))
    ]
    nodes = [
        NodeRequest(
            f"{'m' if role == MASTER else 'w'}{i}",
            role,
            rng.randint(1, 4),
            rng.randint(256, 6000),
            rng.randint(0, 20),
        )
        for role, count in ((MASTER, rng.choice([0, 1, 3, 5])), (WORKER, rng.randint(0, 15)))
        for i in range(1, count + 1)
    ]
    placed: dict[str, tuple[Role, str]] = {}
    for i in range(rng.randint(0, 4)):
        where = rng.choice([h.id for h in hosts] + ["gone"])
        placed[f"old{i}"] = (rng.choice([MASTER, WORKER]), where)
    return nodes, hosts, placed


def check_valid(
    got: Placement,
    nodes: list[NodeRequest],
    hosts: list[HostOffer],
    placed: dict[str, tuple[Role, str]],
) -> None:
    by_id = {h.id: h for h in hosts}
    assert got.assignments.keys() == {n.name for n in nodes}
    used = {h.id: [0.0, 0, 0] for h in hosts}
    for n in nodes:
        h = by_id[got.assignments[n.name]]
        used[h.id][0] += n.vcpus
        used[h.id][1] += n.memory_mib + h.overhead_base_mib
        used[h.id][1] += h.overhead_per_gib_mib * -(-n.memory_mib // 1024)
        used[h.id][2] += n.disk_gib
    for h in hosts:
        vcpus, memory, disk = used[h.id]
        assert vcpus <= h.free.vcpus and memory <= h.free.memory_mib and disk <= h.free.disk_gib
    new = [got.assignments[n.name] for n in nodes if n.role == MASTER]
    old = [h for role, h in placed.values() if role == MASTER and h in by_id]
    # One warning per new master that joined a failure domain which already had a master.
    new_in = Counter(by_id[h].failure_domain for h in new)
    old_in = Counter(by_id[h].failure_domain for h in old)
    joined = sum(count - (0 if old_in[domain] else 1) for domain, count in new_in.items())
    assert len(got.warnings) == joined


@pytest.mark.parametrize("seed", range(300))
def test_random_inputs_never_overcommit(seed: int) -> None:
    rng = random.Random(seed)
    nodes, hosts, placed = random_case(rng)
    try:
        got = place(nodes, hosts, placed)
    except PlacementError as exc:
        assert exc.nodes
        assert set(exc.nodes) <= {n.name for n in nodes}
        assert all(name in str(exc) for name in exc.nodes[:3])
        return
    check_valid(got, nodes, hosts, placed)
    rng.shuffle(hosts)
    assert place(nodes, hosts, placed) == got


@pytest.mark.parametrize("seed", range(100))
def test_random_inputs_agree_with_the_naive_reference(seed: int) -> None:
    nodes, hosts, _ = random_case(random.Random(seed))
    try:
        got = place(nodes, hosts).assignments
    except PlacementError:
        got = None
    try:
        expected: dict[str, str] | None = naive(nodes, hosts)  # nodes come in processing order
    except RuntimeError:
        expected = None
    assert got == expected
