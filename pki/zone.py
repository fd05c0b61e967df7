"""The zone CA backend (`[pki] backend = "zone"`): the cluster's CAs live in the zone.

With nodes of one cluster on several hosts, the hosts must share the cluster's CAs. The
zone holds them (its own PKI backend, local or Vault) and answers an agent, authenticated
with its control-plane client certificate (its host token on a loopback http zone), for
the clusters that have a node on that host (docs/zone.md):

    GET  /v1/clusters/{c}/pki/ca               {"cas": {"kubernetes": PEM, ...}}
    POST /v1/clusters/{c}/pki/sign             {"name", "csr", "ttl_s"} -> {"cert", "ca"}
    GET  /v1/clusters/{c}/pki/service-account  {"key": PEM, "public": PEM}

The zone makes the CAs when the cluster is created and revokes them when it is deleted,
so ensure_cluster only checks they are there and revoke_cluster does nothing. Keys are
made on this host; the zone sees CSRs (and hands out the cluster's shared
service-account key, which every master needs). Synchronous, like the other backends:
callers run it in threads, which share one HTTP client. The host token is never logged.
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import http
from common.failover import FAILOVER_STATUS, Urls
from common.names import check_name
from pki.backend import IssuedCert
from pki.certset import CaName, CertRequest
from pki.errors import BackendRefused, BackendUnavailable, PkiError

log = logging.getLogger(__name__)
# The zone is starting, overloaded or its own CA backend (Vault) is down: wait and retry.
_UNAVAILABLE = {408, 425, 429, 500, 502, 503, 504, 507}


@dataclass(frozen=True)
class ZoneSettings:
    url: str  # the zone's base URL, e.g. https://10.250.0.1:8471
    # this host's token (a zone on loopback http), None with mutual TLS
    token: str | None = field(repr=False)
    ca_file: Path | None = None  # PEM bundle that verifies the zone's TLS; None: system CAs
    timeout: float = 10.0
    # mutual TLS: the agent's context, which presents its control-plane certificate (and
    # the renewed one from its renewal on); it trusts ca_file
    tls: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    urls: tuple[str, ...] = ()  # the zone's replicas (url among them); empty: url alone


class ZoneBackend:
    def __init__(self, settings: ZoneSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._client: http.Client | None = None  # made on first use, shared by threads
        # A replica that is unreachable or answers 503 is left for the next one, which the
        # provisioning's retry then calls (common/failover.py).
        self._urls = Urls(settings.urls or (settings.url,))

    @property
    def description(self) -> str:
        return f"zone at {self.settings.url}"

    # --- the Backend interface -------------------------------------------------------

    def ensure_cluster(self, cluster: str) -> None:
        self.ca_certificates(cluster)

    def issue(self, cluster: str, request: CertRequest, csr_pem: str) -> IssuedCert:
        answer = self._call(
            "POST",
            cluster,
            "sign",
            f"signing {request.name}",
            json={"name": request.name, "csr": csr_pem, "ttl_s": request.ttl.total_seconds()},
        )
        cert, ca = _text(answer, "cert", self.description), _text(answer, "ca", self.description)
        try:
            return IssuedCert.from_pem(cert, ca)
        except ValueError as exc:
            raise PkiError(f"{self.description} returned no valid certificate: {exc}") from exc

    def ca_certificates(self, cluster: str) -> dict[CaName, str]:
        answer = self._call("GET", cluster, "ca", "reading the CAs")
        cas = answer.get("cas")
        found = cas if isinstance(cas, dict) else {}
        missing = [ca.value for ca in CaName if not isinstance(found.get(ca.value), str)]
        if missing:
            raise PkiError(f"{self.description} has no {', '.join(missing)} CA of {cluster}")
        return {ca: found[ca.value].strip() + "\n" for ca in CaName}

    def service_account_key(self, cluster: str) -> tuple[str, str]:
        answer = self._call("GET", cluster, "service-account", "reading the service-account key")
        return _text(answer, "key", self.description), _text(answer, "public", self.description)

    def revoke_cluster(self, cluster: str) -> None:
        """Nothing to do here: the zone revokes and removes the cluster's CAs when the
        cluster is deleted zone-wide, not when one host loses its last node of it."""
        log.debug("cluster %s: its CAs end with the cluster in the zone", cluster)

    def maintain(self) -> float:
        return math.inf  # the host token does not expire

    # --- HTTP ------------------------------------------------------------------------

    def _http(self) -> http.Client:
        with self._lock:
            if self._client is None:
                # An explicit SSL context: [zone] ca_file wins over whatever the
                # environment names (SSL_CERT_FILE, REQUESTS_CA_BUNDLE); no proxy either.
                try:
                    tls = self.settings.tls or http.tls_context(self.settings.ca_file)
                except (OSError, ssl.SSLError) as exc:
                    raise BackendUnavailable(
                        f"{self.description}: cannot load [zone] ca_file "
                        f"{self.settings.ca_file}: {exc}; provisioning waits and retries"
                    ) from exc
                self._client = http.client(
                    self._urls.current,
                    token=self.settings.token,
                    tls=tls,
                    timeout_s=self.settings.timeout,
                )
            return self._client

    def _call(
        self, method: str, cluster: str, path: str, what: str, **kwargs: Any
    ) -> dict[str, Any]:
        url = f"/v1/clusters/{check_name('cluster', cluster)}/pki/{path}"
        doing = f"{what} of cluster {cluster}"
        client = self._http()
        try:
            response = client.request(method, url, **kwargs)
        except http.HTTPError as exc:
            self._move_on(client)
            if http.is_tls_error(exc):
                raise BackendUnavailable(
                    f"{self.description}: TLS verification failed while {doing} (check [zone] "
                    f"ca_file={self.settings.ca_file}): {exc}; provisioning waits and retries"
                ) from exc
            raise BackendUnavailable(
                f"{self.description} is not reachable while {doing}: {exc}; provisioning "
                "waits and retries"
            ) from exc
        if response.status_code >= 400:
            if response.status_code == FAILOVER_STATUS:
                self._move_on(client)
            raise self._error(response, doing)
        try:
            answer = response.json()
        except ValueError as exc:
            raise PkiError(f"{self.description} answered {doing} with no JSON: {exc}") from exc
        if not isinstance(answer, dict):
            raise PkiError(f"{self.description} answered {doing} with no JSON object")
        return answer

    def _move_on(self, client: http.Client) -> None:
        """The replica behind client did not serve: the next call goes to the next one."""
        with self._lock:
            if client is self._client and len(self._urls.urls) > 1:
                self._urls.failed(self._urls.current)
                self._client = None
                client.close()

    def _error(self, response: http.Response, doing: str) -> PkiError:
        status, message = response.status_code, _message(response)
        if status in _UNAVAILABLE:
            return BackendUnavailable(
                f"{self.description} cannot serve {doing} now ({status}: {message}); "
                "provisioning waits and retries"
            )
        if status in (401, 403):
            return BackendRefused(
                f"{self.description} denied {doing} ({status}: {message}). Does this "
                "host hold its certificate of the zone (or, on plain http, is [zone] "
                "token_file its token), and does the zone place a node of the cluster on "
                "this host?"
            )
        if status == 404:
            return PkiError(f"{self.description} answered 404 to {doing}: {message}")
        return BackendRefused(f"{self.description} refused {doing} ({status}: {message})")


def _message(response: http.Response) -> str:
    """The message of the zone's error document, else the start of the body."""
    try:
        return str(response.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return response.text[:300] or response.reason_phrase


def _text(answer: dict[str, Any], key: str, description: str) -> str:
    value = answer.get(key)
    if not isinstance(value, str) or not value:
        raise PkiError(f"the answer of the {description} lacks {key!r}")
    return value
