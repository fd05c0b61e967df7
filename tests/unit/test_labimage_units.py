"""hostagent.labimage.debian.set_units on a tree whose links point into its own /lib: they
dangle on the build host, and must be found all the same."""

from __future__ import annotations

import os
from pathlib import Path

from hostagent.labimage.debian import set_units


def link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def test_disabled_and_masked_units_lose_their_links_and_aliases(tmp_path: Path) -> None:
    units = tmp_path / "etc/systemd/system"
    # What Debian's packages leave (deb-systemd-helper): wants links and an alias, all
    # absolute into a /lib the build host may not have.
    link(
        units / "multi-user.target.wants/keepalived-test.service", "/lib/x/keepalived-test.service"
    )
    link(units / "multi-user.target.wants/etcd-test.service", "/lib/x/etcd-test.service")
    link(units / "etcd2-test.service", "/lib/x/etcd-test.service")
    link(units / "sockets.target.requires/slow-test.socket", "/lib/x/slow-test.socket")
    link(units / "multi-user.target.wants/kept-test.service", "/lib/x/kept-test.service")
    assert not (units / "etcd2-test.service").exists()  # dangling here, as on a build host
    set_units(
        tmp_path,
        {"multi-user.target.wants": ("on-test.service",)},
        masked=("slow-test.socket",),
        disabled=("etcd-test.service", "keepalived-test.service"),
    )
    left = sorted(str(path.relative_to(units)) for path in units.rglob("*") if path.is_symlink())
    assert left == [
        "multi-user.target.wants/kept-test.service",
        "multi-user.target.wants/on-test.service",
        "slow-test.socket",
    ]
    assert os.readlink(units / "slow-test.socket") == "/dev/null"
    assert os.readlink(units / "multi-user.target.wants/on-test.service") == (
        "/lib/systemd/system/on-test.service"
    )
