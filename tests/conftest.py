"""Shared test helpers: prerequisites that skip locally but fail in CI, the lab image cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"
IMAGE_CACHE = Path(os.environ.get("HOSTAGENT_TEST_IMAGES", "/var/cache/hostagent-test/images"))


def require(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is missing, except in CI where that is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {reason}")
    pytest.skip(reason)


def require_libvirt() -> None:
    require(os.geteuid() == 0, "needs root")
    require(shutil.which("virsh") is not None, "needs libvirt-clients")
    try:
        import libvirt

        libvirt.open("qemu:///system").close()
    except Exception as exc:
        require(False, f"needs a running libvirtd: {exc}")


@pytest.fixture(scope="session")
def lab_image_dir() -> Path:
    """The lab image, built once and cached by its recipe hash across runs."""
    require_libvirt()
    from hostagent.labimage.build import build_lab_image

    build_lab_image(IMAGE_CACHE, progress=lambda line: print(f"lab image: {line}"))
    return IMAGE_CACHE


@pytest.fixture(scope="session")
def cloudinit_image_dir() -> Path:
    """The lab-cloudinit image (Debian + cloud-init, debootstrap), cached by its recipe hash."""
    require_libvirt()
    from hostagent.labimage.cloudinit import build_cloudinit_image

    build_cloudinit_image(IMAGE_CACHE, progress=lambda line: print(line, flush=True))
    return IMAGE_CACHE
