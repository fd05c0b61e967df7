"""A whole lab: up (bridge, then every host) and down (everything, leftovers included).

`lab_down` does not trust memory: it finds the hosts' inits in /proc by their command
line, the veths by their prefix and the bridge by its name, so it also cleans up after a
run that crashed, and running it twice is harmless.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from hostagent.access import grant_udev_permissions
from hostagent.lab import hosts, links, procs
from hostagent.lab.hosts import LabHost
from hostagent.lab.plan import PID_FILE, HostPlan, LabPlan, host_index

log = logging.getLogger(__name__)

CommandFor = Callable[[HostPlan], Sequence[str]]


def lab_up(
    plan: LabPlan,
    *,
    command: CommandFor | None = None,
    timeout: float = hosts.START_TIMEOUT_S,
    progress: Callable[[str], None] = log.info,
) -> list[LabHost]:
    """/dev/kvm's permissions, the bridge, then every host of the plan, one after the other.

    command: the command each host runs once its libvirtd answers (its agent). On a
    failure, what this call started is stopped again, and the error raised.
    """
    granted = grant_udev_permissions()
    if granted:
        progress(granted)
    created = links.ensure_bridge(plan.bridge, plan.gateway)
    if created:
        log.info("bridge %s up (%s)", plan.bridge, plan.gateway)
    started: list[LabHost] = []
    try:
        for host in plan.hosts:
            argv = command(host) if command is not None else ()
            started.append(hosts.start_host(plan, host, command=argv, timeout=timeout))
    except BaseException:
        for running in started:
            hosts.stop_host(running)
        if created:
            links.delete_link(plan.bridge)
        raise
    return started


def lab_down(
    plan: LabPlan,
    *,
    running: Sequence[LabHost] = (),
    remove_dirs: bool = False,
    timeout: float = hosts.STOP_TIMEOUT_S,
) -> list[str]:
    """Stop every host under the lab's root, remove the lab's links; what was removed.

    running: the hosts this process started (their launchers are reaped too).
    remove_dirs: also remove the hosts' directories (state, config, logs).
    """
    removed: list[str] = []
    for host in running:
        removed += hosts.stop_host(host, timeout=timeout)
    for name, pid in find_inits(plan.root):
        removed += hosts.stop_init(name, pid, timeout=timeout)
    for host_dir in _host_dirs(plan.root):
        pid_file = host_dir / PID_FILE
        if pid_file.exists():
            pid_file.unlink()
            removed.append(f"pid file {pid_file}")
    for name in links.link_names():
        if plan.is_veth(name) and links.delete_link(name):
            removed.append(f"link {name}")
    if links.delete_link(plan.bridge):
        removed.append(f"bridge {plan.bridge}")
    if remove_dirs:
        removed += _remove_dirs(plan.root)
    for item in removed:
        log.info("removed %s", item)
    if not removed:
        log.info("nothing of the lab in %s to remove", plan.root)
    return removed


def find_inits(root: Path) -> list[tuple[str, int]]:
    """(host name, init PID) of every running host whose directory is under root."""
    found = []
    for pid in procs.all_pids():
        argv = procs.cmdline(pid)
        if argv is None or not hosts.is_init_of(argv):
            continue
        host_dir = hosts.init_host_dir(argv)
        parent = procs.parent_pid(pid)
        # The init forks a worker with the same command line: the init is the one whose
        # parent is not an init of the same host.
        if parent is not None and procs.cmdline(parent) == argv:
            continue
        if host_dir is not None and host_dir.parent == root:
            found.append((host_dir.name, pid))
    return sorted(found)


def _host_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and host_index(d.name) is not None)


def _remove_dirs(root: Path) -> list[str]:
    removed = []
    for directory in _host_dirs(root):
        shutil.rmtree(directory)
        removed.append(f"dir {directory}")
    # The root goes only when nothing but the hosts was in it.
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
        removed.append(f"dir {root}")
    return removed
