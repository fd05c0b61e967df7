"""A small client of the zone's HTTP API, for the CLI, the lab and the tests."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import http
from common.failover import split_urls
from common.files import write_atomically
from hostagent.client import ApiError
from hostagent.zone.failover import FailoverHttp

LAB_CONTEXT = Path("/var/lib/hostagent-lab/zone-client.json")
DEFAULT_URL = "http://127.0.0.1:8471"
DEFAULT_TOKEN_FILE = Path("/var/lib/hostagent-zone/api-token")


@dataclass(frozen=True)
class ZoneContext:
    """Where the zone is and how to talk to it: url, the admin token and the CA to trust."""

    url: str
    token: str
    ca_file: str | None = None
    urls: tuple[str, ...] = ()  # every replica's URL, url first (more than one: failover)

    def __post_init__(self) -> None:
        if not self.urls:
            object.__setattr__(self, "urls", (self.url,))

    def tls(self) -> ssl.SSLContext:
        """Trust for the zone's certificate: the context's CA file, else the system's."""
        return http.tls_context(self.ca_file)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        url: str | list[str] = list(self.urls) if len(self.urls) > 1 else self.url
        body = {"url": url, "token": self.token, "ca_file": self.ca_file}
        write_atomically(path, json.dumps(body).encode(), 0o600)


def resolve_context(
    url: str | None, token: str | None, context: Path | None, environ: dict[str, str]
) -> ZoneContext:
    """Flags first, then HOSTAGENT_ZONE_URL/HOSTAGENT_ZONE_TOKEN, then a context file
    (--zone-context, else the lab's when a lab is up), then the local zone's defaults. A URL
    may be several, comma-separated (a list in the context file): the zone's replicas."""
    url = url or environ.get("HOSTAGENT_ZONE_URL")
    token = token or environ.get("HOSTAGENT_ZONE_TOKEN")
    path = context or (LAB_CONTEXT if LAB_CONTEXT.exists() and not url else None)
    ca_file = None
    if path is not None:
        try:
            saved = json.loads(path.read_text())
            url, token = url or saved["url"], token or saved.get("token")
            ca_file = saved.get("ca_file")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SystemExit(
                f"hostagent: cannot read zone context {path} (a JSON object with url, and "
                f"token and ca_file where needed): {exc!r}"
            ) from exc
    if token is None:
        try:
            token = DEFAULT_TOKEN_FILE.read_text().strip()
        except OSError as exc:
            raise SystemExit(
                f"hostagent: no zone token: pass --zone-token, set HOSTAGENT_ZONE_TOKEN or make "
                f"{DEFAULT_TOKEN_FILE} readable ({exc.strerror})"
            ) from exc
    urls = context_urls(url or DEFAULT_URL)
    return ZoneContext(urls[0], token, ca_file, tuple(urls))


def context_urls(value: str | list[str]) -> list[str]:
    urls = value if isinstance(value, list) else split_urls(value)
    if not urls or not all(isinstance(u, str) for u in urls):
        raise SystemExit(f"hostagent: {value!r} is no zone URL (or list of them)")
    return urls


class ZoneClient:
    def __init__(self, context: ZoneContext, timeout_s: float = 30.0) -> None:
        self.http = FailoverHttp(list(context.urls), context.token, context.tls(), timeout_s)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.http.call(method, path, **kwargs)

    def put_cluster(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("PUT", f"/v1/clusters/{name}", json=spec)
        return result

    def cluster(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/clusters/{name}")
        return result

    def clusters(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/clusters")["items"]
        return result

    def delete_cluster(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/v1/clusters/{name}")
        return result

    def remove_host(self, host: str) -> None:
        self._call("DELETE", f"/v1/hosts/{host}")

    def hosts(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/hosts")["items"]
        return result

    def zone(self) -> dict[str, Any]:
        """GET /v1/zone: the replicas, the leader and the store."""
        result: dict[str, Any] = self._call("GET", "/v1/zone")
        return result

    def wait(
        self,
        name: str,
        until: str,
        *,
        timeout_s: float = 900.0,
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, Any] | None:
        """Poll the cluster until its phase is `until` ("Gone" for deletion); the last view."""
        started = time.monotonic()
        last = ""
        while True:
            try:
                view: dict[str, Any] | None = self.cluster(name)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                view = None
            phase = view["status"]["phase"] if view else "Gone"
            line = _progress_line(view) if view else "gone"
            if progress and line != last:
                progress(f"[{time.monotonic() - started:6.1f}s] {name}: {line}")
            last = line
            if phase == until:
                return view
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"cluster {name} not {until} after {timeout_s:.0f}s: {line}")
            time.sleep(1.0)

    def wait_rollout(
        self,
        name: str,
        *,
        timeout_s: float = 3600.0,
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the cluster until its rollout is done and it is Ready (the last view);
        RolloutStopped with the reason when the rollout stopped."""
        started = time.monotonic()
        last = ""
        while True:
            view = self.cluster(name)
            status = view["status"]
            rollout = status.get("rollout")
            line = f"{status['phase']}: {status['message'] or 'done'}"
            if progress and line != last:
                progress(f"[{time.monotonic() - started:6.1f}s] {name}: {line}")
            last = line
            if rollout is not None and rollout["state"] == "Stopped":
                raise RolloutStopped(f"cluster {name}: rollout stopped: {rollout['message']}")
            if rollout is None and status["phase"] == "Ready":
                return view
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"cluster {name}: rollout not done after {timeout_s:.0f}s")
            time.sleep(1.0)


class RolloutStopped(Exception):
    """A rollout stopped (a node not Ready in time); nothing further is touched."""


def _progress_line(view: dict[str, Any]) -> str:
    status = view["status"]
    counts: dict[str, int] = {}
    for node in status["nodes"]:
        counts[node["phase"]] = counts.get(node["phase"], 0) + 1
    nodes = ", ".join(f"{count} {phase}" for phase, count in sorted(counts.items()))
    return f"{status['phase']} ({nodes or 'no nodes'})"
