"""HTTP <-> ZoneService. Handlers only translate; who may call what is decided here."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

from common import http
from common.errors import HostAgentError
from common.files import same_secret
from hostagent import __version__
from hostagent.api import STATUS as AGENT_STATUS
from hostagent.api import Handler, error_middleware, tail_bytes
from hostagent.errors import Forbidden, Invalid, Unauthorized, Unavailable
from hostagent.imageservice import parse_source
from hostagent.zone.auth import HostToken, parse_host_token
from hostagent.zone.catalogue import Catalogue
from hostagent.zone.controlplane import ControlPlane
from hostagent.zone.model import CertificateRequest, ClusterSpec, HostReport, SignRequest
from hostagent.zone.openapi import zone_openapi
from hostagent.zone.relay import ConsoleRelay
from hostagent.zone.service import ZoneService, parse_body
from hostagent.zone.store import Stale
from pki import controlca
from pki.certset import PROFILE_BY_NAME, CertRequest
from pki.errors import BackendRefused, BackendUnavailable, PkiError

STATUS: dict[type[HostAgentError], int] = {
    **AGENT_STATUS,
    Forbidden: 403,
    BackendRefused: 422,
    Unavailable: 503,
    BackendUnavailable: 503,
}

SERVICE = web.AppKey("service", ZoneService)
CATALOGUE = web.AppKey("catalogue", Catalogue)
RELAY = web.AppKey("relay", ConsoleRelay)
ADMIN_TOKEN = web.AppKey("admin_token", str)
HOST_SECRET = web.AppKey("host_secret", str)
METRICS: web.AppKey[Callable[[], bytes]] = web.AppKey("metrics")
HEARTBEAT = web.AppKey("heartbeat_s", float)
CONTROL = web.AppKey("control", ControlPlane)
CALLER = web.RequestKey("caller", str)  # "admin", "host:<id>", or "bootstrap:<id>"
BOOTSTRAP = web.RequestKey("bootstrap", HostToken)  # the host token of a bootstrap
ZONE_VIEW: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("zone_view")
# host -> the body of its last report and the report parsed from it: most heartbeats
# repeat the last report, and comparing bytes costs less than validating them again
REPORTS: web.AppKey[dict[str, tuple[bytes, HostReport]]] = web.AppKey("reports")
_HOST = "host:"
_BOOTSTRAP = "bootstrap:"
MAX_TTL = dt.timedelta(days=365)


errors = error_middleware(STATUS)


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Who calls: a verified client certificate of the control-plane CA names a host (the
    zone's own, or any other name, is refused); else a bearer token: the admin token, or
    a host token. Over TLS a host token only bootstraps its host's certificate; over
    plain http (loopback) it stands for its host everywhere, as no certificate can."""
    if request.path.startswith("/v1/"):
        tls, peer = _tls(request)
        identity = controlca.identity_of(peer)
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else ""
        if peer and (identity is None or identity.kind != "host"):
            who = identity.name if identity else "no host of this zone"
            raise Forbidden(f"a client certificate naming {who} may not call the zone")
        if identity is not None:
            request[CALLER] = _HOST + identity.name
        elif token and same_secret(token, request.app[ADMIN_TOKEN]):
            request[CALLER] = "admin"
        elif token and (host := parse_host_token(request.app[HOST_SECRET], token)) is not None:
            request[CALLER] = (_BOOTSTRAP if tls else _HOST) + host.host
            request[BOOTSTRAP] = host
        else:
            raise Unauthorized(
                "missing or wrong credentials: a client certificate of the zone's "
                "control-plane CA, the zone's <state_dir>/api-token, or a host token from "
                "`hostagent zone host-token HOST`"
            )
    return await handler(request)


def _tls(request: web.Request) -> tuple[bool, Any]:
    """Whether the request came over TLS, and the client certificate ssl verified (the
    dict of getpeercert(); None or empty without one)."""
    transport = request.transport
    if transport is None or transport.get_extra_info("ssl_object") is None:
        return False, None
    return True, transport.get_extra_info("peercert")


def _admin(request: web.Request) -> None:
    if request[CALLER] != "admin":
        raise Forbidden("this call needs the zone's admin token, not a host token")


def _host(request: web.Request) -> str:
    caller = request[CALLER]
    if caller.startswith(_BOOTSTRAP):
        raise Forbidden(
            "a host token only bootstraps the host's client certificate "
            f"(POST /v1/hosts/{caller.removeprefix(_BOOTSTRAP)}/certificate); then the "
            "agent calls with that certificate"
        )
    if not caller.startswith(_HOST):
        raise Forbidden("this call is for agents: use the host's own certificate or token")
    return caller.removeprefix(_HOST)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS]()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(zone_openapi(__version__))


async def zone(request: web.Request) -> web.Response:
    """The replicas, the leader and the store (any valid token)."""
    return web.json_response(request.app[ZONE_VIEW]())


async def put_host(request: web.Request) -> web.Response:
    host = request.match_info["host"]
    if _host(request) != host:
        raise Forbidden(f"host {_host(request)} cannot report for host {host}")
    raw, reports = await request.read(), request.app[REPORTS]
    last = reports.get(host)
    if last is not None and last[0] == raw:
        report = last[1]
    else:
        report = parse_body(HostReport, raw, "host report")
        reports[host] = (raw, report)
    created = await request.app[SERVICE].report(host, report)
    body = {"host": host, "heartbeat_interval_s": request.app[HEARTBEAT]}
    return web.json_response(body, status=201 if created else 200)


async def post_certificate(request: web.Request) -> web.Response:
    """A client certificate for the host: bootstrapped with a fresh host token (once per
    token generation) or renewed with the host's current certificate."""
    host, caller = request.match_info["host"], request[CALLER]
    if not _tls(request)[0]:
        raise Forbidden("client certificates are issued over TLS only: the zone serves plain http")
    if caller.startswith(_BOOTSTRAP):
        token = request[BOOTSTRAP]
        if token.host != host:
            raise Forbidden(f"a host token of {token.host} cannot bootstrap host {host}")
        generation: int | None = token.generation
    elif caller == _HOST + host:
        generation = None
    else:
        who = caller.removeprefix(_HOST)
        raise Forbidden(f"{who} cannot ask for a certificate of host {host}")
    store, control = request.app[SERVICE].store, request.app[CONTROL]
    if generation is not None and generation <= store.token_generation(host):
        raise Forbidden(_used_token(host, generation))
    body = parse_body(CertificateRequest, await request.read(), "certificate request")
    try:
        issued = control.issue_host(body.csr, host)
    except controlca.BadRequest as exc:
        raise Invalid(str(exc)) from exc
    not_after = issued.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        await store.record_certificate(host, generation, not_after)
    except Stale as exc:
        assert generation is not None  # a renewal never is stale
        raise Forbidden(_used_token(host, generation)) from exc
    answer = {
        "certificate": issued.cert_pem,
        "ca": issued.ca_pem,
        "not_after": not_after,
    }
    return web.json_response(answer, status=201)


def _used_token(host: str, generation: int) -> str:
    return (
        f"this host token of {host} (generation {generation}) was already used to bootstrap "
        f"a certificate; host tokens bootstrap once: make a new one with `hostagent zone "
        f"host-token {host}` on the zone and put it in the agent's [zone] token_file"
    )


async def delete_host(request: web.Request) -> web.Response:
    _admin(request)
    await request.app[SERVICE].remove_host(request.match_info["host"])
    request.app[REPORTS].pop(request.match_info["host"], None)
    return web.Response(status=204)


async def list_hosts(request: web.Request) -> web.Response:
    _admin(request)
    return web.json_response({"items": request.app[SERVICE].hosts_view()})


async def put_cluster(request: web.Request) -> web.Response:
    _admin(request)
    spec = parse_body(ClusterSpec, await request.read(), "cluster spec")
    view, created = await request.app[SERVICE].put_cluster(request.match_info["cluster"], spec)
    return web.json_response(view, status=201 if created else 200)


async def get_cluster(request: web.Request) -> web.Response:
    _admin(request)
    return web.json_response(request.app[SERVICE].cluster(request.match_info["cluster"]))


async def list_clusters(request: web.Request) -> web.Response:
    _admin(request)
    return web.json_response({"items": request.app[SERVICE].clusters()})


async def delete_cluster(request: web.Request) -> web.Response:
    _admin(request)
    view = await request.app[SERVICE].delete_cluster(request.match_info["cluster"])
    return web.json_response(view, status=202)


async def node_console(request: web.Request) -> web.Response:
    _admin(request)
    limit = tail_bytes(request)
    match = request.match_info
    text = await request.app[RELAY].console(match["cluster"], match["node"], limit)
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def put_image(request: web.Request) -> web.Response:
    _admin(request)
    source = parse_source(await request.read())
    view, created = await request.app[CATALOGUE].put(request.match_info["image"], source)
    return web.json_response(view, status=201 if created else 200)


async def get_image(request: web.Request) -> web.Response:
    _admin(request)
    return web.json_response(request.app[CATALOGUE].get(request.match_info["image"]))


async def list_images(request: web.Request) -> web.Response:
    _admin(request)
    return web.json_response({"items": request.app[CATALOGUE].all()})


async def delete_image(request: web.Request) -> web.Response:
    _admin(request)
    await request.app[CATALOGUE].delete(request.match_info["image"])
    return web.Response(status=204)


async def pki_ca(request: web.Request) -> web.Response:
    service, cluster = request.app[SERVICE], request.match_info["cluster"]
    service.check_pki(_host(request), cluster)
    cas = await asyncio.to_thread(service.pki.ca_certificates, cluster)
    return web.json_response({"cas": {str(name): pem for name, pem in cas.items()}})


async def pki_sign(request: web.Request) -> web.Response:
    service, cluster = request.app[SERVICE], request.match_info["cluster"]
    host = _host(request)  # an admin is refused before the body is read
    body: SignRequest = parse_body(SignRequest, await request.read(), "signing request")
    service.check_pki(host, cluster, body.name)
    profile = PROFILE_BY_NAME[body.name]
    cert_request = CertRequest(
        name=profile.name,
        ca=profile.ca,
        common_name=profile.common_name,
        organizations=profile.organizations,
        dns_sans=(),
        ip_sans=(),
        usages=(),
        ttl=min(dt.timedelta(seconds=body.ttl_s), MAX_TTL),
    )
    issued = await asyncio.to_thread(service.pki.issue, cluster, cert_request, body.csr)
    return web.json_response({"cert": issued.cert_pem, "ca": issued.ca_pem})


async def pki_service_account(request: web.Request) -> web.Response:
    service, cluster = request.app[SERVICE], request.match_info["cluster"]
    service.check_pki(_host(request), cluster)
    try:
        private, public = await asyncio.to_thread(service.pki.service_account_key, cluster)
    except PkiError as exc:
        raise Unavailable(str(exc)) from exc
    return web.json_response({"key": private, "public": public})


def zone_app(
    service: ZoneService,
    admin_token: str,
    host_secret: str,
    *,
    metrics_text: Callable[[], bytes],
    heartbeat_s: float,
    control: ControlPlane,
    zone_view: Callable[[], dict[str, Any]],
    agents_tls: ssl.SSLContext | None = None,
) -> web.Application:
    """agents_tls: how the console relay calls agents (the Deliverer's; None: the
    system's CAs, no client certificate)."""
    app = web.Application(middlewares=[errors, auth], client_max_size=8 * 1024 * 1024)
    app[SERVICE] = service
    app[CATALOGUE] = Catalogue(service)
    app[RELAY] = ConsoleRelay(service, agents_tls or http.tls_context())
    app[ADMIN_TOKEN] = admin_token
    app[HOST_SECRET] = host_secret
    app[METRICS] = metrics_text
    app[HEARTBEAT] = heartbeat_s
    app[CONTROL] = control
    app[ZONE_VIEW] = zone_view
    app[REPORTS] = {}
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/v1/zone", zone)
    app.router.add_put("/v1/hosts/{host}", put_host)
    app.router.add_post("/v1/hosts/{host}/certificate", post_certificate)
    app.router.add_get("/v1/hosts", list_hosts)
    app.router.add_delete("/v1/hosts/{host}", delete_host)
    app.router.add_get("/v1/images", list_images)
    image = "/v1/images/{image}"
    app.router.add_put(image, put_image)
    app.router.add_get(image, get_image)
    app.router.add_delete(image, delete_image)
    app.router.add_get("/v1/clusters", list_clusters)
    cluster = "/v1/clusters/{cluster}"
    app.router.add_put(cluster, put_cluster)
    app.router.add_get(cluster, get_cluster)
    app.router.add_delete(cluster, delete_cluster)
    app.router.add_get(cluster + "/nodes/{node}/console", node_console)
    app.router.add_get(cluster + "/pki/ca", pki_ca)
    app.router.add_post(cluster + "/pki/sign", pki_sign)
    app.router.add_get(cluster + "/pki/service-account", pki_service_account)
    return app
