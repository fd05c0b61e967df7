"""Starting and stopping one lab host, and running commands inside it.

A host is `unshare --mount --net --pid --uts --fork --mount-proc` running hostinit.py as
PID 1 of the new pid namespace. Its PID (in the root namespace) is kept in <host>/pid, so
a later `lab down` finds it after the process that started it crashed; its command line
names the host's directory, so `lab down` finds it even without the pid file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hostagent.lab import hostinit, links, procs
from hostagent.lab.commands import DEFAULT_TIMEOUT_S, run
from hostagent.lab.errors import LabError
from hostagent.lab.libvirtconf import DIRECTORIES, libvirt_files
from hostagent.lab.plan import HostPlan, LabPlan

log = logging.getLogger(__name__)

UNSHARE = ["unshare", "--mount", "--net", "--pid", "--uts", "--fork", "--mount-proc"]
# --kill-child: the init dies with unshare, whoever kills unshare.
UNSHARE_OPTIONS = ["--propagation", "private", "--kill-child"]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 20


@dataclass
class LabHost:
    """A host started by this process."""

    plan: HostPlan
    pid: int  # the init (PID 1 inside), as the root namespace sees it
    launcher: subprocess.Popen[bytes]  # unshare, the init's parent

    @property
    def name(self) -> str:
        return self.plan.name


def nsenter_argv(pid: int, argv: Sequence[str]) -> list[str]:
    """argv run in the mount, network, pid and UTS namespaces of process pid."""
    return ["nsenter", "-t", str(pid), "-m", "-n", "-p", "-u", "--", *argv]


def is_init_of(argv: Sequence[str] | None, host_dir: Path | None = None) -> bool:
    """Whether a command line is a lab host's init (of host_dir, when given)."""
    if argv is None or list(argv[1:3]) != ["-m", hostinit.MODULE]:
        return False
    return host_dir is None or _option(argv, "--dir") == str(host_dir)


def init_host_dir(argv: Sequence[str]) -> Path | None:
    value = _option(argv, "--dir")
    return Path(value) if value is not None else None


def running_pid(host: HostPlan) -> int | None:
    """The PID of the host's init, when the pid file names a live one."""
    try:
        pid = int(host.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if is_init_of(procs.cmdline(pid), host.dir) else None


def exec_in(
    host: HostPlan | int,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run argv inside a running host (a plan, or its init's PID); output captured as text."""
    pid = host if isinstance(host, int) else running_pid(host)
    if pid is None:
        raise LabError(f"host {host.name if isinstance(host, HostPlan) else host} is not running")
    return run(nsenter_argv(pid, argv), check=check, timeout=timeout)


def start_host(
    lab: LabPlan,
    host: HostPlan,
    *,
    command: Sequence[str] = (),
    timeout: float = START_TIMEOUT_S,
    python: str = sys.executable,
) -> LabHost:
    """Start the host and wait until its libvirtd answers; then its command runs inside."""
    if (pid := running_pid(host)) is not None:
        raise LabError(f"{host.name} is already running (init pid {pid}); stop it first")
    prepare_dirs(host)
    if links.delete_link(host.veth):
        log.info("%s: removed the leftover link %s", host.name, host.veth)
    started = time.monotonic()
    launcher, go, progress = _launch(host, command, python)
    pid = None
    try:
        lines = _Lines(progress, started + timeout)
        _log_step(host, lines.expect_step(), started)  # the namespaces exist
        pid = _init_pid(launcher)
        host.pid_file.write_text(f"{pid}\n")
        links.add_veth(host.veth, host.device, pid, lab.bridge)
        os.write(go, b"go\n")
        while (line := lines.next()) != "ready":
            _log_step(host, lines.step(line), started)
    except BaseException as exc:
        _abort(host, launcher, pid)
        if isinstance(exc, LabError):
            raise LabError(f"{host.name}: {exc}\n{_log_tail(host.init_log)}") from exc
        raise
    finally:
        os.close(go)
        os.close(progress)
    log.info("%s: ready, init pid %d (%.1f s)", host.name, pid, time.monotonic() - started)
    return LabHost(host, pid, launcher)


def stop_host(
    host: LabHost | HostPlan, *, remove_dirs: bool = False, timeout: float = STOP_TIMEOUT_S
) -> list[str]:
    """Destroy the host's domains, end its namespaces, remove its veth; what was removed."""
    plan = host.plan if isinstance(host, LabHost) else host
    removed: list[str] = []
    pid = running_pid(plan)
    if pid is not None:
        removed += stop_init(plan.name, pid, timeout=timeout)
    if isinstance(host, LabHost):
        host.launcher.wait(timeout)
    plan.pid_file.unlink(missing_ok=True)
    if links.delete_link(plan.veth):
        removed.append(f"link {plan.veth}")
    if remove_dirs and plan.dir.exists():
        shutil.rmtree(plan.dir)
        removed.append(f"dir {plan.dir}")
    return removed


def stop_init(name: str, pid: int, *, timeout: float = STOP_TIMEOUT_S) -> list[str]:
    """Destroy the domains running inside, then end the init (and so its namespace)."""
    removed = [f"{name}: domain {domain}" for domain in destroy_domains(name, pid)]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return removed  # it ended meanwhile
    if procs.wait_exited([pid], hostinit.STOP_GRACE_S + 5.0):
        log.warning("%s: init (pid %d) ignored SIGTERM; killing it", name, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if procs.wait_exited([pid], timeout):
            raise LabError(f"{name}: init (pid {pid}) still runs {timeout} s after SIGKILL")
    log.info("%s: stopped (init pid %d)", name, pid)
    return [*removed, f"{name}: init (pid {pid})"]


def destroy_domains(name: str, pid: int) -> list[str]:
    """Destroy (no graceful shutdown) every running domain of the host's libvirtd."""
    virsh = ["virsh", "-c", hostinit.LIBVIRT_URI]
    listed = exec_in(pid, [*virsh, "list", "--name"], check=False, timeout=30)
    if listed.returncode != 0:
        log.warning("%s: listing domains failed: %s", name, listed.stderr.strip())
        return []
    destroyed = []
    for domain in listed.stdout.split():
        done = exec_in(pid, [*virsh, "destroy", domain], check=False, timeout=30)
        if done.returncode == 0:
            log.info("%s: destroyed domain %s", name, domain)
            destroyed.append(domain)
        else:
            log.warning("%s: destroying domain %s failed: %s", name, domain, done.stderr.strip())
    return destroyed


def prepare_dirs(host: HostPlan) -> None:
    """The host's directories, and the /etc/libvirt it gets, rewritten at every start."""
    # 0755 all the way: QEMU runs as its own user and must reach the files under state.
    for directory in (host.dir.parent, host.dir, host.state_dir, host.config_dir, host.log_dir):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
    etc = host.libvirt_config_dir
    for sub in DIRECTORIES:
        (etc / sub).mkdir(parents=True, exist_ok=True)
    for name, content in libvirt_files().items():
        (etc / name).write_text(content)


def _launch(
    host: HostPlan, command: Sequence[str], python: str
) -> tuple[subprocess.Popen[bytes], int, int]:
    """unshare + init; the write end of its "go" pipe and the read end of its progress."""
    go_read, go_write = os.pipe()
    progress_read, progress_write = os.pipe()
    argv = hostinit.init_argv(python, host, go_fd=go_read, ready_fd=progress_write, command=command)
    try:
        with host.init_log.open("ab") as out:
            launcher = subprocess.Popen(
                [*UNSHARE, *UNSHARE_OPTIONS, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(go_read, progress_write),
                start_new_session=True,  # a ^C meant for the caller does not reach the host
            )
    except BaseException:
        os.close(go_write)
        os.close(progress_read)
        raise
    finally:
        os.close(go_read)
        os.close(progress_write)
    return launcher, go_write, progress_read


def _init_pid(launcher: subprocess.Popen[bytes]) -> int:
    children = procs.children(launcher.pid)
    if len(children) != 1:
        raise LabError(f"unshare (pid {launcher.pid}) has children {children}, not one init")
    return children[0]


def _abort(host: HostPlan, launcher: subprocess.Popen[bytes], pid: int | None) -> None:
    """Undo a start that failed half-way: nothing of the host may stay behind."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        procs.wait_exited([pid], STOP_TIMEOUT_S)
    launcher.kill()
    launcher.wait(STOP_TIMEOUT_S)
    host.pid_file.unlink(missing_ok=True)
    with contextlib.suppress(LabError):
        links.delete_link(host.veth)


def _log_step(host: HostPlan, text: str, started: float) -> None:
    log.info("%s: %s (%.1f s)", host.name, text, time.monotonic() - started)


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return f"(no {path})"
    if not lines:
        return f"({path} is empty)"
    return f"last lines of {path}:\n" + "\n".join(f"  {line}" for line in lines)


def _option(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == "--":
            return None
        if arg == name:
            return argv[i + 1]
    return None


class _Lines:
    """The init's progress lines, each awaited until one deadline."""

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd = fd
        self.deadline = deadline
        self.buffer = b""

    def next(self) -> str:
        while b"\n" not in self.buffer:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise LabError("not ready in time")
            readable, _, _ = select.select([self.fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise LabError("the init exited before it was ready")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def step(self, line: str) -> str:
        kind, _, text = line.partition(" ")
        if kind == "error":
            raise LabError(text)
        if kind != "step":
            raise LabError(f"unexpected line from the init: {line!r}")
        return text

    def expect_step(self) -> str:
        return self.step(self.next())
