"""PID 1 of a lab host: `python -m hostagent.lab.hostinit --name h1 --dir DIR ...`.

Started by hosts.py under `unshare --mount --net --pid --uts --fork --mount-proc`. A
child of it (the worker)

1. mounts the host's own file systems (private propagation, so nothing leaks out): tmpfs
   on /run, /var/lib/libvirt and /var/cache/libvirt; the host's log directory on
   /var/log/libvirt and its config/libvirt on /etc/libvirt; a sysfs of its own network
   namespace on /sys (with the machine's cgroup tree kept under it);
2. brings up lo, sets the hostname, waits for the parent's "go" (its veth is then inside)
   and puts the host's underlay address on it;
3. starts virtlogd and libvirtd and waits until `virsh -c qemu:///system` answers;
4. reports "ready" and runs the command, if any, to its end.

The init itself only reaps: every orphan of the namespace is its child. If the setup
fails, the host stops. On SIGTERM the init passes SIGTERM to every process of the
namespace, waits a little and exits; its exit kills whatever remains there, QEMU
included. The command exiting does not end the host (a host outlives its agent); its
status goes to the init log.

The parent reads progress on --ready-fd, one line each: "step <text>", then "ready" or
"error <text>".
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from ipaddress import IPv4Interface
from pathlib import Path
from types import FrameType

from hostagent.lab.commands import run
from hostagent.lab.errors import LabError
from hostagent.lab.plan import COMMAND_LOG, HostPlan

MODULE = "hostagent.lab.hostinit"
LIBVIRT_URI = "qemu:///system"
LIBVIRT_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SETUP_FAILED = 3
TMPFS_DIRS = ("/run", "/var/lib/libvirt", "/var/cache/libvirt")
SCRATCH = Path("/run/hostagent-lab")

log = logging.getLogger("hostagent.lab.hostinit")


class Stop(Exception):
    """A signal asked the host to stop."""


def init_argv(
    python: str, host: HostPlan, *, go_fd: int, ready_fd: int, command: Sequence[str] = ()
) -> list[str]:
    """The init's command line (also how `lab down` recognises a host's init in /proc)."""
    argv = [python, "-m", MODULE, "--name", host.name, "--dir", str(host.dir)]
    argv += ["--address", str(host.address), "--device", host.device]
    argv += ["--log-dir", str(host.log_dir), "--libvirt-config", str(host.libvirt_config_dir)]
    argv += ["--go-fd", str(go_fd), "--ready-fd", str(ready_fd)]
    return [*argv, "--", *command] if command else argv


def parse_argv(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--name", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--address", required=True, type=IPv4Interface)
    parser.add_argument("--device", required=True)
    parser.add_argument("--log-dir", required=True, type=Path)
    parser.add_argument("--libvirt-config", required=True, type=Path)
    parser.add_argument("--go-fd", required=True, type=int)
    parser.add_argument("--ready-fd", required=True, type=int)
    parser.add_argument("command", nargs="*")
    return parser.parse_args(argv)


class Reporter:
    """Progress lines to the parent; a parent that went away is no reason to stop."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def send(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            self.close()

    def step(self, text: str) -> None:
        log.info("%s", text)
        self.send(f"step {text}")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def mount_filesystems(log_dir: Path, libvirt_config: Path) -> None:
    run(["mount", "--make-rprivate", "/"])
    for path in TMPFS_DIRS:
        Path(path).mkdir(parents=True, exist_ok=True)
        run(["mount", "-t", "tmpfs", "-o", "mode=0755", "hostagent-lab", path])
    binds = {log_dir: "/var/log/libvirt", libvirt_config: "/etc/libvirt"}
    for source, target in binds.items():
        Path(target).mkdir(parents=True, exist_ok=True)
        run(["mount", "--bind", str(source), target])
    # The machine's sysfs lists the root namespace's network devices; libvirt (and the
    # agent) must see this host's. The cgroup mounts under /sys are kept.
    cgroup = SCRATCH / "cgroup"
    cgroup.mkdir(parents=True, exist_ok=True)
    run(["mount", "--rbind", "/sys/fs/cgroup", str(cgroup)])
    run(["mount", "-t", "sysfs", "sysfs", "/sys"])
    run(["mount", "--move", str(cgroup), "/sys/fs/cgroup"])


def wait_go(fd: int) -> None:
    """Block until the parent says the veth is inside (or went away)."""
    with os.fdopen(fd, "rb") as stream:
        line = stream.readline()
    if line.strip() != b"go":
        raise LabError("the parent went away before the underlay was set up")


def configure_underlay(device: str, address: IPv4Interface) -> None:
    try:
        socket.if_nametoindex(device)
    except OSError as exc:
        raise LabError(f"the underlay device {device} is not in this host") from exc
    run(["ip", "addr", "add", str(address), "dev", device])
    run(["ip", "link", "set", device, "up"])


def start_libvirt(report: Reporter) -> None:
    run(["virtlogd", "-d"])
    report.step("virtlogd up")
    run(["libvirtd", "-d"])
    deadline = time.monotonic() + LIBVIRT_TIMEOUT_S
    while True:
        try:
            done = run(["virsh", "-c", LIBVIRT_URI, "version"], check=False, timeout=10)
            if done.returncode == 0:
                break
            why = done.stderr.strip()
        except LabError as exc:  # no answer in time: libvirtd may still be starting
            why = str(exc)
        if time.monotonic() > deadline:
            raise LabError(f"libvirtd did not answer within {LIBVIRT_TIMEOUT_S} s: {why}")
        time.sleep(0.1)  # polling interval while libvirtd starts
    report.step("libvirtd up")


def setup(args: argparse.Namespace, report: Reporter) -> None:
    mount_filesystems(args.log_dir, args.libvirt_config)
    run(["ip", "link", "set", "lo", "up"])
    socket.sethostname(args.name)
    report.step("namespaces up")
    wait_go(args.go_fd)
    configure_underlay(args.device, args.address)
    report.step(f"underlay {args.address} on {args.device}")
    start_libvirt(report)


def run_command(command: Sequence[str], log_file: Path) -> None:
    """Run the host's command to its end; its exit does not end the host."""
    try:
        with log_file.open("ab") as out:
            process = subprocess.Popen(
                list(command), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
    except OSError as exc:
        log.error("the command did not start: %s; the host stays up", exc)
        return
    log.info("command started (pid %d): %s", process.pid, " ".join(command))
    status = process.wait()
    log.warning("command exited with status %d; the host stays up", status)


def worker(args: argparse.Namespace, report: Reporter) -> int:
    """The setup, then the command: in a child of the init, which must keep reaping."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    try:
        setup(args, report)
    except Exception as exc:
        log.error("%s", exc, exc_info=not isinstance(exc, LabError | OSError))
        report.send(f"error {exc}")
        return SETUP_FAILED
    report.send("ready")
    report.close()
    if args.command:
        run_command(args.command, args.log_dir / COMMAND_LOG)
    return 0


def reap_forever(worker_pid: int) -> int:
    """Reap every orphan of the namespace; returns (the host's exit status) when the setup
    failed, or through Stop."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(1.0)  # nothing to reap: idle until a signal
            continue
        if pid == worker_pid and os.waitstatus_to_exitcode(status) != 0:
            log.error("setup failed (status %d); the host stops", os.waitstatus_to_exitcode(status))
            stop_all()
            return 1


def stop_all() -> None:
    """SIGTERM to every process of the namespace; reap them for up to STOP_GRACE_S."""
    try:
        os.kill(-1, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)  # polling interval while processes end


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_argv(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {args.name} init: %(message)s", stream=sys.stderr
    )
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    # PID 1 must reap orphans at all times (libvirtd waits for the QEMUs it probes to be
    # gone), and must not reap the children its own subprocess calls wait for: the setup
    # and the command run in a child.
    worker_pid = os.fork()
    if worker_pid == 0:
        os._exit(worker(args, Reporter(args.ready_fd)))
    os.close(args.ready_fd)
    os.close(args.go_fd)
    try:
        return reap_forever(worker_pid)
    except Stop as stop:
        log.info("stopping on %s", stop)
        stop_all()
        return 0


if __name__ == "__main__":
    sys.exit(main())
