"""`hostagent lab up|down|status`: a zone and several agent hosts on this machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hostagent.config import Config
from hostagent.lab.plan import DEFAULT_ROOT
from hostagent.lab.zonelab import LabSettings, down, status, up


def _settings(args: argparse.Namespace) -> LabSettings:
    return LabSettings(
        hosts=getattr(args, "hosts", 3),
        root=args.root,
        domain_type=getattr(args, "domain_type", "qemu"),
        failure_domains=getattr(args, "failure_domains", None),
    )


def cmd_lab_up(args: argparse.Namespace, _: Config) -> None:
    up(_settings(args), progress=lambda line: print(f"lab: {line}", flush=True))
    print("next: hostagent cluster create demo --masters 3 --workers 2 --wait")


def cmd_lab_down(args: argparse.Namespace, _: Config) -> None:
    removed = down(_settings(args), purge=args.purge, progress=lambda line: print(f"lab: {line}"))
    if not removed:
        print("lab: nothing to remove")


def cmd_lab_status(args: argparse.Namespace, _: Config) -> None:
    print(json.dumps(status(_settings(args)), indent=2))


def add_commands(sub: Any) -> None:
    lab = sub.add_parser("lab", help="a zone and N hosts (namespaces) on this machine")
    verbs = lab.add_subparsers(dest="lab", required=True)
    for name, func, text in (
        ("up", cmd_lab_up, "start the zone and the hosts, until every host is Ready"),
        ("down", cmd_lab_down, "stop everything (VMs included) and remove the lab's links"),
        ("status", cmd_lab_status, "the zone's view of the lab's hosts"),
    ):
        parser = verbs.add_parser(name, help=text)
        parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the lab's files")
        parser.set_defaults(func=func)
        if name == "up":
            parser.add_argument("--hosts", type=int, default=3, help="how many hosts (1..200)")
            parser.add_argument(
                "--failure-domains", type=int, help="spread hosts round-robin over this many"
            )
            parser.add_argument(
                "--domain-type",
                choices=["qemu", "kvm"],
                default="qemu",
                help="qemu (TCG, works everywhere) or kvm",
            )
        if name == "down":
            parser.add_argument("--purge", action="store_true", help="also remove the lab's files")
