"""Base images this host can boot: one folder per image with an image.json manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.names import DNS1123_LABEL


@dataclass(frozen=True)
class Image:
    name: str
    kernel: Path
    initrd: Path
    disk: Path
    cmdline: str
    recipe: str


class ImageCatalog:
    """Reads image folders; a folder without a complete manifest is an unfinished build."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, name: str) -> Image | None:
        if not DNS1123_LABEL.fullmatch(name):
            return None
        folder = self.root / name
        try:
            manifest = json.loads((folder / "image.json").read_text())
        except (OSError, ValueError):
            return None
        image = Image(
            name=name,
            kernel=folder / manifest["kernel"],
            initrd=folder / manifest["initrd"],
            disk=folder / manifest["disk"],
            cmdline=manifest["cmdline"],
            recipe=manifest["recipe"],
        )
        if not all(path.is_file() for path in (image.kernel, image.initrd, image.disk)):
            return None
        return image

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if self.get(p.name) is not None)
