"""Nothing stays behind a node: what an agent killed in the middle of writing its files
left is removed when they are made again, and its cluster's certificates go with the
cluster's last node, not before (the world of test_reconciler_faults: the real
reconciler, provisioner, store and local CA, libvirt's test driver)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pytest_mock import MockerFixture

from hostagent.model import NodeKey, Phase
from pki.certset import CaName
from pki.local import LocalBackend
from tests.unit.test_reconciler_faults import SPEC, World, until, world

__all__ = ["world"]


async def test_a_half_written_config_drive_is_removed(world: World) -> None:
    root = world.provisioner.files(world.key).root
    root.mkdir(parents=True)
    temporary = root / ".cidata.iso.k1ll3d.tmp"  # common.files.write_atomically's name
    temporary.write_bytes(b"half an ISO")
    other = root / "notes.tmp"  # not the agent's: left alone
    other.write_text("mine")
    await world.put()
    await until(lambda: world.node().phase is Phase.RUNNING)
    assert not temporary.exists()
    assert other.exists()
    assert (root / "cidata.iso").stat().st_size > 0


def test_a_half_written_ca_is_removed(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    directory = backend.cluster_dir("c1")
    directory.mkdir(parents=True)
    temporary = directory / ".etcd.key.tmp-8e56d9e9"  # pki.files' name for a temporary
    temporary.write_text("half a key")
    backend.ensure_cluster("c1")
    assert not temporary.exists()
    made = {f"{ca}.{kind}" for ca in CaName for kind in ("crt", "key")}
    assert {p.name for p in directory.iterdir()} == made


async def two_nodes(world: World) -> NodeKey:
    """world.key and a second node of its cluster, both Running; the second's key."""
    other = NodeKey(cluster=world.key.cluster, name="m2")
    await world.put()
    await world.store.create(other, SPEC, "fedcba9876543210")
    world.reconciler.enqueue(other)
    await until(
        lambda: (
            all(r.phase is Phase.RUNNING for r in world.store.all()) and len(world.store.all()) == 2
        )
    )
    return other


async def test_the_cluster_certificates_go_with_its_last_node_only(world: World) -> None:
    pki = world.provisioner.pki
    assert isinstance(pki, LocalBackend)
    ca = pki.cluster_dir(world.key.cluster)
    other = await two_nodes(world)
    assert ca.is_dir()
    await world.store.mark_deleting(world.key)
    world.reconciler.enqueue(world.key)
    await until(lambda: world.store.get(world.key) is None)
    assert ca.is_dir(), "revoked while m2 still runs"
    await world.store.mark_deleting(other)
    world.reconciler.enqueue(other)
    await until(lambda: world.store.all() == [])
    assert not ca.exists()


async def test_two_last_nodes_deleted_at_once_take_the_certificates(
    world: World, mocker: MockerFixture
) -> None:
    pki = world.provisioner.pki
    assert isinstance(pki, LocalBackend)
    other = await two_nodes(world)
    # Neither node is forgotten before both have passed the certificates' step: each
    # then sees the other still in the store, being deleted too.
    real_remove, both = world.store.remove, asyncio.Barrier(2)

    async def remove(key: NodeKey) -> None:
        await both.wait()
        await real_remove(key)

    mocker.patch.object(world.store, "remove", side_effect=remove)
    for key in (world.key, other):
        await world.store.mark_deleting(key)
        world.reconciler.enqueue(key)
    await until(lambda: world.store.all() == [])
    assert not pki.cluster_dir(world.key.cluster).exists()
