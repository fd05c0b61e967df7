"""The drain hook: before the zone removes or replaces a node it POSTs
{cluster, node, role, reason} to the cluster's drain_hook.url and waits up to its timeout
for a 2xx (a refused connection or another status is asked again, with backoff), then
goes on either way; the answer is the event's text. The zone never blocks on it beyond
the timeout, and each cluster's work runs in its own task (zone/roller.py), so a slow
hook delays only its cluster.
"""

from __future__ import annotations

import asyncio
import time

from common import http
from common.backoff import Backoff
from hostagent.model import Role
from hostagent.zone.model import DrainHook


async def call(
    client: http.AsyncClient, hook: DrainHook, cluster: str, node: str, role: Role, reason: str
) -> str:
    """POST the hook until it answers 2xx or its timeout passes; what happened, in words."""
    timeout_s = hook.timeout_for(role is Role.MASTER)
    body = {"cluster": cluster, "node": node, "role": role.value, "reason": reason}
    start = time.monotonic()
    retry = Backoff(0.5, 10.0)
    last = "no answer"
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    response = await client.post(hook.url, json=body, timeout=timeout_s)
                except http.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                else:
                    if 200 <= response.status_code < 300:
                        took = time.monotonic() - start
                        return f"drain hook answered {response.status_code} in {took:.1f} s"
                    last = f"status {response.status_code}"
                await asyncio.sleep(retry.next())
    except TimeoutError:
        return f"drain hook timed out after {timeout_s:.0f} s ({last}); proceeding"
