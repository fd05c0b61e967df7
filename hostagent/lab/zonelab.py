"""`hostagent lab up|down`: a zone and N agent hosts on this machine.

up: the lab image, the lab CA (a TLS certificate for the zone and for each agent), the
shared bridge, the zone (a process in the root namespace, listening on the bridge's
address), then each host (namespaces, its own libvirtd, its agent with pki backend
"zone"), until every host is registered and Ready. Mutual TLS is on: each agent
bootstraps its client certificate of the zone's control-plane CA with a one-time host
token, then reports with the certificate only, and the zone calls it with its own. It
writes the zone's connection to <root>/zone-client.json, which the `cluster` verbs use
by default.
down: every host (VMs included), the zone, the bridge; --purge also the lab's files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import http
from common.files import ensure_secret, write_atomically
from hostagent.lab import links
from hostagent.lab.errors import LabError
from hostagent.lab.hosts import nsenter_argv, running_pid
from hostagent.lab.lifecycle import lab_down, lab_up
from hostagent.lab.plan import DEFAULT_ROOT, HostPlan, LabPlan, plan_lab
from hostagent.labimage.build import build_lab_image
from hostagent.zone.client import LAB_CONTEXT, ZoneClient, ZoneContext
from hostagent.zone.config import load_zone_config
from hostagent.zone.tokens import next_host_token
from pki import servicecerts

log = logging.getLogger(__name__)

ZONE_PORT = 8471
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


def zone_dir(root: Path) -> Path:
    return root / "zone"


def hostagent_command() -> str:
    return str(Path(sys.executable).with_name("hostagent"))


def write_zone_config(settings: LabSettings, plan: LabPlan) -> Path:
    directory = zone_dir(settings.root)
    address = str(plan.gateway.ip)
    cert, key = servicecerts.issue_server_cert(
        settings.root / "ca", "zone", address, directory / "tls"
    )
    config = directory / "zone.toml"
    config.write_text(
        f"""# written by `hostagent lab up`
state_dir = "{directory / "state"}"

[api]
listen = "{address}:{ZONE_PORT}"
tls_cert = "{cert}"
tls_key = "{key}"

[hosts]
heartbeat_interval_s = {settings.heartbeat_s}
heartbeat_timeout_s = {settings.heartbeat_s * 4}

[agents]
ca_file = "{settings.root / "ca" / "ca.crt"}"
retry_initial_s = 0.5
retry_max_s = 5.0
{settings.zone_extra_toml}"""
    )
    return config


def write_agent_config(settings: LabSettings, plan: LabPlan, host: HostPlan) -> Path:
    address = str(host.address.ip)
    cert, key = servicecerts.issue_server_cert(
        settings.root / "ca", host.name, address, host.config_dir / "tls"
    )
    # A fresh one-time token: the agent bootstraps with it unless it holds a certificate
    token = next_host_token(load_zone_config(zone_dir(settings.root) / "zone.toml"), host.name)
    token_file = host.config_dir / "zone-token"
    write_atomically(token_file, (token + "\n").encode(), 0o600)
    config = host.config_dir / "hostagent.toml"
    config.write_text(
        f"""# written by `hostagent lab up`
host_id = "{host.name}"
state_dir = "{host.state_dir}"
image_dir = "{settings.images}"

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
url = "https://{plan.gateway.ip}:{ZONE_PORT}"
token_file = "{token_file}"
ca_file = "{settings.root / "ca" / "ca.crt"}"
failure_domain = "{host.failure_domain}"
api_url = "https://{address}:{AGENT_PORT}"
{settings.agent_extra_toml}"""
    )
    return config


def start_zone(settings: LabSettings, config: Path, context: ZoneContext) -> int:
    directory = zone_dir(settings.root)
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
    with http.client(context.url, tls=context.tls(), timeout_s=2) as probe:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise LabError(f"the zone exited ({process.returncode}); see {log_path}")
            try:
                probe.get("/healthz")
                log.info("zone up at %s (log %s)", context.url, log_path)
                return process.pid
            except http.TransportError:
                time.sleep(0.2)
    raise LabError(f"the zone did not answer within 30 s; see {log_path}")


def stop_zone(root: Path, timeout_s: float = 15.0) -> list[str]:
    pid_file = zone_dir(root) / "pid"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return []
    removed = []
    if _is_zone(pid, root):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        removed.append(f"zone (pid {pid})")
    pid_file.unlink(missing_ok=True)
    return removed


def _is_zone(pid: int, root: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"zone" in argv and str(zone_dir(root) / "zone.toml").encode() in argv


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def up(settings: LabSettings, progress: Callable[[str], None] = print) -> ZoneContext:
    plan = settings.plan()
    if (zone_dir(settings.root) / "pid").exists() and _is_zone(
        int((zone_dir(settings.root) / "pid").read_text()), settings.root
    ):
        raise LabError(f"a lab is already up under {settings.root}; `hostagent lab down` first")
    started = time.monotonic()
    progress("lab image (cached by recipe)")
    build_lab_image(settings.images)
    config = write_zone_config(settings, plan)
    ensure_secret(zone_dir(settings.root) / "state" / "api-token")
    context = ZoneContext(
        url=f"https://{plan.gateway.ip}:{ZONE_PORT}",
        token=(zone_dir(settings.root) / "state" / "api-token").read_text().strip(),
        ca_file=str(settings.root / "ca" / "ca.crt"),
    )
    if links.ensure_bridge(plan.bridge, plan.gateway):
        progress(f"bridge {plan.bridge} {plan.gateway}")
    start_zone(settings, config, context)
    progress(f"zone at {context.url}")
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
        if script and argv[2:] == wanted and _alive(int(entry.name)):
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
    removed = lab_down(settings.plan(), remove_dirs=purge)
    removed += stop_zone(settings.root)
    if settings.context_file.exists():
        settings.context_file.unlink()
        removed.append(f"zone context {settings.context_file}")
    if purge:
        for path in (zone_dir(settings.root), settings.root / "ca"):
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
    """What is up: the zone's pid and hosts (from the zone), for `hostagent lab status`."""
    context_file = settings.context_file
    if not context_file.exists():
        return {"up": False}
    saved = json.loads(context_file.read_text())
    client = ZoneClient(ZoneContext(saved["url"], saved["token"], saved.get("ca_file")))
    try:
        return {"up": True, "zone": saved["url"], "hosts": client.hosts()}
    finally:
        client.close()
