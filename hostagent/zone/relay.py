"""The console relay: `GET /v1/clusters/{c}/nodes/{n}/console?tail_bytes=N` on the zone reads
the node's serial console from its host's agent, as the Deliverer calls agents (the zone's
client certificate over TLS, else the agent's reported token), with the agent's bounds."""

from __future__ import annotations

import asyncio
import ssl

from common import http
from hostagent.errors import NotFound, Unavailable
from hostagent.zone.service import ZoneService, valid_name


class ConsoleRelay:
    def __init__(self, service: ZoneService, tls: ssl.SSLContext) -> None:
        """tls: trust for the agents' certificates, and the zone's client certificate."""
        self.service = service
        self._tls = tls

    async def console(self, cluster: str, node: str, limit: int) -> str:
        """The last `limit` bytes of the node's console, as its agent answers them."""
        valid_name("cluster", cluster)
        valid_name("node", node)
        store = self.service.store
        if store.cluster(cluster) is None:
            raise NotFound(f"cluster {cluster} does not exist")
        record = next((n for n in store.nodes(cluster) if n.name == node), None)
        if record is None:
            raise NotFound(f"cluster {cluster} has no node {node}")
        api = self.service.api_of(record.host)
        if api is None:
            raise Unavailable(f"host {record.host} of node {node} has no agent URL the zone uses")
        url, token = api
        path = f"/v1/clusters/{cluster}/nodes/{node}/console"
        timeout_s = self.service.config.agents.request_timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with (
                http.async_client(tls=self._tls, timeout_s=timeout_s) as client,
                asyncio.timeout(timeout_s),
            ):
                response = await client.get(
                    url + path, params={"tail_bytes": str(limit)}, headers=headers
                )
        except (http.HTTPError, TimeoutError) as exc:
            raise Unavailable(
                f"the agent of host {record.host} cannot be reached: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code == 200:
            return response.text
        if response.status_code == 404:
            raise NotFound(f"host {record.host} does not have node {cluster}/{node} (yet)")
        raise Unavailable(
            f"host {record.host} answered {response.status_code} for the console of "
            f"{cluster}/{node}: {response.text[:200]}"
        )
