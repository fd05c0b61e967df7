"""The NoCloud config drive: an ISO 9660 image labelled `cidata`, made in-process.

The only module that imports pycdlib. cloud-init finds the drive by its volume
label and reads the files by their Rock Ridge (or Joliet) names, so every file
gets all three names: ISO 9660 (`/USERDATA.;1`), Rock Ridge and Joliet.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path

import pycdlib

from cloudconfig.addons.calico import Release
from cloudconfig.context import NodeContext
from cloudconfig.render import render_node
from common.files import write_atomically

VOLUME_LABEL = "cidata"  # what NoCloud looks for
# QEMU runs as its own user and must read the drive; nothing in it is secret from
# the host (the phone-home token is per node and only worth something to that node).
DRIVE_MODE = 0o644
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,29}")  # ISO 9660 level 3 names are short


def config_drive_files(
    ctx: NodeContext, template_dir: Path | None = None, calico_release: Release | None = None
) -> dict[str, bytes]:
    """The files of the node's NoCloud config drive, by their names on the drive (pure)."""
    files = render_node(ctx, template_dir, calico_release)
    return {name: text.encode() for name, text in files.items()}


def build_config_drive(path: Path, files: Mapping[str, bytes]) -> None:
    """Write a `cidata` ISO holding files (name -> content) at path, atomically.

    A reader (QEMU, a test) sees the old drive or the new one, never half of one.
    """
    iso = _new_iso(files)
    try:
        write_atomically(path, iso.write_fp, DRIVE_MODE)
    finally:
        iso.close()


def _new_iso(files: Mapping[str, bytes]) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
    for name, iso_name in _iso_names(files).items():
        content = files[name]
        iso.add_fp(
            io.BytesIO(content),
            len(content),
            iso_path=f"/{iso_name};1",
            rr_name=name,
            joliet_path=f"/{name}",
        )
    return iso


def _iso_names(files: Mapping[str, bytes]) -> dict[str, str]:
    """Map each file name to its ISO 9660 name: uppercase d-characters, e.g. USERDATA.

    ISO 9660 allows only A-Z, 0-9 and _; nobody reads these names, but two files
    must not share one, so a collision is refused rather than silently overwritten.
    """
    names: dict[str, str] = {}
    for name in sorted(files):
        if not _NAME.fullmatch(name):
            raise ValueError(f"config drive file name {name[:80]!r} must match {_NAME.pattern}")
        iso_name = re.sub(r"[^A-Z0-9_]", "", name.upper()) + "."
        if iso_name in names.values():
            raise ValueError(f"config drive file names collide in ISO 9660: {name!r}")
        names[name] = iso_name
    return names


def read_config_drive(path: Path) -> dict[str, bytes]:
    """The files in the root of a config drive, by their Rock Ridge names."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        files: dict[str, bytes] = {}
        for record in iso.list_children(rr_path="/"):
            if record.is_dot() or record.is_dotdot() or not record.is_file():
                continue
            name = record.rock_ridge.name().decode()
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            files[name] = out.getvalue()
        return files
    finally:
        iso.close()
