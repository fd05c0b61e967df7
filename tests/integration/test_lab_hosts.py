"""Lab hosts for real: namespaces with their own libvirtd, an underlay bridge, a lab VM.

Two hosts are started on a bridge and subnet of the test's own (halabt0, 10.254.0.0/24),
so a lab running on the machine is not disturbed (10.248-10.253 are taken by other tests'
bridges in the root namespace), under a fixed lab root, so that the leftovers of a crashed
run are removed by the next one. The last test starts a second lab
(halabt1, 10.254.1.0/24) with a VM running and checks that `lab_down` leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import icmplib
import pytest
import yaml

from cloudconfig.configdrive import build_config_drive
from hostagent.images import ImageCatalog
from hostagent.lab import procs
from hostagent.lab.hosts import LabHost, exec_in
from hostagent.lab.lifecycle import find_inits, lab_down, lab_up
from hostagent.lab.links import link_names
from hostagent.lab.plan import HostPlan, LabPlan, plan_lab
from hostagent.virt.domain import DomainMeta, DomainParams, domain_xml
from tests.conftest import require

pytestmark = pytest.mark.integration

ROOTS = Path("/var/tmp")  # QEMU (libvirt-qemu) must traverse to the VM's files
VIRSH = ["virsh", "-c", "qemu:///system"]
VM_NAME = "halabt-vm"
VM_BRIDGE = "labbr0"  # inside h1: the VM's network
VM_GATEWAY = "10.99.0.1"
VM_ADDRESS = "10.99.0.2"
VM_MAC = "52:54:00:1a:b0:01"
BOOTED = "hostagent-lab: ready; idling"
BOOT_TIMEOUT_S = 120.0
PING = "import icmplib, sys; sys.exit(0 if icmplib.ping(sys.argv[1], count=1, timeout=1, privileged=True).is_alive else 1)"  # noqa: E501


def _require_lab() -> None:
    require(os.geteuid() == 0, "needs root (namespaces, bridges, libvirtd)")
    tools = ("unshare", "nsenter", "ip", "libvirtd", "virtlogd", "virsh", "qemu-img")
    for tool in tools:
        require(shutil.which(tool) is not None, f"needs {tool} on PATH")


def _plan(tag: str, bridge: str, subnet: str, veth_prefix: str) -> LabPlan:
    return plan_lab(
        2, root=ROOTS / f"hostagent-lab-test-{tag}", bridge=bridge, subnet=subnet,
        veth_prefix=veth_prefix,
    )  # fmt: skip


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[LabPlan, list[LabHost]]]:
    _require_lab()
    plan = _plan("hosts", "halabt0", "10.254.0.0/24", "halabtv")
    lab_down(plan, remove_dirs=True)  # what a crashed earlier run left
    running: list[LabHost] = []
    try:
        started = time.monotonic()
        running = lab_up(plan)
        print(f"2 lab hosts up in {time.monotonic() - started:.1f} s")
        yield plan, running
    finally:
        lab_down(plan, running=running, remove_dirs=True)
    assert not [name for name in link_names() if name == plan.bridge or plan.is_veth(name)]


# --- helpers --------------------------------------------------------------------------


def _domains(host: HostPlan | None) -> list[str]:
    """Every domain (defined or running) of the host's libvirtd; None: the root namespace's."""
    argv = [*VIRSH, "list", "--all", "--name"]
    if host is None:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    return exec_in(host, argv).stdout.split()


def _pings(host: HostPlan, address: str) -> bool:
    return exec_in(host, [sys.executable, "-c", PING, address], check=False).returncode == 0


def _libvirtds_in(namespace: str) -> list[int]:
    return [
        pid
        for pid in procs.in_namespace(namespace)
        if (procs.cmdline(pid) or [""])[0].endswith("libvirtd")
    ]


def _wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)  # polling interval, not a synchronisation
    return time.monotonic() - started


@dataclass
class Vm:
    host: HostPlan
    work: Path

    @property
    def console(self) -> Path:
        return self.work / "console.log"

    def state(self) -> str:
        return exec_in(self.host, [*VIRSH, "domstate", VM_NAME], check=False).stdout.strip()


def _vm_files(work: Path) -> dict[str, bytes]:
    network = {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": VM_MAC},
                "set-name": "eth0",
                "addresses": [f"{VM_ADDRESS}/24"],
                "routes": [{"to": "0.0.0.0/0", "via": VM_GATEWAY}],
            }
        },
    }
    meta = {"instance-id": f"iid-{VM_NAME}", "local-hostname": VM_NAME}
    return {
        "meta-data": yaml.safe_dump(meta).encode(),
        "network-config": yaml.safe_dump(network, sort_keys=False).encode(),
        "user-data": b"#cloud-config\n{}\n",  # no phone-home: the guest logs it and idles
    }


def _start_vm(host: HostPlan, image_dir: Path) -> Vm:
    """A persistent lab VM in the host, on a bridge of the host's own; started."""
    image = ImageCatalog(image_dir).get("lab")
    assert image is not None, f"no lab image in {image_dir}"
    exec_in(host, ["ip", "link", "add", VM_BRIDGE, "type", "bridge"])
    exec_in(host, ["ip", "addr", "add", f"{VM_GATEWAY}/24", "dev", VM_BRIDGE])
    exec_in(host, ["ip", "link", "set", VM_BRIDGE, "up"])
    vm = Vm(host, host.state_dir / "vm")
    (vm.work / "pki").mkdir(parents=True)
    for directory in (vm.work, vm.work / "pki"):
        directory.chmod(0o755)
    overlay = vm.work / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk), "-F", "qcow2",
         str(overlay), "1G"],
        check=True,
    )  # fmt: skip
    build_config_drive(vm.work / "cidata.iso", _vm_files(vm.work))
    params = DomainParams(
        name=VM_NAME,
        domain_type="qemu",  # KVM hangs on these machines
        vcpus=1,
        memory_mib=256,
        kernel=image.kernel,
        initrd=image.initrd,
        cmdline=image.cmdline,
        disk=overlay,
        config_drive=vm.work / "cidata.iso",
        pki_dir=vm.work / "pki",
        pki_tag="hostagent-pki",
        console_log=vm.console,
        bridge=VM_BRIDGE,
        tap="labvm0",
        mac=VM_MAC,
        mtu=1500,
        meta=DomainMeta(cluster="lab", node="vm", host=host.name, spec_hash="0" * 64),
    )
    (vm.work / "domain.xml").write_text(domain_xml(params))
    exec_in(host, [*VIRSH, "define", str(vm.work / "domain.xml")])
    exec_in(host, [*VIRSH, "start", VM_NAME])
    return vm


# --- the tests ------------------------------------------------------------------------


def test_each_host_has_its_own_libvirtd(lab: tuple[LabPlan, list[LabHost]]) -> None:
    plan, running = lab
    h1, h2 = plan.hosts
    probe = h1.state_dir / "probe.xml"
    probe.write_text(
        "<domain type='qemu'><name>halabt-probe</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    exec_in(h1, [*VIRSH, "define", str(probe)])
    try:
        assert "halabt-probe" in _domains(h1)
        assert "halabt-probe" not in _domains(h2)
        assert "halabt-probe" not in _domains(None)
        # Persistent definitions go to the host's own /etc/libvirt, not the machine's.
        assert (h1.libvirt_config_dir / "qemu" / "halabt-probe.xml").is_file()
        assert not Path("/etc/libvirt/qemu/halabt-probe.xml").exists()
    finally:
        exec_in(h1, [*VIRSH, "undefine", "halabt-probe"], check=False)

    namespaces = [procs.pid_namespace(host.pid) for host in running]
    assert None not in namespaces and len(set(namespaces)) == 2
    own = [_libvirtds_in(ns) for ns in namespaces if ns is not None]
    assert [len(pids) for pids in own] == [1, 1], own
    root_namespace = procs.pid_namespace(os.getpid())
    assert all(procs.pid_namespace(pids[0]) != root_namespace for pids in own)
    for host in plan.hosts:
        assert exec_in(host, ["hostname"]).stdout.strip() == host.name
        assert (host.log_dir / "libvirtd.log").is_file()
    # The hosts' mounts (tmpfs "hostagent-lab" on /run, ...) stay inside them.
    assert "hostagent-lab" not in Path("/proc/self/mountinfo").read_text()


def test_hosts_reach_each_other_on_the_underlay(lab: tuple[LabPlan, list[LabHost]]) -> None:
    plan, _ = lab
    h1, h2 = plan.hosts
    shown = json.loads(exec_in(h1, ["ip", "-j", "addr", "show", "dev", h1.device]).stdout)
    assert f"{h1.address.ip}" in [info["local"] for info in shown[0]["addr_info"]]
    assert _pings(h1, str(h2.address.ip))
    assert _pings(h2, str(plan.gateway.ip))
    assert icmplib.ping(str(h1.address.ip), count=1, timeout=2, privileged=True).is_alive
    # Each host has the devices of its own network namespace only, in sysfs too.
    assert sorted(exec_in(h1, ["ls", "/sys/class/net"]).stdout.split()) == ["lo", h1.device]


def test_lab_vm_boots_inside_a_host(
    lab: tuple[LabPlan, list[LabHost]], lab_image_dir: Path
) -> None:
    plan, running = lab
    h1, h2 = plan.hosts
    vm = _start_vm(h1, lab_image_dir)
    try:
        _wait_for("domain running", lambda: vm.state() == "running", 30)
        took = _wait_for(
            f"{BOOTED!r} on the console", lambda: BOOTED in _read(vm.console), BOOT_TIMEOUT_S
        )
        print(f"lab VM booted to its idle loop in {took:.1f} s")
        console = _read(vm.console)
        assert f"hostagent-lab: hostname set to {VM_NAME}" in console
        assert f"addresses {VM_ADDRESS}/24" in console
        took = _wait_for("VM answers ping from h1", lambda: _pings(h1, VM_ADDRESS), 30)
        print(f"VM answered ping after {took:.1f} s")
        assert VM_NAME not in _domains(h2) and VM_NAME not in _domains(None)
        qemus = [
            pid
            for pid in procs.in_namespace(procs.pid_namespace(running[0].pid) or "?")
            if "qemu-system" in " ".join(procs.cmdline(pid) or [])
        ]
        assert len(qemus) == 1, "the VM's QEMU runs in h1's pid namespace"
    except BaseException:
        print("---- guest console ----\n" + _read(vm.console)[-4000:])
        raise
    finally:
        exec_in(h1, [*VIRSH, "destroy", VM_NAME], check=False)
        exec_in(h1, [*VIRSH, "undefine", VM_NAME], check=False)


def test_down_leaves_nothing_after_a_crash(lab_image_dir: Path) -> None:
    """lab_down without the LabHost objects (as after a crash of `lab up`) finds it all."""
    _require_lab()
    plan = _plan("down", "halabt1", "10.254.1.0/24", "halabtw")
    lab_down(plan, remove_dirs=True)
    running: list[LabHost] = []
    try:
        running = lab_up(plan)
        vm = _start_vm(plan.hosts[0], lab_image_dir)
        _wait_for("domain running", lambda: vm.state() == "running", 30)
        namespaces = [procs.pid_namespace(host.pid) for host in running]
        members = {ns: procs.in_namespace(ns) for ns in namespaces if ns is not None}
        assert len(members) == 2 and all(members.values())

        started = time.monotonic()
        removed = lab_down(plan, remove_dirs=True)  # not told what runs: it must find it
        print(f"lab down took {time.monotonic() - started:.1f} s: {removed}")
        for host in running:
            host.launcher.wait(10)  # unshare ends with its init
    finally:
        lab_down(plan, running=running, remove_dirs=True)

    assert f"h1: domain {VM_NAME}" in removed
    assert {f"h1: init (pid {running[0].pid})", f"h2: init (pid {running[1].pid})"} <= set(removed)
    assert f"bridge {plan.bridge}" in removed
    assert f"dir {plan.root}" in removed and not plan.root.exists()
    for namespace in members:
        assert procs.in_namespace(namespace) == [], f"processes left in {namespace}"
    assert not [name for name in link_names() if name == plan.bridge or plan.is_veth(name)]
    assert find_inits(plan.root) == []
    assert VM_NAME not in _domains(None)
    assert lab_down(plan, remove_dirs=True) == [], "a second down finds nothing"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
