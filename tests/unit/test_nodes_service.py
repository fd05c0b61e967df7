"""hostagent.nodes.NodeService with a real Store and image folder: PUT, DELETE, phone-home."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import HostAgentError
from hostagent.capacity import Resources
from hostagent.config import CapacityConfig, Config
from hostagent.errors import (
    Conflict,
    Invalid,
    MalformedRequest,
    NotFound,
    OutOfCapacity,
    Unauthorized,
)
from hostagent.images import ImageCatalog
from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.nodes import NodeService, parse_key, parse_spec
from hostagent.store import NodeRecord, Store

M1 = NodeKey(cluster="alpha", name="m1")
W1 = NodeKey(cluster="alpha", name="w1")
B1 = NodeKey(cluster="beta", name="m1")
MANIFEST = {
    "name": "lab",
    "kernel": "vmlinuz",
    "initrd": "initrd.img",
    "disk": "disk.qcow2",
    "cmdline": "x",
    "recipe": "r",
    "created_at": "t",
}
CAPACITY = CapacityConfig(
    reserved_vcpus=0,
    reserved_memory_mib=0,
    reserved_disk_gib=0,
    vcpu_ratio=1.0,
    qemu_overhead_base_mib=0,
    qemu_overhead_per_gib_mib=0,
)
BIG_HOST = Resources(vcpus=64, memory_mib=256 * 1024, disk_gib=4096)


def make_spec(
    *,
    role: str = "master",
    vcpus: int = 2,
    memory_mib: int = 2048,
    disk_gib: int = 20,
    image: str = "lab",
    vni: int = 4242,
    address: str = "10.42.0.11/24",
    gateway: str = "10.42.0.1",
    mtu: int = 1450,
    **extra: Any,
) -> NodeSpec:
    data: dict[str, Any] = {
        "role": role,
        "vcpus": vcpus,
        "memory_mib": memory_mib,
        "disk_gib": disk_gib,
        "image": image,
        "kubernetes_version": "1.31.2",
        "network": {"vni": vni, "address": address, "gateway": gateway, "mtu": mtu},
        **extra,
    }
    return NodeSpec.model_validate(data)


SPEC = make_spec()
WORKER = make_spec(role="worker", address="10.42.0.21/24")
BETA = make_spec(vni=4343, address="10.43.0.11/24", gateway="10.43.0.1")


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    lab = root / "lab"
    lab.mkdir(parents=True)
    (lab / "image.json").write_text(json.dumps(MANIFEST))
    for name in ("vmlinuz", "initrd.img", "disk.qcow2"):
        (lab / name).touch()
    return root


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "state" / "state.db")
    yield store
    store.close()


@pytest.fixture
def notified() -> list[NodeKey]:
    return []


ServiceFactory = Callable[[Resources], NodeService]


@pytest.fixture
def make_service(
    tmp_path: Path, store: Store, image_dir: Path, notified: list[NodeKey]
) -> ServiceFactory:
    config = Config(
        host_id="h1", state_dir=tmp_path / "state", image_dir=image_dir, capacity=CAPACITY
    )

    def make(physical: Resources) -> NodeService:
        return NodeService(config, store, ImageCatalog(image_dir), physical, notified.append)

    return make


@pytest.fixture
def service(make_service: ServiceFactory) -> NodeService:
    return make_service(BIG_HOST)


Snapshot = tuple[list[NodeRecord], list[list[tuple[Phase, str]]]]


def snapshot(store: Store) -> Snapshot:
    records = store.all()
    keys = [M1, W1, B1, *(r.key for r in records)]
    return records, [[(t.phase, t.message) for t in store.transitions(k)] for k in keys]


async def assert_rejected(
    service: NodeService,
    notified: list[NodeKey],
    error: type[HostAgentError],
    key: NodeKey,
    spec: NodeSpec,
    match: str | None = None,
) -> HostAgentError:
    """The PUT fails with `error` and changes nothing: no record, no transition, no notify."""
    before = snapshot(service.store)
    calls = len(notified)
    with pytest.raises(error, match=match) as exc:
        await service.put(key, spec)
    assert snapshot(service.store) == before
    assert len(notified) == calls
    return exc.value


# --- put --------------------------------------------------------------------------------------


async def test_put_creates_a_pending_node(service: NodeService, notified: list[NodeKey]) -> None:
    node, created = await service.put(M1, SPEC)
    assert created is True
    assert (node.cluster, node.name) == ("alpha", "m1")
    assert node.spec == SPEC
    assert node.status.phase is Phase.PENDING
    assert node.status.domain == "alpha-m1"
    assert notified == [M1]
    record = service.store.get(M1)
    assert record is not None
    assert len(record.token) >= 32  # a real secret for phone-home


async def test_tokens_differ_per_node(service: NodeService) -> None:
    await service.put(M1, SPEC)
    await service.put(W1, WORKER)
    tokens = {r.token for r in service.store.all()}
    assert len(tokens) == 2


async def test_put_same_spec_again_changes_nothing(
    service: NodeService, notified: list[NodeKey]
) -> None:
    first, _ = await service.put(M1, SPEC)
    before = snapshot(service.store)
    node, created = await service.put(M1, make_spec())  # equal, not identical
    assert created is False
    assert node == first
    assert snapshot(service.store) == before
    assert notified == [M1]


async def test_put_changed_spec_updates_and_notifies(
    service: NodeService, notified: list[NodeKey]
) -> None:
    await service.put(M1, SPEC)
    await service.store.set_phase(M1, Phase.READY)
    bigger = make_spec(vcpus=4, disk_gib=30)
    node, created = await service.put(M1, bigger)
    assert created is False
    assert node.spec == bigger
    assert node.status.phase is Phase.PENDING
    assert notified == [M1, M1]
    assert [t.message for t in service.store.transitions(M1)][-1] == "spec changed"


async def test_put_cannot_change_role(service: NodeService, notified: list[NodeKey]) -> None:
    await service.put(M1, SPEC)
    error = await assert_rejected(service, notified, Conflict, M1, make_spec(role="worker"))
    assert "role" in str(error)


async def test_put_cannot_shrink_the_disk(service: NodeService, notified: list[NodeKey]) -> None:
    await service.put(M1, SPEC)
    await assert_rejected(service, notified, Invalid, M1, make_spec(disk_gib=19), "disk_gib")


async def test_put_can_grow_the_disk(service: NodeService) -> None:
    await service.put(M1, SPEC)
    node, _ = await service.put(M1, make_spec(disk_gib=21))
    assert node.spec.disk_gib == 21


async def test_put_unknown_image(service: NodeService, notified: list[NodeKey]) -> None:
    error = await assert_rejected(service, notified, Invalid, M1, make_spec(image="nope"))
    assert "'nope'" in str(error)
    assert "lab" in str(error)  # names what is known


async def test_put_image_with_missing_files_is_unknown(
    service: NodeService, notified: list[NodeKey], image_dir: Path
) -> None:
    half = image_dir / "half"
    half.mkdir()
    (half / "image.json").write_text(json.dumps({**MANIFEST, "name": "half"}))
    (half / "vmlinuz").touch()  # no initrd, no disk: an unfinished build
    await assert_rejected(service, notified, Invalid, M1, make_spec(image="half"), "'half'")


async def test_put_on_a_deleting_node_is_a_conflict(
    service: NodeService, notified: list[NodeKey]
) -> None:
    await service.put(M1, SPEC)
    await service.delete(M1)
    await assert_rejected(service, notified, Conflict, M1, SPEC, "being deleted")
    await assert_rejected(service, notified, Conflict, M1, make_spec(vcpus=3), "being deleted")


async def test_put_same_spec_on_a_failed_node_retries(
    service: NodeService, notified: list[NodeKey]
) -> None:
    await service.put(M1, SPEC)
    await service.store.set_phase(M1, Phase.FAILED, "creating the node failed")
    node, created = await service.put(M1, SPEC)
    assert created is False
    assert node.status.phase is Phase.PENDING
    assert notified == [M1, M1]
    assert service.store.transitions(M1)[-1].phase is Phase.PENDING


# --- capacity ---------------------------------------------------------------------------------


async def test_put_that_can_never_fit_is_invalid(
    make_service: ServiceFactory, notified: list[NodeKey]
) -> None:
    service = make_service(Resources(vcpus=4, memory_mib=4096, disk_gib=100))
    await assert_rejected(service, notified, Invalid, M1, make_spec(memory_mib=8192), "memory_mib")
    await assert_rejected(service, notified, Invalid, M1, make_spec(vcpus=5), "vcpus")
    await assert_rejected(service, notified, Invalid, M1, make_spec(disk_gib=101), "disk_gib")


async def test_put_that_does_not_fit_now_is_out_of_capacity(
    make_service: ServiceFactory, notified: list[NodeKey]
) -> None:
    service = make_service(Resources(vcpus=4, memory_mib=4096, disk_gib=100))
    await service.put(M1, SPEC)
    await service.put(W1, WORKER)  # exactly full: 4 vCPUs, 4096 MiB
    third = make_spec(role="worker", address="10.42.0.22/24", vcpus=1, memory_mib=64)
    error = await assert_rejected(
        service, notified, OutOfCapacity, NodeKey(cluster="alpha", name="w2"), third
    )
    assert "vcpus" in str(error)


async def test_puts_at_the_same_time_cannot_overbook_the_host(
    make_service: ServiceFactory,
) -> None:
    """Each fits alone, not both: the check and the write share one transaction."""
    service = make_service(Resources(vcpus=4, memory_mib=4096, disk_gib=100))
    results = await asyncio.gather(
        service.put(M1, SPEC),
        service.put(W1, make_spec(role="worker", address="10.42.0.21/24", vcpus=3)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, OutOfCapacity) for r in results) == 1
    assert len(service.all()) == 1


async def test_growing_a_node_counts_only_the_others(make_service: ServiceFactory) -> None:
    service = make_service(Resources(vcpus=4, memory_mib=4096, disk_gib=100))
    await service.put(M1, SPEC)
    node, _ = await service.put(M1, make_spec(vcpus=4, memory_mib=4096))  # replaces its own share
    assert node.spec.vcpus == 4


async def test_deleted_node_frees_capacity(make_service: ServiceFactory) -> None:
    service = make_service(Resources(vcpus=2, memory_mib=2048, disk_gib=100))
    await service.put(M1, SPEC)
    with pytest.raises(OutOfCapacity):
        await service.put(W1, WORKER)
    await service.store.remove(M1)  # what the reconciler does once the node is gone
    assert (await service.put(W1, WORKER))[1] is True


async def test_allocated(service: NodeService) -> None:
    await service.put(M1, SPEC)
    await service.put(W1, WORKER)
    assert service.allocated() == Resources(4, 4096, 40)


# --- network ----------------------------------------------------------------------------------


async def test_same_cluster_shares_one_network(service: NodeService) -> None:
    await service.put(M1, SPEC)
    assert (await service.put(W1, WORKER))[1] is True


@pytest.mark.parametrize(
    "network",
    [
        {"vni": 4243},
        {"gateway": "10.42.0.254"},
        {"address": "10.42.0.21/25"},  # same gateway, other prefix
        {"mtu": 1400},
    ],
)
async def test_same_cluster_different_network_is_a_conflict(
    service: NodeService, notified: list[NodeKey], network: dict[str, Any]
) -> None:
    await service.put(M1, SPEC)
    spec = make_spec(**{"role": "worker", "address": "10.42.0.21/24", **network})
    error = await assert_rejected(service, notified, Conflict, W1, spec)
    assert "cluster alpha already uses vni 4242" in str(error)


async def test_other_cluster_same_vni_is_a_conflict(
    service: NodeService, notified: list[NodeKey]
) -> None:
    await service.put(M1, SPEC)
    spec = make_spec(vni=4242, address="10.43.0.11/24", gateway="10.43.0.1")
    await assert_rejected(
        service, notified, Conflict, B1, spec, "vni 4242 belongs to cluster alpha"
    )


@pytest.mark.parametrize(
    ("address", "gateway"),
    [("10.42.0.11/24", "10.42.0.1"), ("10.42.0.77/25", "10.42.0.1"), ("10.42.1.5/16", "10.42.0.1")],
)
async def test_other_cluster_overlapping_subnet_is_a_conflict(
    service: NodeService, notified: list[NodeKey], address: str, gateway: str
) -> None:
    await service.put(M1, SPEC)
    spec = make_spec(vni=4343, address=address, gateway=gateway)
    await assert_rejected(service, notified, Conflict, B1, spec, "overlaps")


async def test_other_cluster_disjoint_subnet_is_fine(service: NodeService) -> None:
    await service.put(M1, SPEC)
    assert (await service.put(B1, BETA))[1] is True


async def test_duplicate_address_is_a_conflict(
    service: NodeService, notified: list[NodeKey]
) -> None:
    await service.put(M1, SPEC)
    spec = make_spec(role="worker", address="10.42.0.11/24")
    await assert_rejected(service, notified, Conflict, W1, spec, "10.42.0.11/24 is already used")


async def test_a_node_may_keep_its_own_address(service: NodeService) -> None:
    await service.put(M1, SPEC)
    node, _ = await service.put(M1, make_spec(vcpus=3))
    assert node.spec.network.address == "10.42.0.11/24"


async def test_two_nodes_cannot_share_one_libvirt_domain_name(
    service: NodeService, notified: list[NodeKey]
) -> None:
    """alpha-x/m1 and alpha/x-m1 are both the domain alpha-x-m1: the second must be refused,
    or reconciling it would shut down and redefine the first one's VM."""
    first = NodeKey(cluster="alpha-x", name="m1")
    second = NodeKey(cluster="alpha", name="x-m1")
    assert first.domain == second.domain
    await service.put(first, SPEC)
    await assert_rejected(service, notified, Conflict, second, BETA)


# --- delete -----------------------------------------------------------------------------------


async def test_delete_marks_deleting_and_notifies(
    service: NodeService, notified: list[NodeKey]
) -> None:
    await service.put(M1, SPEC)
    node = await service.delete(M1)
    assert node.status.phase is Phase.DELETING
    record = service.store.get(M1)
    assert record is not None and record.deleting
    assert notified == [M1, M1]


async def test_delete_unknown_node(service: NodeService, notified: list[NodeKey]) -> None:
    with pytest.raises(NotFound, match="alpha/m1"):
        await service.delete(M1)
    assert notified == []
    assert service.store.all() == []


async def test_delete_again_after_a_failed_delete_retries(service: NodeService) -> None:
    await service.put(M1, SPEC)
    await service.delete(M1)
    await service.store.set_phase(M1, Phase.FAILED, "deleting the node failed")
    assert (await service.delete(M1)).status.phase is Phase.DELETING


async def test_delete_twice_keeps_one_transition(service: NodeService) -> None:
    await service.put(M1, SPEC)
    await service.delete(M1)
    count = len(service.store.transitions(M1))
    assert (await service.delete(M1)).status.phase is Phase.DELETING
    assert len(service.store.transitions(M1)) == count


# --- get / all --------------------------------------------------------------------------------


async def test_get_and_all(service: NodeService) -> None:
    await service.put(W1, WORKER)
    await service.put(M1, SPEC)
    assert service.get(M1).spec == SPEC
    assert [(n.cluster, n.name) for n in service.all()] == [("alpha", "m1"), ("alpha", "w1")]
    with pytest.raises(NotFound):
        service.get(B1)


# --- phone home -------------------------------------------------------------------------------


def token_of(service: NodeService, key: NodeKey) -> str:
    record = service.store.get(key)
    assert record is not None
    return record.token


@pytest.mark.parametrize("token", [None, "", "wrong", "0" * 32])
async def test_phone_home_with_wrong_or_missing_token(
    service: NodeService, token: str | None
) -> None:
    await service.put(M1, SPEC)
    before = snapshot(service.store)
    with pytest.raises(Unauthorized):
        await service.phone_home(M1, token, b"{}")
    assert snapshot(service.store) == before


async def test_phone_home_with_another_nodes_token(service: NodeService) -> None:
    await service.put(M1, SPEC)
    await service.put(W1, WORKER)
    with pytest.raises(Unauthorized):
        await service.phone_home(M1, token_of(service, W1), b"{}")


async def test_phone_home_for_unknown_node_is_unauthorized(service: NodeService) -> None:
    with pytest.raises(Unauthorized):
        await service.phone_home(M1, "anything", b"{}")


async def test_phone_home_moves_to_ready_and_stores_the_report(service: NodeService) -> None:
    await service.put(M1, SPEC)
    report = {"hostname": "alpha-m1", "kubelet": "1.31.2"}
    node = await service.phone_home(M1, token_of(service, M1), json.dumps(report).encode())
    assert node.status.phase is Phase.READY
    assert node.status.guest == report
    assert service.get(M1).status.guest == report


async def test_phone_home_with_empty_body(service: NodeService) -> None:
    await service.put(M1, SPEC)
    assert (await service.phone_home(M1, token_of(service, M1), b"")).status.guest == {}


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"ready"'])
async def test_phone_home_with_a_malformed_body(service: NodeService, body: bytes) -> None:
    await service.put(M1, SPEC)
    before = snapshot(service.store)
    with pytest.raises(MalformedRequest):
        await service.phone_home(M1, token_of(service, M1), body)
    assert snapshot(service.store) == before


async def test_phone_home_while_deleting_is_a_conflict(service: NodeService) -> None:
    await service.put(M1, SPEC)
    await service.delete(M1)
    before = snapshot(service.store)
    with pytest.raises(Conflict):
        await service.phone_home(M1, token_of(service, M1), b"{}")
    assert snapshot(service.store) == before


# --- parsing helpers --------------------------------------------------------------------------


def test_parse_key_refuses_bad_names_as_invalid() -> None:
    assert parse_key("alpha", "m1") == M1
    with pytest.raises(Invalid, match="cluster"):
        parse_key("Alpha", "m1")
    with pytest.raises(Invalid, match="name"):
        parse_key("alpha", "m1..")


def test_parse_spec() -> None:
    assert parse_spec(SPEC.model_dump_json().encode()) == SPEC
    with pytest.raises(MalformedRequest):
        parse_spec(b"{")
    with pytest.raises(MalformedRequest):
        parse_spec(b"[]")
    with pytest.raises(Invalid, match=r"network\.address"):
        parse_spec(
            json.dumps(
                {
                    **SPEC.model_dump(mode="json"),
                    "network": {"vni": 1, "address": "10.0.0.1", "gateway": "10.0.0.2"},
                }
            ).encode()
        )
