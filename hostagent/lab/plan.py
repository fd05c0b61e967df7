"""Pure: the plan of a lab of N hosts (names, underlay addresses, directories).

The hosts h1..hN share one bridge in the root namespace (the "switch"), which holds the
first address of the underlay subnet. Host i is 10.250.0.(10+i) on its `ul0`, a veth whose
root-side end `halabv<i>` is a port of the bridge. Everything a host keeps lives under
<root>/<host>/: state (the agent's state_dir), config (its configuration and its own
/etc/libvirt), logs (its init, libvirtd, virtlogd, QEMU and command logs), pid (its init).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

DEFAULT_ROOT = Path("/var/lib/hostagent-lab")
DEFAULT_BRIDGE = "halab0"
DEFAULT_SUBNET = "10.250.0.0/24"
DEFAULT_VETH_PREFIX = "halabv"
UNDERLAY_DEVICE = "ul0"
FIRST_HOST_OFFSET = 10  # host i gets the subnet's address 10 + i
IFNAMSIZ = 15  # Linux interface names are at most 15 bytes
PID_FILE = "pid"  # in the host's directory
COMMAND_LOG = "command.log"  # in the host's log directory
HOST_NAME = re.compile(r"h([1-9][0-9]*)")


@dataclass(frozen=True)
class HostPlan:
    name: str
    index: int
    address: IPv4Interface  # on UNDERLAY_DEVICE, inside the host
    veth: str  # the root-side end, a port of the lab bridge
    failure_domain: str
    dir: Path
    device: str = UNDERLAY_DEVICE

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def config_dir(self) -> Path:
        return self.dir / "config"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def libvirt_config_dir(self) -> Path:
        """Bind-mounted over /etc/libvirt inside the host."""
        return self.config_dir / "libvirt"

    @property
    def pid_file(self) -> Path:
        """The PID (root namespace) of the host's init, while it runs."""
        return self.dir / PID_FILE

    @property
    def init_log(self) -> Path:
        return self.log_dir / "init.log"

    @property
    def command_log(self) -> Path:
        return self.log_dir / COMMAND_LOG


@dataclass(frozen=True)
class LabPlan:
    root: Path
    bridge: str
    gateway: IPv4Interface  # the bridge's address: the root namespace on the underlay
    veth_prefix: str
    hosts: tuple[HostPlan, ...]

    def host(self, name: str) -> HostPlan:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"no host {name!r} in the lab (hosts: {[h.name for h in self.hosts]})")

    def is_veth(self, ifname: str) -> bool:
        """Whether a link name is one of this lab's veths (any host count)."""
        return re.fullmatch(re.escape(self.veth_prefix) + r"[1-9][0-9]*", ifname) is not None


def plan_lab(
    hosts: int,
    *,
    root: Path = DEFAULT_ROOT,
    bridge: str = DEFAULT_BRIDGE,
    subnet: str | IPv4Network = DEFAULT_SUBNET,
    veth_prefix: str = DEFAULT_VETH_PREFIX,
    failure_domains: int | Sequence[str] | None = None,
) -> LabPlan:
    """The plan of hosts h1..h<hosts>.

    failure_domains: None gives each host its own ("fd-<i>"); an int k spreads the hosts
    round-robin over fd-1..fd-k; a sequence names each host's domain, in host order.
    """
    if hosts < 0:
        raise ValueError(f"hosts must be >= 0, not {hosts}")
    network = IPv4Network(subnet)
    root = root.absolute()  # inits are recognised in /proc by their (absolute) directory
    _check_ifname(bridge, "bridge")
    _check_ifname(f"{veth_prefix}{hosts}", "veth")
    if veth_prefix.startswith(bridge) or bridge.startswith(veth_prefix):
        raise ValueError(f"bridge {bridge!r} and veth prefix {veth_prefix!r} overlap")
    last = FIRST_HOST_OFFSET + hosts
    if network.num_addresses < last + 2:  # + network and broadcast addresses
        raise ValueError(f"subnet {network} is too small for {hosts} hosts")
    domains = _failure_domains(hosts, failure_domains)
    plans = tuple(
        HostPlan(
            name=f"h{i}",
            index=i,
            address=IPv4Interface(f"{network[FIRST_HOST_OFFSET + i]}/{network.prefixlen}"),
            veth=f"{veth_prefix}{i}",
            failure_domain=domains[i - 1],
            dir=root / f"h{i}",
        )
        for i in range(1, hosts + 1)
    )
    gateway = IPv4Interface(f"{network[1]}/{network.prefixlen}")
    return LabPlan(root=root, bridge=bridge, gateway=gateway, veth_prefix=veth_prefix, hosts=plans)


def host_index(name: str) -> int | None:
    """i for a host name "h<i>"; None for anything else."""
    match = HOST_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def _failure_domains(hosts: int, spec: int | Sequence[str] | None) -> list[str]:
    if spec is None:
        return [f"fd-{i}" for i in range(1, hosts + 1)]
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"failure_domains must be >= 1, not {spec}")
        return [f"fd-{(i - 1) % spec + 1}" for i in range(1, hosts + 1)]
    if isinstance(spec, str) or len(spec) != hosts:
        raise ValueError(f"failure_domains must name one domain per host ({hosts})")
    return list(spec)


def _check_ifname(name: str, what: str) -> None:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name) or len(name) > IFNAMSIZ:
        raise ValueError(f"{what} name {name!r}: 1..{IFNAMSIZ} of [A-Za-z0-9_-], from a letter")
