"""A small client of the agent's HTTP API, used by the CLI, the demo and the tests."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any

from common import http


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


def call_json(client: http.Client, method: str, path: str, **kwargs: Any) -> Any:
    """One request; the JSON answer (None for an empty one; the text of a text/plain one),
    ApiError for 4xx/5xx with the error shape of API.md when the server sent one."""
    response = client.request(method, path, **kwargs)
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            code, message = error["code"], error["message"]
        except (ValueError, KeyError, TypeError):
            raise ApiError(response.status_code, "http", response.text) from None
        raise ApiError(response.status_code, code, message)
    if response.headers.get("content-type", "").startswith("text/plain"):
        return response.text  # a console log
    return response.json() if response.content else None


class Client:
    def __init__(
        self,
        url: str,
        token: str,
        timeout_s: float = 30.0,
        tls: ssl.SSLContext | None = None,  # None: the system's CAs
    ) -> None:
        # trust_env: a person's proxy settings apply to the CLI, as to their other tools
        self.http = http.client(url, token=token, tls=tls, timeout_s=timeout_s, trust_env=True)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return call_json(self.http, method, path, **kwargs)

    def healthy(self) -> bool:
        try:
            return self.http.get("/healthz").status_code == 200
        except http.TransportError:
            return False

    def put_node(self, cluster: str, node: str, spec: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "PUT", f"/v1/clusters/{cluster}/nodes/{node}", json=spec
        )
        return result

    def get_node(self, cluster: str, node: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/clusters/{cluster}/nodes/{node}")
        return result

    def delete_node(self, cluster: str, node: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/v1/clusters/{cluster}/nodes/{node}")
        return result

    def nodes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/nodes")["items"]
        return result

    def put_peers(self, cluster: str, peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Replace the cluster's peer hosts: [{"address": IPv4, "macs": [...]}, ...]."""
        body = {"peers": peers}
        result: list[dict[str, Any]] = self._call(
            "PUT", f"/v1/clusters/{cluster}/peers", json=body
        )["peers"]
        return result

    def get_peers(self, cluster: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", f"/v1/clusters/{cluster}/peers")["peers"]
        return result

    def delete_peers(self, cluster: str) -> None:
        self._call("DELETE", f"/v1/clusters/{cluster}/peers")

    def host(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/v1/host")
        return result

    def wait(
        self,
        keys: Iterable[tuple[str, str]],
        *,
        until: str = "Ready",
        timeout_s: float = 600.0,
        progress: Callable[[str], None] | None = None,
    ) -> dict[tuple[str, str], str]:
        """Poll until every node reaches `until` ("Gone" for deletion) or one fails."""
        pending = set(keys)
        seen: dict[tuple[str, str], str] = {}
        started = time.monotonic()
        while pending:
            for key in sorted(pending):
                phase, message = self._phase(key)
                if progress and seen.get(key) != phase:
                    elapsed = time.monotonic() - started
                    note = f" ({message})" if message else ""
                    progress(f"[{elapsed:6.1f}s] {key[0]}/{key[1]}: {phase}{note}")
                seen[key] = phase
                if phase == until:
                    pending.discard(key)
                elif phase == "Failed":
                    raise ApiError(0, "failed", f"{key[0]}/{key[1]} failed: {message}")
            if pending and time.monotonic() - started > timeout_s:
                raise TimeoutError(f"not {until} after {timeout_s:.0f}s: {sorted(pending)}")
            if pending:
                time.sleep(1.0)
        return seen

    def _phase(self, key: tuple[str, str]) -> tuple[str, str]:
        try:
            node = self.get_node(*key)
        except ApiError as exc:
            if exc.status == 404:
                return "Gone", ""
            raise
        return node["status"]["phase"], node["status"]["message"]
