"""Which Kubernetes versions the shipped templates support: one folder per minor.

`templates/1.31/` holds the file templates a 1.31.x node's user-data carries. Supporting
1.32 means copying that folder to `templates/1.32/` and editing what changed; nothing
in Python lists the versions.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
MINOR_CONSTANTS = "constants.j2"  # what makes a folder a minor's: its versions
_MINOR = re.compile(r"(\d{1,3})\.(\d{1,3})")
_VERSION = re.compile(r"(\d{1,3}\.\d{1,3})\.\d{1,3}")


class UnsupportedVersion(ValueError):
    """No template folder for this Kubernetes version (the API answers 422)."""


def supported_minors() -> list[str]:
    """The minors with a complete template folder, oldest first, e.g. ["1.30", "1.31"]."""
    return list(_minors())


@functools.cache  # the shipped folders do not change while the agent runs
def _minors() -> tuple[str, ...]:
    minors = [
        folder.name
        for folder in TEMPLATES.iterdir()
        if _MINOR.fullmatch(folder.name) and (folder / MINOR_CONSTANTS).is_file()
    ]
    return tuple(sorted(minors, key=lambda minor: tuple(int(part) for part in minor.split("."))))


def template_folder(kubernetes_version: str) -> str:
    """The template folder (its name, the minor) for a version such as "1.31.2".

    Raises UnsupportedVersion, naming the supported minors, for a malformed version or
    one whose minor has no folder.
    """
    supported = _minors()
    match = _VERSION.fullmatch(kubernetes_version)
    if match is None or match.group(1) not in supported:
        raise UnsupportedVersion(
            f"kubernetes_version {kubernetes_version[:40]!r} is not supported: "
            f"supported minors are {', '.join(supported)} (a version looks like "
            f"{supported[-1]}.0)"
        )
    return match.group(1)
