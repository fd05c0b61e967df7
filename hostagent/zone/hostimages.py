"""The hosts' copies of the zone's catalogue images, as their reports say. Pure."""

from __future__ import annotations

from typing import Any

from hostagent.imagesource import ImagePhase
from hostagent.zone.model import HostReport, ReportedImage
from hostagent.zone.store import CatalogueImage, HostRecord


def reported(report: HostReport, image: CatalogueImage) -> ReportedImage | None:
    """The host's report of image at the catalogue's digest (None: not there, or another
    content under the name, or an agent that reports no images)."""
    for entry in report.images or ():
        if entry.name == image.name and entry.digest == image.digest:
            return entry
    return None


def holds(report: HostReport, name: str, image: CatalogueImage | None) -> bool:
    """Whether the host has image `name` Ready: at the catalogue's digest when the
    catalogue has it, else the host's own (placement prefers such hosts)."""
    for entry in report.images or ():
        if entry.name != name or entry.phase != ImagePhase.READY.value:
            continue
        if image is None or entry.digest == image.digest:
            return True
    return False


def image_view(image: CatalogueImage, users: list[str], hosts: list[HostRecord]) -> dict[str, Any]:
    """The image with the clusters naming it and each host's copy (as last reported)."""
    copies = []
    for host in hosts:
        entry = reported(host.report, image)
        if entry is not None:
            copies.append({"host": host.id, "phase": entry.phase, "message": entry.message})
    return {
        "name": image.name,
        "digest": image.digest,
        "source": image.source.model_dump(mode="json", exclude_none=True),
        "created_at": image.created_at,
        "used_by": users,
        "hosts": copies,
    }
