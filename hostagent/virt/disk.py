"""qcow2 overlays on a base image, through qemu-img (the tool QEMU ships for this)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from common.errors import ProvisioningError

GIB = 1024**3


async def _qemu_img(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise ProvisioningError(f"qemu-img {args[0]} failed: {err.decode().strip()}")
    return out.decode()


async def info(path: Path) -> dict[str, object]:
    result: dict[str, object] = json.loads(
        await _qemu_img("info", "--output=json", "-U", str(path))
    )
    return result


async def ensure_blank(path: Path, size_gib: int) -> None:
    """A disk of its own (no backing file): created once, grown, never re-created."""
    if path.exists():
        if int(str((await info(path))["virtual-size"])) < size_gib * GIB:
            await _qemu_img("resize", "-f", "qcow2", str(path), f"{size_gib}G")
        return
    partial = path.with_suffix(".partial")
    await _qemu_img("create", "-q", "-f", "qcow2", str(partial), f"{size_gib}G")
    partial.replace(path)


async def ensure_overlay(path: Path, base: Path, size_gib: int) -> None:
    """Create the overlay, or grow it; re-create it when its base image changed."""
    if path.exists():
        current = await info(path)
        if current.get("backing-filename") == str(base):
            if int(str(current["virtual-size"])) < size_gib * GIB:
                await _qemu_img("resize", "-f", "qcow2", str(path), f"{size_gib}G")
            return
        path.unlink()
    partial = path.with_suffix(".partial")
    await _qemu_img(
        "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(partial), f"{size_gib}G"
    )
    partial.replace(path)
