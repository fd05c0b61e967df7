"""`hostagent demo`: cluster `demo` with one master and one worker as lab VMs on this host."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hostagent import tables
from hostagent.client import Client
from hostagent.config import Config
from hostagent.labimage.build import build_lab_image

NETWORK = {"vni": 4242, "gateway": "10.42.0.1", "mtu": 1450}
NODES = {"m1": ("master", "10.42.0.11/24"), "w1": ("worker", "10.42.0.21/24")}


def demo_spec(role: str, address: str) -> dict[str, Any]:
    return {
        "role": role,
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 2,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {**NETWORK, "address": address},
    }


def _ensure_agent(config: Config, connect: Callable[[], Client]) -> Client:
    log_path = config.state_dir / "agent.log"
    config.state_dir.mkdir(parents=True, exist_ok=True)
    if config.token_file.exists() and connect().healthy():
        print("using the agent already running at", config.api.listen)
        return connect()
    print(f"starting the agent (log: {log_path})")
    args = [sys.executable, "-m", "hostagent", "serve"]
    with log_path.open("ab") as log:
        subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if config.token_file.exists() and connect().healthy():
            return connect()
        time.sleep(0.5)
    raise SystemExit(f"the agent did not become healthy within 60s; see {log_path}")


def run_demo(config: Config, client_for: Callable[..., Client]) -> None:
    print("== building the lab image (cached after the first run)")
    build_lab_image(config.images)
    print("== agent")
    args = type("Args", (), {"url": None, "token": None})()
    client = _ensure_agent(config, lambda: client_for(args, config))
    print("== creating cluster demo: master m1 and worker w1")
    for name, (role, address) in NODES.items():
        client.put_node("demo", name, demo_spec(role, address))
    client.wait([("demo", n) for n in NODES], timeout_s=600, progress=print)
    cli = Path(sys.executable).with_name("hostagent")
    print()
    print(tables.nodes([n for n in client.nodes() if n["cluster"] == "demo"]))
    print(
        f"""
Both nodes are Ready: each VM booted, read its config drive, and phoned home.
Look at them:
  virsh list                                   the domains demo-m1 and demo-w1
  {cli} get demo m1 -o yaml   the node, with what the guest reported
  cat {config.nodes_dir}/demo/m1/console.log   the serial console of m1
Delete them:
  {cli} delete demo m1 --wait; {cli} delete demo w1 --wait
The agent keeps running in the background (log: {config.state_dir / "agent.log"});
stop it with: pkill -f 'hostagent serve'   (the VMs keep running; it adopts them on start)"""
    )
