"""The reconciler's own failure paths, against the real Reconciler, Store (SQLite in
tmp_path) and Provisioner: certificates from the local CA, config drive, qcow2 overlay
on a tiny base image, and the real Libvirt adapter on libvirt's in-process test driver
(test:///default: a real libvirt driver that keeps its domains in memory, no libvirtd).

A mock injects the one failure of each test at one exact point (a libvirt call, the
certificate backend's first call), failing for a while and then delegating to the real
call. The one stand-in: the host network (ensure_networks), which a unit test cannot
touch; it does nothing here, and tests/integration/test_provisioner.py runs it for real.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
from pytest_mock import MockerFixture

from common.errors import ProvisioningError
from hostagent import provisioner as provisioner_module
from hostagent.certificates import make_backend
from hostagent.config import Config
from hostagent.errors import StoreFull
from hostagent.images import ImageCatalog
from hostagent.metrics import Metrics
from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.provisioner import Provisioner
from hostagent.reconciler import Reconciler
from hostagent.store import MAX_NODE_EVENTS, NodeRecord, Store
from hostagent.virt.libvirt import Libvirt
from pki.errors import BackendUnavailable
from tests.conftest import require

HOST = "h1"
MAX_ATTEMPTS = 3
SPEC = NodeSpec.model_validate(
    {
        "role": "master",
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 2,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {"vni": 4242, "address": "10.42.0.11/24", "gateway": "10.42.0.1"},
    }
)


@dataclass
class World:
    store: Store
    provisioner: Provisioner
    virt: Libvirt
    reconciler: Reconciler
    metrics: Metrics
    key: NodeKey

    async def put(self) -> NodeRecord:
        record = await self.store.create(self.key, SPEC, "0123456789abcdef")
        self.reconciler.enqueue(self.key)
        return record

    def node(self) -> NodeRecord:
        record = self.store.get(self.key)
        assert record is not None
        return record

    def errors(self) -> float:
        value = self.metrics.registry.get_sample_value("hostagent_reconcile_errors_total")
        assert value is not None
        return value

    def reconnect(self) -> None:
        """What Libvirt.connect does once libvirtd answers again (see world())."""
        self.virt._conn = libvirt.open("test:///default")
        self.virt.connected.set()


def tiny_image(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "vmlinuz").write_bytes(b"kernel")
    (folder / "initrd").write_bytes(b"initrd")
    command = ["qemu-img", "create", "-q", "-f", "qcow2", str(folder / "disk.qcow2"), "1G"]
    subprocess.run(command, check=True)
    manifest = {"kernel": "vmlinuz", "initrd": "initrd", "disk": "disk.qcow2"}
    (folder / "image.json").write_text(json.dumps({**manifest, "cmdline": "", "recipe": "t"}))


@pytest.fixture
async def world(tmp_path: Path, mocker: MockerFixture) -> AsyncIterator[World]:
    require(shutil.which("qemu-img") is not None, "needs qemu-utils")
    tiny_image(tmp_path / "images" / "lab")
    config = Config.model_validate(
        {
            "host_id": HOST,
            "state_dir": str(tmp_path / "state"),
            "image_dir": str(tmp_path / "images"),
            # The certificate share is chowned to QEMU's user: here, whoever runs the test.
            "libvirt": {"uri": "test:///default", "qemu_user": pwd.getpwuid(os.getuid()).pw_name},
            "reconciler": {
                "concurrency": 2,
                "max_attempts": MAX_ATTEMPTS,
                "backoff_initial_s": 0.01,
                "backoff_max_s": 0.05,
                "resync_interval_s": 3600,  # no resync comes to the rescue of a lost node
            },
        }
    )
    virt = Libvirt(
        config.libvirt.uri, workers=2, on_lifecycle=lambda _: None, on_reconnect=lambda: None
    )
    # connect() minus the keepalive the test driver does not offer; the rest is the
    # adapter's own (calls, errors, mark_lost and `connected`).
    virt._conn = libvirt.open(config.libvirt.uri)
    virt.connected.set()
    store = Store(tmp_path / "state.db")
    provisioner = Provisioner(
        config,
        ImageCatalog(tmp_path / "images"),
        virt,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        "test",
        None,  # type: ignore[arg-type]
        make_backend(config),
        None,  # type: ignore[arg-type]
    )
    mocker.patch.object(provisioner, "ensure_networks", mocker.AsyncMock(return_value=None))
    metrics = Metrics(lambda: {}, lambda: 0, lambda: {}, lambda: {})
    reconciler = Reconciler(store, provisioner, config.reconciler, metrics, HOST, 1.0)
    key = NodeKey(cluster=f"c{secrets.token_hex(4)}", name="m1")
    task = asyncio.create_task(reconciler.run())
    try:
        yield World(store, provisioner, virt, reconciler, metrics, key)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        remove_domain(config.libvirt.uri, key.domain)
        await virt.close()
        store.close()


def remove_domain(uri: str, name: str) -> None:
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    except libvirt.libvirtError:
        pass  # never defined, or already gone
    finally:
        conn.close()


async def until(condition: Callable[[], Any], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def failing(real: Any, fail: Callable[[int], BaseException | None]) -> Callable[..., Any]:
    """An async stand-in for `real` that raises fail(n) on its n-th call (1, 2, ...), and
    delegates to `real` when that is None."""
    calls = 0

    async def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        error = fail(calls)
        if error is not None:
            raise error
        return await real(*args, **kwargs)

    return call


async def test_a_step_failing_every_time_fails_the_node_with_the_last_cause(
    world: World, mocker: MockerFixture
) -> None:
    define = mocker.patch.object(
        world.provisioner,
        "define",
        side_effect=failing(world.provisioner.define, lambda n: ProvisioningError(f"boom {n}")),
    )
    await world.put()
    await until(lambda: world.node().phase is Phase.FAILED)
    node = world.node()
    assert define.call_count == MAX_ATTEMPTS
    assert f"after {MAX_ATTEMPTS} attempts: boom {MAX_ATTEMPTS}." in node.message
    assert "PUT the node again or DELETE it" in node.message
    assert world.errors() == MAX_ATTEMPTS
    messages = [t.message for t in world.store.transitions(world.key)]
    assert "attempt 1 failed, retrying: boom 1" in messages
    assert await world.virt.domain(world.key.domain, HOST) is None
    # A Failed node stays failed: enqueued again (a resync, an event), nothing is tried.
    world.reconciler.enqueue(world.key)
    await until(lambda: world.reconciler.load() == {"queued": 0, "active": 0})
    assert define.call_count == MAX_ATTEMPTS and world.node().phase is Phase.FAILED


async def test_the_node_waits_for_the_certificate_backend_and_never_fails(
    world: World, mocker: MockerFixture
) -> None:
    vault_down = True
    down = BackendUnavailable("vault at https://vault:8200 is sealed")
    pki = world.provisioner.pki
    ensure = mocker.patch.object(
        pki,
        "ensure_cluster",
        side_effect=failing_sync(pki.ensure_cluster, lambda: down if vault_down else None),
    )
    await world.put()
    await until(lambda: ensure.call_count >= 3 * MAX_ATTEMPTS)
    node = world.node()
    assert node.phase is Phase.PROVISIONING
    waiting = f"waiting for the certificate backend: {down}"
    assert node.message == waiting
    # Each retry keeps the cause in view, and logs no transition while nothing changes.
    transitions = [(t.phase, t.message) for t in world.store.transitions(world.key)]
    assert transitions[-1] == (Phase.PROVISIONING, waiting)
    assert transitions.count((Phase.PROVISIONING, waiting)) == 1
    vault_down = False
    await until(lambda: world.node().phase is Phase.RUNNING)
    domain = await world.virt.domain(world.key.domain, HOST)
    assert domain is not None and domain.running
    assert world.node().message == ""
    assert world.errors() == ensure.call_count - 1


def failing_sync(real: Callable[..., Any], fail: Callable[[], BaseException | None]) -> Any:
    """A stand-in for the blocking `real` that raises fail() while it is not None."""

    def call(*args: Any, **kwargs: Any) -> Any:
        error = fail()
        if error is not None:
            raise error
        return real(*args, **kwargs)

    return call


async def test_the_node_waits_for_libvirtd_and_resumes_when_it_returns(
    world: World, mocker: MockerFixture
) -> None:
    def lose_libvirt(n: int) -> None:
        if n == 1:
            world.virt.mark_lost()  # libvirtd went away right before the start
        return None

    start = mocker.patch.object(
        world.virt, "start", side_effect=failing(world.virt.start, lose_libvirt)
    )
    await world.put()
    await until(lambda: world.node().message.startswith("waiting for libvirt"))
    node = world.node()
    assert node.phase is Phase.PROVISIONING
    assert "Check that libvirtd is running" in node.message
    await asyncio.sleep(0.2)  # many backoff delays: it waits for the connection, not a timer
    assert start.call_count == 1 and world.node().message == node.message
    world.reconnect()
    await until(lambda: world.node().phase is Phase.RUNNING)
    assert start.call_count == 2
    assert world.errors() == 1


async def test_a_node_enqueued_during_its_reconcile_is_reconciled_again(
    world: World, mocker: MockerFixture
) -> None:
    """DELETE while the node is being created: the running pass goes on with the steps it
    planned, and the deletion waits in the reconciler's `_again` set for the pass after."""
    define_entered, release = asyncio.Event(), asyncio.Event()
    real_define = world.provisioner.define

    async def define(record: NodeRecord) -> None:
        define_entered.set()
        await release.wait()
        await real_define(record)

    mocker.patch.object(world.provisioner, "define", side_effect=define)
    await world.put()
    await asyncio.wait_for(define_entered.wait(), 10)
    await world.store.mark_deleting(world.key)
    world.reconciler.enqueue(world.key)
    assert world.reconciler.load() == {"queued": 0, "active": 1}
    seen: list[Phase] = []
    spy = mocker.spy(world.store, "set_phase")
    real_shutdown = world.virt.shutdown

    async def shutdown(name: str, timeout_s: float) -> None:
        seen.append(world.node().phase)  # what GET says while the guest shuts down
        await real_shutdown(name, timeout_s)

    mocker.patch.object(world.virt, "shutdown", side_effect=shutdown)
    release.set()
    await until(lambda: world.reconciler.load() == {"queued": 0, "active": 0})
    assert spy.call_args_list[0].args[1] is Phase.RUNNING  # the first pass's end
    assert seen == [Phase.DELETING]
    assert world.store.get(world.key) is None
    assert await world.virt.domain(world.key.domain, HOST) is None
    assert not world.provisioner.files(world.key).root.exists()
    assert world.errors() == 0


async def test_a_full_disk_under_the_store_delays_the_node_without_a_crash(
    world: World, mocker: MockerFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """The store cannot record the failed attempt (SQLite: database or disk is full): the
    worker neither crashes nor forgets the node, it tries it again a little later."""
    mocker.patch.object(
        world.provisioner,
        "define",
        side_effect=failing(
            world.provisioner.define, lambda n: ProvisioningError("boom") if n == 1 else None
        ),
    )
    real_set_phase = world.store.set_phase

    async def set_phase(key: NodeKey, phase: Phase, message: str = "", **kw: Any) -> bool:
        if message.startswith("attempt 1 failed"):
            raise StoreFull("the state store cannot be written, its disk is full")
        return await real_set_phase(key, phase, message, **kw)

    mocker.patch.object(world.store, "set_phase", side_effect=set_phase)
    await world.put()
    await until(lambda: world.node().phase is Phase.RUNNING)
    assert "its disk is full; retrying in" in caplog.text
    assert "crashed" not in caplog.text
    loop_errors = world.metrics.registry.get_sample_value(
        "hostagent_loop_errors_total", {"loop": "reconciler"}
    )
    assert loop_errors == 0
    assert world.errors() == 2  # the failed define, the failed record of it


async def test_a_full_disk_fails_the_node_with_a_clear_message(
    world: World, mocker: MockerFixture
) -> None:
    """ENOSPC where only an OSError comes (the config drive's write) fails the node like
    any step, naming the full filesystem; before, it crashed the pass and the node sat in
    Provisioning with no cause. tests/e2e/test_disk_full.py fills a real one."""

    def no_space(path: Path, contents: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    mocker.patch.object(provisioner_module, "build_config_drive", side_effect=no_space)
    await world.put()
    await until(lambda: world.node().phase is Phase.FAILED)
    message = world.node().message
    root = world.provisioner.files(world.key).root
    assert f"after {MAX_ATTEMPTS} attempts: writing {root}: [Errno 28] No space left" in message
    assert f"the filesystem holding {root} is full (see `df -h {root}`)" in message
    assert world.errors() == MAX_ATTEMPTS


async def test_a_paused_vm_is_destroyed_when_its_node_is_deleted(
    world: World, mocker: MockerFixture
) -> None:
    """A paused guest cannot see ACPI (QEMU's libvirt refuses the shutdown, "domain is not
    running"; the test driver would take it): it is destroyed without asking, so a hung
    node the zone replaces still goes."""
    shutdown = mocker.spy(libvirt.virDomain, "shutdown")
    await world.put()
    await until(lambda: world.node().phase is Phase.RUNNING)
    conn = libvirt.open("test:///default")
    try:
        conn.lookupByName(world.key.domain).suspend()
        await world.store.mark_deleting(world.key)
        world.reconciler.enqueue(world.key)
        await until(lambda: world.store.get(world.key) is None)
        assert world.errors() == 0 and shutdown.call_count == 0
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(world.key.domain)
    finally:
        conn.close()


async def test_node_events_come_in_order_for_create_crash_restart_and_delete(
    world: World,
) -> None:
    await world.put()
    await until(lambda: world.node().phase is Phase.RUNNING)
    await world.store.set_ready(world.key, {"hostname": "m1"})
    crashed = libvirt.open("test:///default")
    try:
        crashed.lookupByName(world.key.domain).destroy()  # the VM stops by itself
    finally:
        crashed.close()
    world.reconciler.enqueue(world.key)
    await until(lambda: [e.kind for e in world.store.events(world.key)][-1:] == ["restarted"])
    await world.store.mark_deleting(world.key)
    kinds = [e.kind for e in world.store.events(world.key)]
    assert kinds == ["created", "started", "phoned-home", "restarted", "deleting"]
    restarted = world.store.events(world.key)[3]
    assert "stopped by itself (phase Ready)" in restarted.message
    assert "2 starts in the last" in restarted.message
    world.reconciler.enqueue(world.key)
    await until(lambda: world.store.get(world.key) is None)
    assert world.store.events(world.key) == []  # they go with the node


async def test_a_node_keeps_its_last_events_only(world: World) -> None:
    await world.store.create(world.key, SPEC, "0123456789abcdef")
    for i in range(MAX_NODE_EVENTS + 5):
        await world.store.add_event(world.key, "restarted", f"restart {i}")
    events = world.store.events(world.key)
    assert len(events) == MAX_NODE_EVENTS
    assert events[0].message == "restart 5"
    assert events[-1].message == f"restart {MAX_NODE_EVENTS + 4}"


async def test_a_failed_node_says_why_in_its_events(world: World, mocker: MockerFixture) -> None:
    cause = ProvisioningError("the define failed on purpose")
    mocker.patch.object(world.provisioner, "define", side_effect=cause)
    await world.put()
    await until(lambda: world.node().phase is Phase.FAILED)
    last = world.store.events(world.key)[-1]
    assert last.kind == "failed" and "the define failed on purpose" in last.message
