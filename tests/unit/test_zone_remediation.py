"""The remediation limits: examples of each rule, then its invariants over random clusters
and random sequences of nodes going bad, with the zone replacing what decide() says."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.model import Role
from hostagent.zone.remediation import Limits, NodeHealth, Remediated, budget, decide

LIMITS = Limits()
NOW = 10_000.0
LONG_AGO = NOW - 3600


def bad(name: str, since: float = LONG_AGO, reason: str = "VM not running") -> NodeHealth:
    role = Role.MASTER if name.startswith("m") else Role.WORKER
    return NodeHealth(name, role, since, reason)


def good(name: str) -> NodeHealth:
    return NodeHealth(name, Role.MASTER if name.startswith("m") else Role.WORKER)


def test_a_worker_unhealthy_long_enough_is_replaced() -> None:
    nodes = [good("m1"), bad("w1"), good("w2")]
    assert decide(nodes, [], LIMITS, NOW, False).replace == ("w1",)


def test_a_worker_unhealthy_briefly_waits() -> None:
    nodes = [good("m1"), bad("w1", since=NOW - 30)]
    decision = decide(nodes, [], LIMITS, NOW, False)
    assert decision.replace == ()
    assert decision.held == (("w1", "unhealthy for 30s of 180s"),)


def test_nothing_is_replaced_during_a_rollout_step() -> None:
    decision = decide([good("m1"), bad("w1")], [], LIMITS, NOW, rollout_step_running=True)
    assert decision.replace == () and decision.held == (("w1", "a rollout step is running"),)


@pytest.mark.parametrize(("nodes", "allowed"), [(3, 1), (10, 1), (19, 1), (20, 2), (35, 3)])
def test_the_budget_is_ten_percent_and_at_least_one(nodes: int, allowed: int) -> None:
    assert budget(nodes, LIMITS) == allowed


def test_two_bad_workers_of_three_one_is_replaced_per_window() -> None:
    nodes = [good("m1"), bad("w1", LONG_AGO), bad("w2", LONG_AGO + 1), good("w3")]
    first = decide(nodes, [], LIMITS, NOW, False)
    assert first.replace == ("w1",)
    assert first.held[0][0] == "w2" and "1 replacement(s) per 600s" in first.held[0][1]
    done = [Remediated("w1", Role.WORKER, NOW)]
    assert decide(nodes[:1] + nodes[2:], done, LIMITS, NOW + 599, False).replace == ()
    assert decide(nodes[:1] + nodes[2:], done, LIMITS, NOW + 600, False).replace == ("w2",)


def test_a_master_is_replaced_when_the_others_keep_quorum() -> None:
    nodes = [bad("m1"), good("m2"), good("m3")]
    assert decide(nodes, [], LIMITS, NOW, False).replace == ("m1",)


def test_a_master_is_not_replaced_when_quorum_is_already_gone() -> None:
    nodes = [bad("m1"), bad("m2"), good("m3")]
    decision = decide(nodes, [], Limits(max_fraction=1.0), NOW, False)
    assert decision.replace == ()
    assert "only 1 of 3 masters are healthy" in decision.held[0][1]


def test_a_single_master_is_never_replaced() -> None:
    decision = decide([bad("m1"), good("w1")], [], LIMITS, NOW, False)
    assert decision.replace == () and "needs 1 healthy" in decision.held[0][1]


def test_one_master_per_window() -> None:
    nodes = [*(bad(f"m{i}") for i in (1, 2)), *(good(f"m{i}") for i in (3, 4, 5))]
    decision = decide(nodes, [], Limits(max_fraction=1.0), NOW, False)
    assert decision.replace == ("m1",)
    assert decision.held == (("m2", "one master per 600s is replaced at most"),)


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        Limits(max_fraction=0)


# --- invariants --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    masters=st.sampled_from([1, 3, 5]),
    workers=st.integers(0, 30),
    events=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 400)), max_size=40),
    rollout=st.lists(st.booleans(), min_size=1, max_size=5),
)
def test_replacements_keep_every_limit(
    masters: int, workers: int, events: list[tuple[int, int]], rollout: list[bool]
) -> None:
    """Nodes go bad at random moments; the zone replaces what decide() says, and a replaced
    node comes back healthy. Any window holds at most the budget and one master, a master
    goes only with quorum kept, and nothing goes during a rollout step."""
    names = [f"m{i}" for i in range(1, masters + 1)] + [f"w{i}" for i in range(1, workers + 1)]
    since: dict[str, float] = {}
    history: list[Remediated] = []
    now = 0.0
    for step, (which, gap) in enumerate(events):
        now += gap
        name = names[which % len(names)]
        since.setdefault(name, now)
        nodes = [NodeHealth(n, role(n), since.get(n)) for n in names]
        running = rollout[step % len(rollout)]
        decision = decide(nodes, history, LIMITS, now, running)
        if running:
            assert decision.replace == ()
        assert set(decision.replace) | {n for n, _ in decision.held} == set(since)
        for replaced in decision.replace:
            assert now - since[replaced] >= LIMITS.unhealthy_for_s
            if role(replaced) is Role.MASTER:
                healthy = sum(1 for n in nodes if n.role is Role.MASTER and n.healthy)
                assert healthy >= masters // 2 + 1
            history.append(Remediated(replaced, role(replaced), now))
            del since[replaced]
        window = [r for r in history if now - r.at < LIMITS.window_s]
        assert len(window) <= budget(len(names), LIMITS)
        assert sum(1 for r in window if r.role is Role.MASTER) <= 1


@settings(max_examples=100, deadline=None)
@given(workers=st.integers(1, 30), broken=st.data())
def test_every_bad_worker_is_replaced_in_the_end(workers: int, broken: st.DataObject) -> None:
    names = [f"w{i}" for i in range(1, workers + 1)]
    down = set(broken.draw(st.lists(st.sampled_from(names), unique=True, min_size=1)))
    history: list[Remediated] = []
    now = LIMITS.unhealthy_for_s
    for _ in range(len(down) + 1):
        nodes = [
            good("m1"),
            *(NodeHealth(n, Role.WORKER, 0.0 if n in down else None) for n in names),
        ]
        for replaced in decide(nodes, history, LIMITS, now, False).replace:
            history.append(Remediated(replaced, Role.WORKER, now))
            down.discard(replaced)
        now += LIMITS.window_s
    assert not down


def role(name: str) -> Role:
    return Role.MASTER if name.startswith("m") else Role.WORKER
