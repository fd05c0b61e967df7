"""A throwaway one-member etcd on loopback for the zone's store tests: free ports, a temporary
data directory, gone on exit. Debian's `etcd-server` (scripts/setup-host.sh) provides the
binary; the distro's own etcd service is never used.
"""

from __future__ import annotations

import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.fakezone import free_port


def etcd_binary() -> str | None:
    return shutil.which("etcd")


@dataclass(frozen=True)
class ServerTls:
    """The member serves https with cert/key and asks its clients for a certificate
    signed by ca (--client-cert-auth); client_cert/client_key are one, for health checks."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


@dataclass
class Member:
    workdir: Path
    client_port: int
    peer_port: int
    tls: ServerTls | None = None
    max_txn_ops: int = 2048  # as docs/zone.md asks (etcd's default, 128, fits ~40 nodes)
    name: str = "test"
    initial_cluster: str = ""  # name=peer,...: a member of a cluster; empty: alone
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def log(self) -> str:
        return (self.workdir / "etcd.log").read_text(errors="replace")

    def start(self, timeout: float = 30.0) -> None:
        """Start (again, on the same data and ports) and return once it is healthy."""
        self.launch()
        self.wait_healthy(timeout)

    def launch(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            etcd_binary() or "etcd",
            f"--name={self.name}",
            f"--data-dir={self.workdir / 'data'}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={peer}'}",
            "--log-level=warn",
            "--logger=zap",
            f"--max-txn-ops={self.max_txn_ops}",
        ]
        if self.tls is not None:
            args += [
                f"--cert-file={self.tls.cert}",
                f"--key-file={self.tls.key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        with (self.workdir / "etcd.log").open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float) -> None:
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}:\n{self.log}")
            if self._healthy():
                return
            time.sleep(0.05)  # polling interval, not a synchronisation
        raise RuntimeError(f"etcd did not become healthy within {timeout} s:\n{self.log}")

    def _healthy(self) -> bool:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        try:
            url = f"{self.endpoint}/health"
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                return b'"true"' in response.read()
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL: as if its machine died (the data directory stays)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Member:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start(timeout: float = 30.0, tls: ServerTls | None = None, max_txn_ops: int = 2048) -> Member:
    """A new member on free loopback ports, healthy."""
    workdir = Path(tempfile.mkdtemp(prefix="hostagent-etcd-"))
    member = Member(workdir, free_port(), free_port(), tls, max_txn_ops)
    try:
        member.start(timeout)
    except BaseException:
        member.__exit__()
        raise
    return member


def cluster(size: int = 3, timeout: float = 60.0) -> list[Member]:
    """size members of one new cluster on free loopback ports, healthy (each with its own
    data directory; stop and remove them with each member's __exit__)."""
    members = [
        Member(Path(tempfile.mkdtemp(prefix="hostagent-etcd-")), free_port(), free_port())
        for _ in range(size)
    ]
    peers = ",".join(f"m{i}=http://127.0.0.1:{m.peer_port}" for i, m in enumerate(members))
    for i, member in enumerate(members):
        member.name, member.initial_cluster = f"m{i}", peers
    try:
        # A member is healthy only once a quorum is up: start them all, then wait.
        for member in members:
            member.launch()
        for member in members:
            member.wait_healthy(timeout)
    except BaseException:
        for member in members:
            member.__exit__()
        raise
    return members
