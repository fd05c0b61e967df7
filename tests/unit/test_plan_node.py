"""hostagent.nodeplan.plan_node: desired record + observed domain -> steps, every branch."""

from __future__ import annotations

from typing import Any

import pytest

from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.nodeplan import CREATE, Step, plan_node
from hostagent.store import NodeRecord
from hostagent.virt.domain import DomainInfo, DomainMeta

KEY = NodeKey(cluster="alpha", name="m1")
SPEC = NodeSpec.model_validate(
    {
        "role": "master",
        "vcpus": 2,
        "memory_mib": 2048,
        "disk_gib": 20,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {"vni": 4242, "address": "10.42.0.11/24", "gateway": "10.42.0.1"},
    }
)
CHANGED = SPEC.model_copy(update={"vcpus": 4})


def make_record(**overrides: Any) -> NodeRecord:
    fields: dict[str, Any] = {
        "key": KEY,
        "spec": SPEC,
        "token": "tok",
        "phase": Phase.PENDING,
        "message": "",
        "updated_at": "2026-11-22T15:00:00.000000Z",
        "deleting": False,
        "guest": None,
        "domain_id": None,
    }
    fields.update(overrides)
    return NodeRecord(**fields)


def make_domain(
    *, running: bool, domain_id: int | None = None, spec: NodeSpec = SPEC
) -> DomainInfo:
    meta = DomainMeta(cluster="alpha", node="m1", host="h1", spec_hash=spec.spec_hash())
    if running and domain_id is None:
        domain_id = 7
    return DomainInfo(name=KEY.domain, meta=meta, running=running, domain_id=domain_id)


RUNNING = make_domain(running=True, domain_id=7)
STOPPED = make_domain(running=False)
CREATE_STEPS = [Step.NETWORK, Step.PREPARE, Step.DEFINE, Step.START]


def test_create_constant_is_the_order_of_creation() -> None:
    assert CREATE == CREATE_STEPS


def test_nothing_desired_nothing_there() -> None:
    assert plan_node(None, None) == []


# --- orphans: a domain of ours without a desired node -----------------------------------------


def test_orphan_running_is_destroyed_then_removed() -> None:
    assert plan_node(None, RUNNING) == [
        Step.DESTROY,
        Step.REMOVE_FILES,
        Step.CLUSTER_GONE,
        Step.UNDEFINE,
        Step.NETWORK,
    ]


def test_orphan_stopped_is_removed_its_domain_last() -> None:
    # The domain is all that remembers an orphan: it goes after the files and certificates.
    assert plan_node(None, STOPPED) == [
        Step.REMOVE_FILES,
        Step.CLUSTER_GONE,
        Step.UNDEFINE,
        Step.NETWORK,
    ]


def test_orphan_is_never_forgotten_or_created() -> None:
    for domain in (RUNNING, STOPPED):
        steps = plan_node(None, domain)
        assert Step.FORGET not in steps
        assert Step.START not in steps


# --- deleting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [Phase.DELETING, Phase.FAILED])
def test_deleting_with_running_domain_shuts_down_first(phase: Phase) -> None:
    record = make_record(deleting=True, phase=phase, domain_id=7)
    assert plan_node(record, RUNNING) == [
        Step.SHUTDOWN,
        Step.UNDEFINE,
        Step.REMOVE_FILES,
        Step.CLUSTER_GONE,
        Step.FORGET,
        Step.NETWORK,
    ]


def test_deleting_with_stopped_domain() -> None:
    record = make_record(deleting=True, phase=Phase.DELETING)
    assert plan_node(record, STOPPED) == [
        Step.UNDEFINE,
        Step.REMOVE_FILES,
        Step.CLUSTER_GONE,
        Step.FORGET,
        Step.NETWORK,
    ]


def test_deleting_without_domain() -> None:
    record = make_record(deleting=True, phase=Phase.DELETING)
    assert plan_node(record, None) == [
        Step.REMOVE_FILES,
        Step.CLUSTER_GONE,
        Step.FORGET,
        Step.NETWORK,
    ]


def test_deleting_wins_over_a_changed_spec() -> None:
    record = make_record(deleting=True, phase=Phase.DELETING, spec=CHANGED)
    steps = plan_node(record, RUNNING)
    assert Step.START not in steps
    assert steps[0] is Step.SHUTDOWN
    assert steps[-2:] == [Step.FORGET, Step.NETWORK]


# --- creating and updating --------------------------------------------------------------------


@pytest.mark.parametrize("phase", [Phase.PENDING, Phase.PROVISIONING])
def test_no_domain_means_create(phase: Phase) -> None:
    assert plan_node(make_record(phase=phase), None) == CREATE_STEPS


def test_spec_hash_changed_while_running_shuts_down_and_recreates() -> None:
    record = make_record(spec=CHANGED, phase=Phase.PENDING, domain_id=7)
    assert plan_node(record, RUNNING) == [
        Step.SHUTDOWN,
        Step.UNDEFINE,
        *CREATE_STEPS,
    ]


def test_spec_hash_changed_while_stopped_recreates() -> None:
    record = make_record(spec=CHANGED, phase=Phase.PENDING)
    assert plan_node(record, STOPPED) == [Step.UNDEFINE, *CREATE_STEPS]


@pytest.mark.parametrize("phase", [Phase.PENDING, Phase.PROVISIONING, Phase.RUNNING, Phase.READY])
def test_defined_but_not_running_is_started(phase: Phase) -> None:
    assert plan_node(make_record(phase=phase, domain_id=7), STOPPED) == [
        Step.NETWORK,
        Step.START,
    ]


@pytest.mark.parametrize("phase", [Phase.RUNNING, Phase.READY])
def test_running_matching_domain_needs_nothing(phase: Phase) -> None:
    assert plan_node(make_record(phase=phase, domain_id=7), RUNNING) == []


@pytest.mark.parametrize("recorded", [None, 6])
@pytest.mark.parametrize("phase", [Phase.RUNNING, Phase.READY])
def test_running_with_another_domain_id_is_marked_running(
    phase: Phase, recorded: int | None
) -> None:
    """The domain restarted (or the agent adopts it): record the new id."""
    assert plan_node(make_record(phase=phase, domain_id=recorded), RUNNING) == [Step.MARK_RUNNING]


@pytest.mark.parametrize("phase", [Phase.PENDING, Phase.PROVISIONING])
def test_running_domain_with_an_earlier_phase_is_marked_running(phase: Phase) -> None:
    assert plan_node(make_record(phase=phase, domain_id=7), RUNNING) == [Step.MARK_RUNNING]


def test_plan_is_repeatable_and_leaves_the_record_alone() -> None:
    record = make_record(phase=Phase.PENDING)
    assert plan_node(record, None) == plan_node(record, None) == CREATE_STEPS
    assert plan_node(record, RUNNING) == plan_node(record, RUNNING) == [Step.MARK_RUNNING]
    assert record == make_record(phase=Phase.PENDING)


def test_step_descriptions_are_unique() -> None:
    values = [step.value for step in Step]
    assert len(values) == len(set(values))


def test_start_history_stops_a_crash_loop() -> None:
    from common.errors import ProvisioningError
    from hostagent.model import NodeKey
    from hostagent.reconciler import StartHistory

    key = NodeKey(cluster="c", name="n")
    history = StartHistory(limit=3, window_s=600)
    for _ in range(3):
        history.note(key)
    with pytest.raises(ProvisioningError, match="started 3 times"):
        history.note(key)
    history.forget(key)
    history.note(key)  # a retry starts clean
    aging = StartHistory(limit=1, window_s=1e-9)
    aging.note(key)
    aging.note(key)  # the first start has left the window: no error
