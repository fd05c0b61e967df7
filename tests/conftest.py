"""Shared test helpers: prerequisites that skip locally but fail in CI, the lab image cache."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from hostagent.zone.etcd import Delete, Etcd, Tls
from hostagent.zone.etcdstore import EtcdZoneStore
from hostagent.zone.store import SqliteZoneStore, ZoneStore
from tests import etcd
from tests.etcd import Member, etcd_binary

IN_CI = os.environ.get("CI") == "true"
IMAGE_CACHE = Path(os.environ.get("HOSTAGENT_TEST_IMAGES", "/var/cache/hostagent-test/images"))


def require(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is missing, except in CI where that is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {reason}")
    pytest.skip(reason)


def require_libvirt() -> None:
    require(os.geteuid() == 0, "needs root")
    require(shutil.which("virsh") is not None, "needs libvirt-clients")
    try:
        import libvirt

        libvirt.open("qemu:///system").close()
    except Exception as exc:
        require(False, f"needs a running libvirtd: {exc}")


@pytest.fixture(scope="session")
def lab_image_dir() -> Path:
    """The lab image, built once and cached by its recipe hash across runs."""
    require_libvirt()
    from hostagent.labimage.build import build_lab_image

    build_lab_image(IMAGE_CACHE, progress=lambda line: print(f"lab image: {line}"))
    return IMAGE_CACHE


@pytest.fixture(scope="session")
def cloudinit_image_dir() -> Path:
    """The lab-cloudinit image (Debian + cloud-init, debootstrap), cached by its recipe hash."""
    require_libvirt()
    from hostagent.labimage.cloudinit import build_cloudinit_image

    build_cloudinit_image(IMAGE_CACHE, progress=lambda line: print(line, flush=True))
    return IMAGE_CACHE


@pytest.fixture(scope="session")
def etcd_member() -> Iterator[Member]:
    """One etcd member for the session's store tests (each test has its own key prefix)."""
    require(etcd_binary() is not None, "needs etcd (Debian's etcd-server: scripts/setup-host.sh)")
    with etcd.start() as member:
        yield member


StoreFactory = Callable[[], Awaitable[ZoneStore]]


@pytest.fixture(params=["sqlite", "etcd"])
async def zone_stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """Opens the zone's store, SQLite or etcd (the same place each time, as a restarted
    zone would); every store opened is closed, and the test's etcd keys deleted, after."""
    opened: list[ZoneStore] = []
    prefix = f"/test/{uuid.uuid4().hex}/"
    endpoint = ""
    if request.param == "etcd":
        endpoint = request.getfixturevalue("etcd_member").endpoint

    async def open_store() -> ZoneStore:
        store: ZoneStore
        if request.param == "sqlite":
            store = SqliteZoneStore(tmp_path / "zone.db")
        else:
            store = EtcdZoneStore(etcd_client(endpoint), prefix)
        await store.start()
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.close()
    if endpoint:
        client = etcd_client(endpoint)
        await client.txn([], [Delete(prefix, prefix=True)])
        await client.close()


def etcd_client(*endpoints: str, request_timeout_s: float = 10.0) -> Etcd:
    return Etcd(endpoints, Tls(), dial_timeout_s=2.0, request_timeout_s=request_timeout_s)
