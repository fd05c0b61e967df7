"""The zone's image catalogue with its real store, SQLite and etcd (the store's contract):
PUT/GET/DELETE, 409 while a cluster names an image, the hosts' copies from their reports,
a PUT again retrying a failed pull, placement preferring the hosts holding the image, and
the cluster's own events (created, scaled, deleted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hostagent.errors import Conflict, Invalid, NotFound
from hostagent.imagesource import ImageSource
from hostagent.zone.catalogue import Catalogue
from hostagent.zone.config import ZoneServerConfig
from hostagent.zone.describe import describe
from hostagent.zone.service import ZoneService
from pki.local import LocalBackend
from tests.conftest import StoreFactory
from tests.unit.test_zone_service import Clock, report, spec

SOURCE = ImageSource.model_validate(
    {"url": "http://127.0.0.1:1/debian.tar", "sha256": "a" * 64, "format": "tar"}
)
OTHER = ImageSource.model_validate(
    {"url": "http://127.0.0.1:1/debian.tar", "sha256": "b" * 64, "format": "tar"}
)
DIGEST = f"sha256:{SOURCE.digest()}"


@pytest.fixture
async def service(tmp_path: Path, zone_stores: StoreFactory) -> ZoneService:
    store = await zone_stores()
    zone = ZoneService(
        store, ZoneServerConfig(state_dir=tmp_path), LocalBackend(tmp_path / "pki"), clock=Clock()
    )
    return zone


def with_image(cluster: str = "debian") -> Any:
    return spec(masters=1, workers=1).model_copy(update={"image": cluster})


def copy(phase: str, digest: str = DIGEST, message: str = "") -> dict[str, Any]:
    return {"name": "debian", "digest": digest, "phase": phase, "message": message}


async def test_an_image_is_put_listed_and_kept_across_a_reopened_store(
    service: ZoneService, zone_stores: StoreFactory
) -> None:
    catalogue = Catalogue(service)
    view, created = await catalogue.put("debian", SOURCE)
    assert created and view["digest"] == DIGEST and view["used_by"] == [] and view["hosts"] == []
    again, created = await catalogue.put("debian", SOURCE)
    assert not created and again["created_at"] == view["created_at"]  # nothing changed
    assert [i["name"] for i in catalogue.all()] == ["debian"]
    reopened = await zone_stores()
    assert reopened.image("debian") == service.store.image("debian")
    with pytest.raises(NotFound):
        catalogue.get("ubuntu")
    with pytest.raises(Invalid):
        await catalogue.put("Not_A_Name", SOURCE)


async def test_an_image_a_cluster_names_keeps_its_content_and_cannot_go(
    service: ZoneService,
) -> None:
    catalogue = Catalogue(service)
    await catalogue.put("debian", SOURCE)
    for i in (1, 2):
        await service.report(f"h{i}", report(i))
    await service.put_cluster("demo", with_image())
    assert catalogue.get("debian")["used_by"] == ["demo"]
    with pytest.raises(Conflict, match="named by cluster demo"):
        await catalogue.put("debian", OTHER)
    with pytest.raises(Conflict, match="named by cluster demo"):
        await catalogue.delete("debian")
    assert service.store.image("debian").source == SOURCE  # type: ignore[union-attr]
    await service.delete_cluster("demo")
    for node in service.store.nodes("demo"):
        await service.node_gone(node.host, f"demo/{node.name}")
    await catalogue.delete("debian")
    assert catalogue.all() == []
    with pytest.raises(NotFound):
        await catalogue.delete("debian")


async def test_the_hosts_copies_come_from_their_reports_and_a_put_retries_a_failed_pull(
    service: ZoneService,
) -> None:
    catalogue = Catalogue(service)
    await catalogue.put("debian", SOURCE)
    await service.report("h1", report(1, images=[copy("Ready")]))
    await service.report("h2", report(2, images=[copy("Failed", message="sha256 mismatch")]))
    await service.report("h3", report(3, images=[copy("Ready", digest="sha256:" + "c" * 64)]))
    hosts = catalogue.get("debian")["hosts"]
    assert hosts == [
        {"host": "h1", "phase": "Ready", "message": ""},
        {"host": "h2", "phase": "Failed", "message": "sha256 mismatch"},
    ]  # h3 holds other content under the name
    for host in ("h1", "h2"):
        await service.store.set_delivery(host, "image", "debian", DIGEST)
    await catalogue.put("debian", SOURCE)
    assert ("image", "debian") in service.store.deliveries("h1")
    assert ("image", "debian") not in service.store.deliveries("h2")  # sent again


async def test_a_report_without_the_image_makes_the_zone_send_it_again(
    service: ZoneService,
) -> None:
    await service.report("h1", report(1, images=[copy("Ready")]))
    await service.store.set_delivery("h1", "image", "debian", DIGEST)
    await service.report("h1", report(1))  # an agent that reports no images: kept
    assert ("image", "debian") in service.store.deliveries("h1")
    await service.report("h1", report(1, images=[]))  # collected, or its state lost
    assert ("image", "debian") not in service.store.deliveries("h1")


async def test_placement_prefers_the_hosts_holding_the_image(service: ZoneService) -> None:
    await Catalogue(service).put("debian", SOURCE)
    await service.report("h1", report(1, memory_mib=32768))
    await service.report("h2", report(2, images=[copy("Ready")]))
    await service.report("h3", report(3, memory_mib=32768, images=[copy("Failed")]))
    view, _ = await service.put_cluster(
        "demo", spec(masters=1, workers=0).model_copy(update={"image": "debian"})
    )
    assert [n["host"] for n in view["status"]["nodes"]] == ["h2"]


async def test_a_cluster_keeps_its_created_scaled_and_deleted_events(service: ZoneService) -> None:
    for i in (1, 2):
        await service.report(f"h{i}", report(i))
    await service.put_cluster("demo", spec(masters=1, workers=1))
    await service.put_cluster("demo", spec(masters=1, workers=2))
    await service.delete_cluster("demo")
    events = service.cluster("demo")["status"]["events"]
    assert [(e["kind"], e["node"], e["role"]) for e in events] == [
        ("deleted", "", None),
        ("scaled", "", None),
        ("created", "", None),
    ]
    assert events[1]["message"].startswith("workers 1 -> 2 (added w2@")
    assert events[2]["message"].startswith("vni 4096, 10.128.0.0/24: m1@")
    text = describe(service.cluster("demo"), lambda _at: "1m")
    assert "deleted" in text and "scaled" in text and "created" in text


async def test_a_node_not_sent_yet_shows_its_image_on_its_host(service: ZoneService) -> None:
    """What any replica shows, from the hosts' reports (the leader's Deliverer holds the
    node back meanwhile)."""
    await Catalogue(service).put("debian", SOURCE)
    await service.report("h1", report(1, images=[copy("Downloading")]))
    one = spec(masters=1, workers=0).model_copy(update={"image": "debian"})
    view, _ = await service.put_cluster("demo", one)
    (node,) = view["status"]["nodes"]
    assert (node["phase"], node["message"]) == (
        "Pending",
        "waiting for image debian to download on host h1",
    )
    failure = "disk: sha256 mismatch: expected aaaa, got bbbb"
    await service.report("h1", report(1, images=[copy("Failed", message=failure)]))
    status = service.cluster("demo")["status"]
    (node,) = status["nodes"]
    assert node["phase"] == "Failed"
    assert node["message"] == f"host h1 could not pull image debian: {failure}"
    assert status["phase"] == "Degraded" and failure in status["message"]
