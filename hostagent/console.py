"""A node's serial console log, as libvirt's virtlogd writes it: `console.log` in the node's
folder, rotated by size (virtlogd's max_size, 2 MiB by default) to `console.log.0`, `.1`,
... The tail of it for the API, and its last lines for a Failed message."""

from __future__ import annotations

import re
from pathlib import Path

from hostagent.model import NodeKey

CONSOLE_LOG = "console.log"
DEFAULT_TAIL_BYTES = 64 * 1024
MAX_TAIL_BYTES = 1024 * 1024
# Terminal escape sequences (colours, cursor moves) and other control characters but tab.
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


def tail_bytes(given: str | None) -> int:
    """The `tail_bytes` query parameter (None: the default); ValueError saying the bounds
    (the agent's and the zone's relay's)."""
    if given is None:
        return DEFAULT_TAIL_BYTES
    if not given.isdigit() or not 1 <= int(given) <= MAX_TAIL_BYTES:
        raise ValueError(
            f"tail_bytes {given[:20]!r} must be a whole number from 1 to "
            f"{MAX_TAIL_BYTES} (default {DEFAULT_TAIL_BYTES})"
        )
    return int(given)


def log_path(nodes_dir: Path, key: NodeKey) -> Path:
    return nodes_dir / key.cluster / key.name / CONSOLE_LOG


def tail(path: Path, limit: int) -> bytes:
    """The last `limit` bytes the console wrote, reaching into the rotated file when the
    current one is shorter; b"" when there is no log (yet)."""
    chunks: list[bytes] = []
    wanted = limit
    for file in (path, path.with_name(path.name + ".0")):
        if wanted <= 0:
            break
        try:
            with file.open("rb") as log:
                size = log.seek(0, 2)
                log.seek(max(0, size - wanted))
                chunk = log.read(wanted)
        except FileNotFoundError:
            continue
        chunks.insert(0, chunk)
        wanted -= len(chunk)
    return b"".join(chunks)


def last_lines(data: bytes, count: int = 10, width: int = 200) -> list[str]:
    """The last `count` non-empty lines, without escape sequences or control characters,
    each at most `width` characters: fit for a node's message."""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    lines = [ESCAPES.sub("", line).strip() for line in text.split("\n")]
    return [line[:width] for line in lines if line][-count:]
