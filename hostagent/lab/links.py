"""The lab's links in the root namespace: the shared bridge and the hosts' veths.

Verbs and arguments are those of `ip link` / `ip addr`, which this module runs.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Interface

from hostagent.lab.commands import run
from hostagent.lab.errors import LabError


def link_names() -> list[str]:
    """The names of the links of the calling process's network namespace."""
    return [link["ifname"] for link in json.loads(run(["ip", "-j", "link", "show"]).stdout)]


def link_exists(name: str) -> bool:
    return name in link_names()


def ensure_bridge(name: str, address: IPv4Interface) -> bool:
    """The bridge exists, is up and holds address; True when it had to be created."""
    created = not link_exists(name)
    if created:
        run(["ip", "link", "add", name, "type", "bridge"])
    if str(address) not in _addresses(name):
        run(["ip", "addr", "add", str(address), "dev", name])
    run(["ip", "link", "set", name, "up"])
    return created


def add_veth(name: str, peer: str, netns_pid: int, bridge: str) -> None:
    """A veth pair: name stays here as a port of bridge, peer goes into the process's netns."""
    run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer, "netns", str(netns_pid)])
    try:
        run(["ip", "link", "set", name, "master", bridge, "up"])
    except LabError:
        delete_link(name)
        raise


def delete_link(name: str) -> bool:
    """Remove the link; False when there was none (a veth goes with its namespace)."""
    done = run(["ip", "link", "del", name], check=False)
    if done.returncode == 0:
        return True
    if not link_exists(name):
        return False
    raise LabError(f"ip link del {name}: {done.stderr.strip()}")


def _addresses(name: str) -> set[str]:
    shown = json.loads(run(["ip", "-j", "addr", "show", "dev", name]).stdout)
    return {
        f"{info['local']}/{info['prefixlen']}"
        for link in shown
        for info in link.get("addr_info", [])
        if info.get("family") == "inet"
    }
