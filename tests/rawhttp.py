"""One HTTP/1.1 request as raw bytes, for what a well-behaved client would refuse or
normalise (non-ASCII header bytes, '..' in a path): what an attacker can send."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp.test_utils import BaseTestServer


async def raw_request(
    server: BaseTestServer, method: str, path: str, headers: bytes = b""
) -> tuple[int, bytes]:
    """The status and body of the answer to `method path` with headers: raw lines, each
    ending in CRLF."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n"
    writer.write(head.encode() + headers + b"\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def bearer_error(server: BaseTestServer, method: str, path: str, token: bytes) -> Any:
    """The error of a request whose bearer token is raw bytes; asserts it is a 401."""
    status, body = await raw_request(
        server, method, path, b"Authorization: Bearer " + token + b"\r\n"
    )
    assert status == 401, body
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message"} and error["code"] == "unauthorized"
    return error
