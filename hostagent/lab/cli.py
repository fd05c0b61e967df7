"""`hostagent lab up|down|status`: a zone and several agent hosts on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hostagent import tables
from hostagent.access import grant_udev_permissions
from hostagent.config import Config
from hostagent.lab.plan import DEFAULT_ROOT
from hostagent.lab.zonelab import LabSettings, down, status, up
from hostagent.zone.client import ZoneClient, resolve_context
from hostagent.zone.describe import describe

DEMO_CLUSTER: dict[str, Any] = {
    "kubernetes_version": "1.31.2",
    "image": "lab",
    "masters": {"count": 3, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
    "workers": {"count": 2, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
}


def _settings(args: argparse.Namespace) -> LabSettings:
    return LabSettings(
        hosts=getattr(args, "hosts", 3),
        root=args.root,
        domain_type=getattr(args, "domain_type", "qemu"),
        failure_domains=getattr(args, "failure_domains", None),
        zone_replicas=getattr(args, "zone_replicas", 1),
    )


def cmd_lab_up(args: argparse.Namespace, _: Config) -> None:
    up(_settings(args), progress=lambda line: print(f"lab: {line}", flush=True))
    print("next: hostagent cluster create demo --masters 3 --workers 2 --wait")


def cmd_lab_demo(args: argparse.Namespace, _: Config) -> None:
    """The README's demo: a lab of 3 hosts (unless one is up) and cluster demo on it."""
    settings = _settings(args)

    def say(line: str) -> None:
        print(f"lab: {line}", flush=True)

    context = up(settings, progress=say) if not settings.context_file.exists() else None
    if context is None:
        say(f"using the lab that is up (zone context {settings.context_file})")
    client = ZoneClient(resolve_context(None, None, settings.context_file, {}))
    try:
        names = {c["name"] for c in client.clusters()}
        if "demo" not in names:
            view = client.put_cluster("demo", DEMO_CLUSTER)
            placed = ", ".join(f"{n['name']} on {n['host']}" for n in view["status"]["nodes"])
            say(f"cluster demo: vni {view['status']['vni']}, {placed}")
        client.wait("demo", "Ready", timeout_s=args.timeout, progress=print)
        print()
        print(describe(client.cluster("demo"), tables.age))
    finally:
        client.close()
    cli = Path(sys.executable).with_name("hostagent")
    print(
        f"""
Every node is Ready: each VM booted on its lab host (a namespace with its own libvirtd
and agent), with certificates from the cluster's CA in the zone, on the cluster's own
network (VNI above; VXLAN between the hosts), and phoned home to its host's agent.
  {cli} zone hosts                        the lab's hosts as the zone sees them
  {cli} cluster describe demo             this tree again
  {cli} cluster scale demo --workers 3 --wait
  {cli} cluster delete demo --wait
  {cli} lab down                          stop everything (add --purge for the files)
Logs: {settings.root}/<host>/logs/ (agent: command.log) and {settings.root}/zone/zone.log"""
    )


def cmd_lab_down(args: argparse.Namespace, _: Config) -> None:
    removed = down(_settings(args), purge=args.purge, progress=lambda line: print(f"lab: {line}"))
    if not removed:
        print("lab: nothing to remove")


def cmd_lab_kvm_permissions(_args: argparse.Namespace, _: Config) -> None:
    """For machines without udev (containers, CI runners, minimal inits): see access.py."""
    granted = grant_udev_permissions()
    if granted:
        print(granted)


def cmd_lab_status(args: argparse.Namespace, _: Config) -> None:
    print(json.dumps(status(_settings(args)), indent=2))


def add_commands(sub: Any) -> None:
    lab = sub.add_parser("lab", help="a zone and N hosts (namespaces) on this machine")
    verbs = lab.add_subparsers(dest="lab", required=True)
    for name, func, text in (
        ("up", cmd_lab_up, "start the zone and the hosts, until every host is Ready"),
        ("down", cmd_lab_down, "stop everything (VMs included) and remove the lab's links"),
        ("status", cmd_lab_status, "the zone's view of the lab's hosts"),
        (
            "demo",
            cmd_lab_demo,
            "a lab of 3 hosts (unless up) and cluster demo (3 masters, 2 workers)",
        ),
        (
            "kvm-permissions",
            cmd_lab_kvm_permissions,
            "give /dev/kvm udev's group and mode (kvm, 0660) where no udev runs; "
            "prints what it changed",
        ),
    ):
        parser = verbs.add_parser(name, help=text)
        parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the lab's files")
        parser.set_defaults(agent_config=False, func=func)
        if name == "demo":
            parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait")
        if name == "up":
            parser.add_argument("--hosts", type=int, default=3, help="how many hosts (1..200)")
            parser.add_argument(
                "--failure-domains", type=int, help="spread hosts round-robin over this many"
            )
            parser.add_argument(
                "--zone-replicas",
                type=int,
                default=1,
                help="zone replicas; more than 1: on a 3-member etcd cluster (default 1: "
                "one zone on SQLite)",
            )
            parser.add_argument(
                "--domain-type",
                choices=["qemu", "kvm"],
                default="qemu",
                help="qemu (TCG, works everywhere) or kvm",
            )
        if name == "down":
            parser.add_argument("--purge", action="store_true", help="also remove the lab's files")
