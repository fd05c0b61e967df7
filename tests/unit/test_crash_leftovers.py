"""What an agent killed in the middle of writing a node's files left is removed when the
files are made again (the world of test_reconciler_faults: the real reconciler,
provisioner and store, libvirt's test driver)."""

from __future__ import annotations

from hostagent.model import Phase
from tests.unit.test_reconciler_faults import World, until, world

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
