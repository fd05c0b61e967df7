"""NodeContext: everything the cloud-config templates may know about one node.

The templates see only this object's fields, never a NodeSpec or the agent's
config: the caller decides what a guest may learn, and a template change cannot
reach into the rest of the agent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeContext:
    cluster: str
    node: str
    role: str  # "master" | "worker": picks the template
    hostname: str
    instance_id: str  # a new value makes cloud-init run its per-instance modules again
    mac: str
    address: str  # IPv4 with prefix length, e.g. "10.42.0.11/24"
    gateway: str
    mtu: int
    kubernetes_version: str
    ssh_authorized_keys: tuple[str, ...]
    phone_home_url: str
    phone_home_token: str
