"""qcow2 overlays on a base image, through qemu-img (the tool QEMU ships for this).

Every qemu-img run has a timeout (`[libvirt] qemu_img_timeout_s`): an image on storage
that hangs must not hold a reconciler worker forever.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from common.errors import ProvisioningError

GIB = 1024**3


async def _qemu_img(*args: str, timeout_s: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        raise ProvisioningError(
            f"qemu-img {' '.join(args)} did not finish within {timeout_s:g}s and was killed "
            "(is the image's storage hanging?)"
        ) from None
    finally:
        if proc.returncode is None:  # timed out or cancelled: no orphan, no zombie
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise ProvisioningError(f"qemu-img {args[0]} failed: {err.decode().strip()}")
    return out.decode()


async def info(path: Path, *, timeout_s: float) -> dict[str, object]:
    result: dict[str, object] = json.loads(
        await _qemu_img("info", "--output=json", "-U", str(path), timeout_s=timeout_s)
    )
    return result


async def ensure_blank(path: Path, size_gib: int, *, timeout_s: float) -> None:
    """A disk of its own (no backing file): created once, grown, never re-created."""
    if path.exists():
        if int(str((await info(path, timeout_s=timeout_s))["virtual-size"])) < size_gib * GIB:
            await _qemu_img("resize", "-f", "qcow2", str(path), f"{size_gib}G", timeout_s=timeout_s)
        return
    partial = path.with_suffix(".partial")
    await _qemu_img(
        "create", "-q", "-f", "qcow2", str(partial), f"{size_gib}G", timeout_s=timeout_s
    )
    partial.replace(path)


async def ensure_overlay(path: Path, base: Path, size_gib: int, *, timeout_s: float) -> None:
    """Create the overlay, or grow it; re-create it when its base image changed."""
    if path.exists():
        current = await info(path, timeout_s=timeout_s)
        if current.get("backing-filename") == str(base):
            if int(str(current["virtual-size"])) < size_gib * GIB:
                await _qemu_img(
                    "resize", "-f", "qcow2", str(path), f"{size_gib}G", timeout_s=timeout_s
                )
            return
        path.unlink()
    partial = path.with_suffix(".partial")
    command = ("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(partial))
    await _qemu_img(*command, f"{size_gib}G", timeout_s=timeout_s)
    partial.replace(path)
