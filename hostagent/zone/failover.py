"""The CLI's calls to a zone of several replicas (a context with several URLs): a call goes
to the current replica and on to the next when one is unreachable or answers 503, every
replica once per round, with common.backoff between rounds. The zone's writes are
idempotent (PUT) or safe to repeat (DELETE of a cluster), and a 503 changed nothing."""

from __future__ import annotations

import ssl
import time
from typing import Any

from common import http
from common.backoff import Backoff
from common.failover import FAILOVER_STATUS, Urls
from hostagent.client import ApiError, call_json

ROUNDS = 3


class FailoverHttp:
    def __init__(self, urls: list[str], token: str, tls: ssl.SSLContext, timeout_s: float) -> None:
        self.urls = Urls(urls)
        self._token, self._tls, self._timeout_s = token, tls, timeout_s
        self._clients: dict[str, http.Client] = {}

    def _client(self, url: str) -> http.Client:
        if url not in self._clients:
            # trust_env: a person's proxy settings apply to the CLI, as to their other tools
            self._clients[url] = http.client(
                url, token=self._token, tls=self._tls, timeout_s=self._timeout_s, trust_env=True
            )
        return self._clients[url]

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        backoff = Backoff(0.5, 5.0)
        last: Exception | None = None
        for attempt in range(ROUNDS):
            if attempt:
                time.sleep(backoff.next())
            for url in self.urls.round():
                try:
                    return call_json(self._client(url), method, path, **kwargs)
                except ApiError as exc:
                    if exc.status != FAILOVER_STATUS:
                        raise
                    last = exc
                except http.TransportError as exc:
                    last = exc
                self.urls.failed(url)
        assert last is not None
        raise last

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
