"""The agent's start failing half-way (here: its API port is taken) leaves nothing running
and stop() is safe, with a real libvirtd."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.config import Config
from hostagent.daemon import Agent
from tests.conftest import require_libvirt

pytestmark = pytest.mark.integration


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def state() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="hostagent-start-", dir="/var/tmp"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder)


async def test_stop_is_safe_after_a_start_that_failed(state: Path, taken_port: int) -> None:
    require_libvirt()
    config = Config.model_validate(
        {
            "host_id": "start-fails",
            "state_dir": str(state),
            "api": {"listen": f"127.0.0.1:{taken_port}"},
            "libvirt": {"domain_type": "qemu"},
        }
    )
    agent = Agent(config)
    with pytest.raises(OSError, match="address already in use"):
        await agent.start()
    await agent.stop()
    assert not agent.virt.connected.is_set() or not await agent.virt.alive()
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


async def test_stop_is_safe_before_start(state: Path) -> None:
    require_libvirt()
    config = Config.model_validate({"host_id": "never-started", "state_dir": str(state)})
    agent = Agent(config)
    await agent.stop()
