"""The rollout planner: examples of each rule, then its invariants on random clusters with a
simulated zone that does what the plan says and lets nodes become Ready in random order."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.model import Role
from hostagent.zone.model import ClusterSpec
from hostagent.zone.rollout import (
    AddWorker,
    Plan,
    Recreate,
    RemoveWorker,
    RolloutNode,
    Shape,
    Target,
    plan,
    target_of,
    version_change_problem,
)

OLD = Shape("1.30.4", "lab", 2, 2048, 20)
NEW = Shape("1.31.2", "lab", 2, 2048, 20)
NOW = 1000.0


def node(name: str, shape: Shape = OLD, ready: bool = True, since: float = 0.0) -> RolloutNode:
    role = Role.MASTER if name.startswith("m") else Role.WORKER
    return RolloutNode(name, role, shape, ready, since)


def cluster(masters: int, workers: int, shape: Shape = OLD) -> list[RolloutNode]:
    return [node(f"m{i}", shape) for i in range(1, masters + 1)] + [
        node(f"w{i}", shape) for i in range(1, workers + 1)
    ]


def target(
    workers: int, shape: Shape = NEW, max_surge: int = 1, max_unavailable: int = 0
) -> Target:
    return Target(shape, shape, workers, max_surge, max_unavailable)


def test_the_first_master_is_recreated_first_and_alone() -> None:
    result = plan(target(2), cluster(3, 2), etcd_healthy=True, now=NOW)
    assert result.actions == (Recreate("m1"),)
    assert result.progress == "0/5 nodes at 1.31.2"


def test_the_next_master_waits_for_the_last_to_be_ready() -> None:
    nodes = [node("m1", NEW, ready=False, since=NOW - 5), node("m2"), node("m3")]
    result = plan(target(0), nodes, etcd_healthy=True, now=NOW)
    assert result.actions == ()
    assert result.waiting == "waiting for master m1 to become Ready"


def test_the_next_master_waits_for_etcd() -> None:
    nodes = [node("m1", NEW), node("m2"), node("m3")]
    result = plan(target(0), nodes, etcd_healthy=False, now=NOW)
    assert result.actions == () and result.waiting == "waiting for etcd to be healthy"
    assert plan(target(0), nodes, True, NOW).actions == (
        Recreate(
            "m2",
        ),
    )


def test_masters_go_in_natural_name_order() -> None:
    nodes = [node("m10"), node("m2", NEW), node("m9")]
    assert plan(target(0), nodes, True, NOW).actions == (Recreate("m9"),)


def test_workers_wait_for_the_masters() -> None:
    nodes = [node("m1", NEW), node("m2"), node("m3"), node("w1")]
    assert plan(target(1), nodes, True, NOW).actions == (Recreate("m2"),)


def test_a_worker_is_added_before_an_old_one_goes() -> None:
    nodes = [*cluster(1, 0, NEW), node("w1"), node("w2")]
    assert plan(target(2), nodes, True, NOW).actions == (AddWorker("w3"),)
    nodes.append(node("w3", NEW, ready=False, since=NOW))
    assert plan(target(2), nodes, True, NOW).actions == ()
    nodes[-1] = node("w3", NEW)
    assert plan(target(2), nodes, True, NOW).actions == (RemoveWorker("w1"),)


def test_max_unavailable_removes_first_without_surge() -> None:
    nodes = [*cluster(1, 0, NEW), node("w1"), node("w2")]
    result = plan(target(2, max_surge=0, max_unavailable=1), nodes, True, NOW)
    assert result.actions == (RemoveWorker("w1"),)


def test_an_old_worker_that_is_down_goes_first() -> None:
    nodes = [*cluster(1, 0, NEW), node("w1"), node("w2", ready=False, since=NOW - 1)]
    result = plan(target(2, max_surge=1), nodes, True, NOW)
    assert result.actions == (AddWorker("w3"), RemoveWorker("w2"))


def test_a_node_not_ready_in_time_stops_everything() -> None:
    nodes = [node("m1", NEW, ready=False, since=NOW - 601), node("m2"), node("m3"), node("w1")]
    result = plan(target(1), nodes, True, NOW)
    assert result.actions == ()
    assert result.stopped.startswith("master m1 is not Ready 601s after it was created")
    assert not result.done


def test_a_worker_being_removed_still_counts_against_surge() -> None:
    leaving = dataclasses.replace(node("w1", ready=False), removing=True)
    nodes = [*cluster(1, 0, NEW), leaving, node("w2"), node("w3", NEW)]
    result = plan(target(2), nodes, True, NOW - 1e6)
    assert result.actions == ()
    assert result.waiting == "waiting for old workers to be removed"
    assert result.progress == "2/3 nodes at 1.31.2"
    nodes.remove(leaving)
    assert plan(target(2), nodes, True, NOW).actions == (AddWorker("w4"),)


def test_a_failed_node_stops_everything() -> None:
    nodes = [*cluster(1, 0, NEW), node("w1"), dataclasses.replace(node("w2", NEW), failed=True)]
    result = plan(target(2), nodes, True, NOW)
    assert result.actions == () and "worker w2 failed" in result.stopped


def test_done_when_every_node_runs_the_target() -> None:
    result = plan(target(2), cluster(3, 2, NEW), True, NOW)
    assert result == Plan((), "5/5 nodes at 1.31.2", done=True)


def test_the_target_of_a_cluster_spec() -> None:
    spec = ClusterSpec.model_validate(
        {
            "kubernetes_version": "1.31.2",
            "masters": {"count": 3, "vcpus": 4},
            "workers": {"count": 5, "memory_mib": 4096},
        }
    )
    goal = target_of(spec, max_surge=2)
    assert goal.masters == Shape("1.31.2", "lab", 4, 2048, 20)
    assert goal.workers == Shape("1.31.2", "lab", 2, 4096, 20)
    assert (goal.worker_count, goal.max_surge, goal.max_unavailable) == (5, 2, 0)


def test_surge_and_unavailable_cannot_both_be_zero() -> None:
    with pytest.raises(ValueError, match="cannot both be 0"):
        target(1, max_surge=0, max_unavailable=0)


@pytest.mark.parametrize(
    ("current", "wanted", "running", "problem"),
    [
        ("1.30.4", "1.31.2", ["1.30.4"], None),
        ("1.30.4", "1.30.9", ["1.30.4"], None),
        ("1.30.4", "1.32.0", ["1.30.4"], "from 1.30 to 1.31, not to 1.32.0"),
        ("1.31.2", "1.30.4", ["1.31.2"], "cannot go down from 1.31.2 to 1.30.4"),
        ("1.31.2", "1.30.4", ["1.30.4", "1.31.2"], None),
        ("1.31.2", "1.32.0", ["1.30.4", "1.31.2"], "(a node still runs 1.30)"),
    ],
)
def test_version_changes(
    current: str, wanted: str, running: list[str], problem: str | None
) -> None:
    found = version_change_problem(current, wanted, running)
    assert (found is None) if problem is None else (found is not None and problem in found)


# --- the invariants, on a simulated zone ---------------------------------------------------


@dataclasses.dataclass
class Sim:
    nodes: list[RolloutNode]
    now: float = NOW

    def apply(self, result: Plan, target: Target) -> None:
        for action in result.actions:
            if isinstance(action, Recreate):
                i = next(i for i, n in enumerate(self.nodes) if n.name == action.node)
                self.nodes[i] = node(action.node, target.masters, ready=False, since=self.now)
            elif isinstance(action, AddWorker):
                assert all(n.name != action.node for n in self.nodes), "a name used twice"
                self.nodes.append(node(action.node, target.workers, ready=False, since=self.now))
            else:
                i = next(i for i, n in enumerate(self.nodes) if n.name == action.node)
                assert not self.nodes[i].removing, "a worker removed twice"
                self.nodes[i] = dataclasses.replace(self.nodes[i], removing=True, ready=False)

    def removed(self, names: set[str]) -> None:
        self.nodes = [n for n in self.nodes if not (n.removing and n.name in names)]

    def become_ready(self, names: set[str]) -> None:
        """The nodes named become Ready (a worker being removed never does)."""
        self.nodes = [
            dataclasses.replace(n, ready=True) if n.name in names and not n.removing else n
            for n in self.nodes
        ]


def check_invariants(sim: Sim, result: Plan, target: Target, start_workers: int) -> None:
    workers = [n for n in sim.nodes if n.role is Role.WORKER]
    masters_down = [n for n in sim.nodes if n.role is Role.MASTER and not n.ready]
    assert len(workers) <= max(start_workers, target.worker_count) + target.max_surge
    assert len(masters_down) <= 1, f"two masters down: {masters_down}"
    ready = sum(1 for w in workers if w.ready and not w.removing)
    assert ready >= min(start_workers, target.worker_count) - target.max_unavailable


clusters = st.tuples(
    st.sampled_from([1, 3, 5]),
    st.integers(0, 6),
    st.integers(0, 3),
    st.integers(0, 3),
).filter(lambda t: t[2] + t[3] > 0)


@settings(max_examples=200, deadline=None)
@given(shape=clusters, data=st.data())
def test_a_rollout_keeps_its_limits_and_ends_at_the_target(
    shape: tuple[int, int, int, int], data: st.DataObject
) -> None:
    """Nodes become Ready (and removed workers go) in random order and at random speed;
    once every action succeeds at once, the rollout ends within a bounded number of
    passes (two per node: a removal and an addition may each wait for one pass)."""
    masters, workers, surge, unavailable = shape
    goal = target(workers, max_surge=surge, max_unavailable=unavailable)
    sim = Sim(cluster(masters, workers))
    slow = data.draw(st.integers(0, 4 * (masters + workers)))
    for step in range(slow + 2 * (masters + workers) + 2):
        result = plan(goal, sim.nodes, etcd_healthy=True, now=sim.now)
        assert not result.stopped
        if result.done:
            break
        sim.apply(result, goal)
        check_invariants(sim, result, goal, workers)
        pending = sorted(n.name for n in sim.nodes if not n.ready)  # removals included
        chosen = set(pending)
        if step < slow and pending:
            chosen = set(data.draw(st.lists(st.sampled_from(pending), unique=True)))
        sim.removed(chosen)
        sim.become_ready(chosen)
        sim.now += 1
    else:
        pytest.fail("the rollout did not finish once every action succeeded")
    assert all(n.shape == NEW and n.ready for n in sim.nodes)
    assert sum(1 for n in sim.nodes if n.role is Role.WORKER) == workers


@settings(max_examples=100, deadline=None)
@given(shape=clusters, steps=st.integers(1, 15))
def test_putting_the_old_spec_back_rolls_back_the_same_way(
    shape: tuple[int, int, int, int], steps: int
) -> None:
    masters, workers, surge, unavailable = shape
    forward = target(workers, max_surge=surge, max_unavailable=unavailable)
    back = target(workers, OLD, max_surge=surge, max_unavailable=unavailable)
    sim = Sim(cluster(masters, workers))
    for goal, passes in ((forward, steps), (back, 20 * (masters + workers) + 10)):
        for _ in range(passes):
            result = plan(goal, sim.nodes, etcd_healthy=True, now=sim.now)
            if result.done:
                break
            sim.apply(result, goal)
            check_invariants(sim, result, goal, workers)
            sim.removed({n.name for n in sim.nodes})
            sim.become_ready({n.name for n in sim.nodes})
            sim.now += 1
    assert plan(back, sim.nodes, True, sim.now).done
    assert all(n.shape == OLD for n in sim.nodes)


@settings(max_examples=100, deadline=None)
@given(shape=clusters, data=st.data())
def test_nothing_is_touched_past_a_node_that_never_becomes_ready(
    shape: tuple[int, int, int, int], data: st.DataObject
) -> None:
    masters, workers, surge, unavailable = shape
    goal = target(workers, max_surge=surge, max_unavailable=unavailable)
    sim = Sim(cluster(masters, workers))
    doomed: str | None = None
    for _ in range(10 * (masters + workers) + 10):
        result = plan(goal, sim.nodes, etcd_healthy=True, now=sim.now)
        if result.stopped:
            assert result.actions == () and doomed is not None and doomed in result.stopped
            return
        assert not result.done or doomed is None
        if result.done:
            return
        sim.apply(result, goal)
        pending = [n.name for n in sim.nodes if not n.ready and not n.removing]
        if doomed is None and pending and data.draw(st.booleans()):
            doomed = data.draw(st.sampled_from(pending))
        sim.become_ready({n for n in pending if n != doomed})
        sim.removed({n.name for n in sim.nodes})
        sim.now += goal.ready_timeout_s / 3
    pytest.fail("the rollout neither finished nor stopped")
