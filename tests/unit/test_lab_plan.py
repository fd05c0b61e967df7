"""The lab's pure plan: names, addresses, directories and failure domains of N hosts."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent.lab.libvirtconf import libvirt_files
from hostagent.lab.plan import host_index, plan_lab


def test_three_hosts() -> None:
    plan = plan_lab(3, root=Path("/lab"))
    assert [h.name for h in plan.hosts] == ["h1", "h2", "h3"]
    assert [str(h.address) for h in plan.hosts] == [
        "10.250.0.11/24",
        "10.250.0.12/24",
        "10.250.0.13/24",
    ]
    assert str(plan.gateway) == "10.250.0.1/24"
    assert [h.veth for h in plan.hosts] == ["halabv1", "halabv2", "halabv3"]
    assert [h.failure_domain for h in plan.hosts] == ["fd-1", "fd-2", "fd-3"]
    assert plan.host("h2").state_dir == Path("/lab/h2/state")
    assert plan.host("h2").command_log == Path("/lab/h2/logs/command.log")


def test_failure_domains_round_robin_or_named() -> None:
    assert [h.failure_domain for h in plan_lab(5, failure_domains=2).hosts] == [
        "fd-1",
        "fd-2",
        "fd-1",
        "fd-2",
        "fd-1",
    ]
    named = plan_lab(2, failure_domains=["rack-a", "rack-b"]).hosts
    assert [h.failure_domain for h in named] == ["rack-a", "rack-b"]
    with pytest.raises(ValueError, match="one domain per host"):
        plan_lab(3, failure_domains=["rack-a"])


def test_veths_are_recognised_by_prefix_only() -> None:
    plan = plan_lab(2)
    assert plan.is_veth("halabv7")
    assert not plan.is_veth("halab0")
    assert not plan.is_veth("halabv")
    assert not plan.is_veth("eth0")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subnet": "10.0.0.0/28"}, "too small"),
        ({"bridge": "a-very-long-bridge-name"}, "bridge name"),
        ({"bridge": "lab", "veth_prefix": "labv"}, "overlap"),
    ],
)
def test_bad_plans_are_refused(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_lab(8, **kwargs)  # type: ignore[arg-type]


def test_host_names() -> None:
    assert host_index("h12") == 12
    assert host_index("h0") is None
    assert host_index("zone") is None


def test_each_host_keeps_qemu_out_of_the_shared_cgroups_and_image_xattrs() -> None:
    text = libvirt_files()["qemu.conf"]
    assert "cgroup_controllers = [ ]" in text
    assert "remember_owner = 0" in text
