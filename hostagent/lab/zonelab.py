"""`hostagent lab up|down`: a zone and N agent hosts on this machine.

up: the lab image, the lab CA (a TLS certificate for the zone and for each agent), the
shared bridge, the zone (a process in the root namespace, listening on the bridge's
address), then each host (namespaces, its own libvirtd, its agent with pki backend
"zone"), until every host is registered and Ready. Mutual TLS is on: each agent
bootstraps its client certificate of the zone's control-plane CA with a one-time host
token, then reports with the certificate only, and the zone calls it with its own. It
writes the zone's connection to <root>/zone-client.json, which the `cluster` verbs use
by default.
With --zone-replicas N (N > 1) the zone is N replicas on a 3-member etcd cluster
(haplan.py, etcdlab.py): every agent and the context get the list of the replicas' URLs.
down: every host (VMs included), the zone (every replica), etcd, the bridge; --purge also
the lab's files.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import http
from common.files import ensure_secret, write_atomically
from hostagent.lab import etcdlab, links, procs
from hostagent.lab.errors import LabError
from hostagent.lab.haplan import ReplicaPlan, ZonePlan, plan_zone
from hostagent.lab.hosts import nsenter_argv, running_pid
from hostagent.lab.lifecycle import lab_down, lab_up
from hostagent.lab.plan import DEFAULT_ROOT, HostPlan, LabPlan, plan_lab
from hostagent.labimage.build import build_lab_image
from hostagent.zone.client import LAB_CONTEXT, ZoneClient, ZoneContext, resolve_context
from hostagent.zone.config import load_zone_config
from hostagent.zone.tokens import next_host_token
from pki import servicecerts

log = logging.getLogger(__name__)

AGENT_PORT = 8470


@dataclass(frozen=True)
class LabSettings:
    hosts: int = 3
    root: Path = DEFAULT_ROOT
    domain_type: str = "qemu"  # TCG: KVM hangs on the machines this lab was made on
    heartbeat_s: float = 2.0
    bridge: str = "halab0"
    subnet: str = "10.250.0.0/24"
    veth_prefix: str = "halabv"
    failure_domains: int | None = None
    context_file: Path = LAB_CONTEXT
    agent_extra_toml: str = ""  # appended to every agent's configuration (tests, experiments)
    zone_extra_toml: str = ""  # appended to the zone's configuration (tests, experiments)
    image_dir: Path | None = None  # where the lab image is built and read; default <root>/images
    zone_replicas: int = 1  # more: that many replicas on a 3-member etcd cluster

    @property
    def images(self) -> Path:
        return self.image_dir or self.root / "images"

    def plan(self) -> LabPlan:
        return plan_lab(
            self.hosts,
            root=self.root,
            bridge=self.bridge,
            subnet=self.subnet,
            veth_prefix=self.veth_prefix,
            failure_domains=self.failure_domains,
        )

    def zone(self) -> ZonePlan:
        return plan_zone(self.root, str(self.plan().gateway.ip), self.zone_replicas)


def zone_dir(root: Path) -> Path:
    return root / "zone"


def hostagent_command() -> str:
    return str(Path(sys.executable).with_name("hostagent"))


def write_zone_config(settings: LabSettings, replica: ReplicaPlan) -> Path:
    zone = settings.zone()
    cert, key = servicecerts.issue_server_cert(
        settings.root / "ca", "zone", replica.address, zone_dir(settings.root) / "tls"
    )
    replica.dir.mkdir(parents=True, exist_ok=True)
    replica.config.write_text(
        f"""# written by `hostagent lab up`
state_dir = "{zone.state_dir}"

[api]
listen = "{replica.listen}"
tls_cert = "{cert}"
tls_key = "{key}"

[hosts]
heartbeat_interval_s = {settings.heartbeat_s}
heartbeat_timeout_s = {settings.heartbeat_s * 4}

[agents]
ca_file = "{settings.root / "ca" / "ca.crt"}"
retry_initial_s = 0.5
retry_max_s = 5.0
"""
        + _replica_toml(zone, replica)
        + settings.zone_extra_toml
    )
    return replica.config


def _replica_toml(zone: ZonePlan, replica: ReplicaPlan) -> str:
    """The [store] and [replica] sections of a replica on the lab's etcd ("": SQLite)."""
    if not zone.members:
        return ""
    ca, cert, key = etcdlab.client_files(zone)
    endpoints = ", ".join(f'"{e}"' for e in zone.endpoints)
    return f"""
[store]
backend = "etcd"
endpoints = [{endpoints}]
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"

[replica]
id = "{replica.id}"
api_url = "{replica.url}"
"""


def write_agent_config(settings: LabSettings, plan: LabPlan, host: HostPlan) -> Path:
    address = str(host.address.ip)
    cert, key = servicecerts.issue_server_cert(
        settings.root / "ca", host.name, address, host.config_dir / "tls"
    )
    # A fresh one-time token: the agent bootstraps with it unless it holds a certificate
    zone = settings.zone()
    token = next_host_token(load_zone_config(zone.replicas[0].config), host.name)
    token_file = host.config_dir / "zone-token"
    write_atomically(token_file, (token + "\n").encode(), 0o600)
    config = host.config_dir / "hostagent.toml"
    config.write_text(
        f"""# written by `hostagent lab up`
host_id = "{host.name}"
state_dir = "{host.state_dir}"
image_dir = "{settings.images}"
pulled_dir = "{host.state_dir / "pulled"}"

[api]
listen = "{address}:{AGENT_PORT}"
tls_cert = "{cert}"
tls_key = "{key}"

[libvirt]
domain_type = "{settings.domain_type}"

[network]
underlay_address = "{address}"

[pki]
backend = "zone"

[zone]
url = [{", ".join(f'"{url}"' for url in zone.urls)}]
token_file = "{token_file}"
ca_file = "{settings.root / "ca" / "ca.crt"}"
failure_domain = "{host.failure_domain}"
api_url = "https://{address}:{AGENT_PORT}"
{settings.agent_extra_toml}"""
    )
    return config


def start_zone(
    settings: LabSettings, config: Path, context: ZoneContext, url: str | None = None
) -> int:
    """Start the zone (or a replica) of config, its log and pid file beside it; return once
    it answers at url (default: the context's first URL)."""
    directory = config.parent
    log_path = directory / "zone.log"
    argv = [
        hostagent_command(),
        "--log-format",
        "text",
        "zone",
        "serve",
        "--zone-config",
        str(config),
    ]
    with log_path.open("ab") as output:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True
        )
    (directory / "pid").write_text(f"{process.pid}\n")
    deadline = time.monotonic() + 30
    url = url or context.url
    with http.client(url, tls=context.tls(), timeout_s=2) as probe:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise LabError(f"the zone exited ({process.returncode}); see {log_path}")
            try:
                probe.get("/healthz")
                log.info("zone up at %s (log %s)", url, log_path)
                return process.pid
            except http.TransportError:
                time.sleep(0.2)
    raise LabError(f"the zone did not answer within 30 s; see {log_path}")


def replica_pid(replica: ReplicaPlan) -> int | None:
    """The PID of the replica's `hostagent zone serve` while it runs."""
    return procs.running(replica.pid_file, str(replica.config))


def stop_zone(root: Path, timeout_s: float = 15.0) -> list[str]:
    """Stop the zone and every replica of it under <root>/zone (found by pid file and
    command line, whatever settings started them)."""
    directory = zone_dir(root)
    places = [directory, *sorted(directory.glob("r[0-9]*"))] if directory.is_dir() else []
    removed = []
    for place in places:
        pid = procs.stop(place / "pid", str(place / "zone.toml"), timeout_s)
        if pid is not None:
            what = "zone" if place == directory else f"zone replica {place.name}"
            removed.append(f"{what} (pid {pid})")
    return removed


def up(settings: LabSettings, progress: Callable[[str], None] = print) -> ZoneContext:
    plan, zone = settings.plan(), settings.zone()
    found = (
        *_any_zone(settings.root).replicas,
        *_any_zone(settings.root, replicated=True).replicas,
    )
    if any(replica_pid(replica) is not None for replica in found):
        raise LabError(f"a lab is already up under {settings.root}; `hostagent lab down` first")
    started = time.monotonic()
    progress("lab image (cached by recipe)")
    build_lab_image(settings.images)
    configs = [write_zone_config(settings, replica) for replica in zone.replicas]
    ensure_secret(zone.state_dir / "api-token")
    context = ZoneContext(
        url=zone.urls[0],
        token=(zone.state_dir / "api-token").read_text().strip(),
        ca_file=str(settings.root / "ca" / "ca.crt"),
        urls=tuple(zone.urls),
    )
    if links.ensure_bridge(plan.bridge, plan.gateway):
        progress(f"bridge {plan.bridge} {plan.gateway}")
    try:
        if zone.members:
            etcdlab.start(zone)
            progress(f"etcd members at {', '.join(zone.endpoints)}")
        # One after the other: the first makes the CAs in the state directory they share.
        for replica, config in zip(zone.replicas, configs, strict=True):
            start_zone(settings, config, context, replica.url)
        progress(f"zone at {', '.join(zone.urls)}")
    except BaseException:
        down(settings, progress=lambda line: None)
        raise
    agents = {host.name: write_agent_config(settings, plan, host) for host in plan.hosts}
    try:
        lab_up(plan, command=lambda host: _agent_argv(agents[host.name]), progress=progress)
        progress(f"{len(plan.hosts)} hosts started: {', '.join(h.name for h in plan.hosts)}")
        wait_hosts_ready(context, [h.name for h in plan.hosts], progress)
    except BaseException:
        down(settings, progress=lambda line: None)
        raise
    context.save(settings.context_file)
    progress(f"lab up in {time.monotonic() - started:.0f} s; zone context {settings.context_file}")
    return context


def _agent_argv(config: Path) -> list[str]:
    return [hostagent_command(), "--log-format", "text", "-c", str(config), "serve"]


def agent_pids(host: HostPlan) -> list[int]:
    """The PIDs (root namespace) of the host's agent: `hostagent ... -c <its config> serve`."""
    wanted = _agent_argv(host.config_dir / "hostagent.toml")[1:]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0")[:-1]]
        except OSError:
            continue
        # A console script runs as `python .../hostagent ARGS`; the host's init and
        # launcher carry the agent's command line at the end of theirs.
        script = len(argv) == len(wanted) + 2 and Path(argv[1]).name == "hostagent"
        if script and argv[2:] == wanted and procs.alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def start_agent(host: HostPlan) -> None:
    """Start the host's agent again (after it was stopped or crashed), inside the host."""
    pid = running_pid(host)
    if pid is None:
        raise LabError(f"{host.name} is not running; `hostagent lab up` first")
    argv = nsenter_argv(pid, _agent_argv(host.config_dir / "hostagent.toml"))
    with host.command_log.open("ab") as output:
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True
        )


def wait_hosts_ready(
    context: ZoneContext,
    names: list[str],
    progress: Callable[[str], None],
    timeout_s: float = 120.0,
) -> None:
    client = ZoneClient(context)
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    try:
        while True:
            ready = {h["host"] for h in client.hosts() if h["state"] == "Ready"}
            for name in sorted(ready - seen):
                progress(f"{name}: registered with the zone")
            seen |= ready
            if set(names) <= ready:
                return
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(set(names) - ready))
                raise LabError(
                    f"hosts {missing} did not register within {timeout_s:.0f} s; see "
                    "<lab root>/<host>/logs/command.log"
                )
            time.sleep(0.5)
    finally:
        client.close()


def down(
    settings: LabSettings, *, purge: bool = False, progress: Callable[[str], None] = print
) -> list[str]:
    # The zone first: a leader delivering to hosts that are gone waits for its calls to
    # time out before it stops.
    removed = stop_zone(settings.root)
    removed += etcdlab.stop(_any_zone(settings.root, replicated=True))
    removed += lab_down(settings.plan(), remove_dirs=purge)
    if settings.context_file.exists():
        settings.context_file.unlink()
        removed.append(f"zone context {settings.context_file}")
    if purge:
        for path in (zone_dir(settings.root), settings.root / "ca", settings.root / "etcd"):
            if path.exists():
                shutil.rmtree(path)
                removed.append(str(path))
        if settings.root.is_dir() and not any(settings.root.iterdir()):
            settings.root.rmdir()
            removed.append(str(settings.root))
    for line in removed:
        progress(f"removed {line}")
    return removed


def status(settings: LabSettings) -> dict[str, object]:
    """What is up: the zone's replicas and leader (GET /v1/zone), its hosts, and the etcd
    members of a replicated zone, for `hostagent lab status`."""
    context_file = settings.context_file
    if not context_file.exists():
        return {"up": False}
    context = resolve_context(None, None, context_file, {})
    client = ZoneClient(context)
    try:
        view: dict[str, object] = {"up": True, "zone": list(context.urls)}
        view["replicas"] = client.zone()
        view["hosts"] = client.hosts()
    finally:
        client.close()
    zone = _any_zone(settings.root, str(settings.plan().gateway.ip), replicated=True)
    if any(member.dir.is_dir() for member in zone.members):
        view["etcd"] = [etcdlab.status(zone, member) for member in zone.members]
    return view


def _any_zone(root: Path, address: str = "0.0.0.0", *, replicated: bool = False) -> ZonePlan:
    """The files and processes of a lab's zone under root, as `lab down` and `status` find
    them, whichever settings started it (finding them needs no address)."""
    return plan_zone(root, address, 2 if replicated else 1)
