"""Base images this host can boot: one folder per image with an image.json manifest, either
put in the image directory by the operator (`<image_dir>/<name>/`) or pulled by the agent
(`PUT /v1/images/{name}`) and stored by digest (`<image_dir>/.pulled/sha256/<hex>/`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common.names import DNS1123_LABEL

IMAGE_JSON = "image.json"
PULLED = ".pulled"  # not a DNS-1123 label: no image name can take it


@dataclass(frozen=True)
class Image:
    name: str
    kernel: Path
    initrd: Path
    disk: Path
    cmdline: str
    recipe: str


class ImageLayout:
    """Where pulled images live (`<image_dir>/.pulled` unless `pulled_dir` says):
    finished ones by digest, downloads in a work folder each (removed when the agent
    starts: a download restarts from its record)."""

    def __init__(self, pulled: Path) -> None:
        self.pulled = pulled
        self.by_digest = self.pulled / "sha256"
        self.partial = self.pulled / "partial"

    def folder(self, digest: str) -> Path:
        return self.by_digest / digest


class PulledImages(Protocol):
    """What the catalog asks about pulled images (the ImagePuller answers)."""

    layout: ImageLayout

    def ready_digest(self, name: str) -> str | None: ...

    def ready_names(self) -> list[str]: ...


def read_folder(name: str, folder: Path) -> Image | None:
    """The image in folder; None unless its manifest is complete, names files inside the
    folder only, and they all exist."""
    try:
        manifest = json.loads((folder / IMAGE_JSON).read_text())
        parts = {key: str(manifest[key]) for key in ("kernel", "initrd", "disk")}
        cmdline, recipe = str(manifest["cmdline"]), str(manifest["recipe"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(Path(part).name != part or part in (".", "..") for part in parts.values()):
        return None
    image = Image(
        name=name,
        kernel=folder / parts["kernel"],
        initrd=folder / parts["initrd"],
        disk=folder / parts["disk"],
        cmdline=cmdline,
        recipe=recipe,
    )
    if not all(path.is_file() for path in (image.kernel, image.initrd, image.disk)):
        return None
    return image


class ImageCatalog:
    """Reads image folders; a folder without a complete manifest is an unfinished build.
    An operator's folder comes first where a pulled image has the same name."""

    def __init__(self, root: Path, pulled: PulledImages | None = None) -> None:
        self.root = root
        self.pulled = pulled

    def folder_image(self, name: str) -> Image | None:
        if not DNS1123_LABEL.fullmatch(name):
            return None
        return read_folder(name, self.root / name)

    def get(self, name: str) -> Image | None:
        image = self.folder_image(name)
        if image is not None or self.pulled is None:
            return image
        digest = self.pulled.ready_digest(name)
        return None if digest is None else read_folder(name, self.pulled.layout.folder(digest))

    def folder_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if self.folder_image(p.name) is not None)

    def names(self) -> list[str]:
        pulled = self.pulled.ready_names() if self.pulled is not None else []
        return sorted(set(self.folder_names()) | {n for n in pulled if self.get(n) is not None})
