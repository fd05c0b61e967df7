"""network.health: argument checks that need no sockets (the pings are integration tests)."""

from __future__ import annotations

import pytest

from network.health import check_peers


async def test_no_peers_is_an_empty_answer() -> None:
    assert await check_peers([], timeout_s=0.1) == {}


@pytest.mark.parametrize("address", ["peer-1.example", "192.0.2.1/32", "2001:db8::1", ""])
async def test_only_ipv4_literals_are_checked(address: str) -> None:
    with pytest.raises(ValueError, match="not an IPv4 address"):
        await check_peers([address], timeout_s=0.1)


@pytest.mark.parametrize("timeout_s", [0, -1])
async def test_timeout_must_be_positive(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        await check_peers(["192.0.2.1"], timeout_s=timeout_s)
