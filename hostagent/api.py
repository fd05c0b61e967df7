"""HTTP <-> NodeService. Handlers only translate; errors map to status codes in one place."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel

from common.errors import HostAgentError
from common.files import same_secret
from common.names import check_name
from hostagent import __version__, console
from hostagent.errors import (
    Conflict,
    Forbidden,
    Invalid,
    MalformedRequest,
    NotFound,
    OutOfCapacity,
    Unauthorized,
    Unavailable,
)
from hostagent.imageservice import ImageService, parse_name, parse_source
from hostagent.imagesource import ImageList
from hostagent.model import NodeKey
from hostagent.networks import PeerList, StoredPeers, parse_peers
from hostagent.nodes import NodeService, parse_key, parse_spec
from hostagent.openapi import openapi_document
from pki import controlca

log = logging.getLogger(__name__)

STATUS = {
    MalformedRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    Invalid: 422,
    OutOfCapacity: 507,
    Unavailable: 503,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVICE = web.AppKey("service", NodeService)
PEERS = web.AppKey("peers", StoredPeers)
TOKEN = web.AppKey("token", str)
HOST_INFO: web.AppKey[Callable[[], Awaitable[dict[str, Any]]]] = web.AppKey("host_info")
HEALTHY: web.AppKey[Callable[[], Awaitable[bool]]] = web.AppKey("healthy")
METRICS: web.AppKey[Callable[[], bytes]] = web.AppKey("metrics")
IMAGES = web.AppKey("images", ImageService)


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def error_middleware(statuses: Mapping[type[HostAgentError], int]) -> Middleware:
    """Errors of the one hierarchy -> API.md's error shape, by the nearest class in
    statuses (500, logged, for anything unmapped)."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HostAgentError as exc:
            kinds = type(exc).__mro__
            status = next((statuses[k] for k in kinds if k in statuses), 500)
            if status == 500:
                log.error("%s %s: %s", request.method, request.path, exc)
            return error_response(status, exc.code, str(exc))
        except web.HTTPException as exc:
            if exc.status >= 400:
                reason = exc.reason.lower().replace(" ", "_")
                response = error_response(exc.status, reason, exc.reason)
                if "Allow" in exc.headers:  # a 405 must name the allowed methods (RFC 9110)
                    response.headers["Allow"] = exc.headers["Allow"]
                return response
            raise

    return errors


errors = error_middleware(STATUS)


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The API token (the CLI, a controller), or on the cluster and image endpoints the zone's
    client certificate: the server asks for one with mutual TLS, and ssl verified it
    against the zone's CA; a certificate naming anyone else is refused."""
    path = request.path
    if path.startswith("/v1/") and not path.startswith("/v1/phone-home/"):
        given = _bearer(request)
        if given is not None and same_secret(given, request.app[TOKEN]):
            return await handler(request)
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        if peer:
            identity = controlca.identity_of(peer)
            if identity is None or identity.kind != "zone":
                who = f"host {identity.name}" if identity else "no part of hostagent"
                raise Forbidden(f"a client certificate naming {who} may not call this agent")
            if not path.startswith(("/v1/clusters/", "/v1/images")):
                raise Forbidden(
                    "the zone's certificate is for the cluster and image endpoints only"
                )
            return await handler(request)
        raise Unauthorized(
            "missing or wrong bearer token (see <state_dir>/api-token), and no client "
            "certificate of the zone"
        )
    return await handler(request)


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        text=model.model_dump_json(), status=status, content_type="application/json"
    )


def _key(request: web.Request) -> NodeKey:
    return parse_key(request.match_info["cluster"], request.match_info["node"])


async def healthz(request: web.Request) -> web.Response:
    ok = await request.app[HEALTHY]()
    return web.json_response(
        {"status": "ok" if ok else "degraded", "libvirt": ok}, status=200 if ok else 503
    )


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS]()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def host(request: web.Request) -> web.Response:
    return web.json_response(await request.app[HOST_INFO]())


async def list_images(request: web.Request) -> web.Response:
    return _json(ImageList(items=request.app[IMAGES].all()))


def _image(request: web.Request) -> str:
    return parse_name(request.match_info["image"])


async def put_image(request: web.Request) -> web.Response:
    name = _image(request)
    source = parse_source(await request.read())
    image, created = await request.app[IMAGES].put(name, source)
    return _json(image, 201 if created else 200)


async def get_image(request: web.Request) -> web.Response:
    return _json(request.app[IMAGES].get(_image(request)))


async def delete_image(request: web.Request) -> web.Response:
    await request.app[IMAGES].delete(_image(request))
    return web.Response(status=204)


def tail_bytes(request: web.Request) -> int:
    """The console's tail_bytes parameter (400 outside its bounds)."""
    try:
        return console.tail_bytes(request.query.get("tail_bytes"))
    except ValueError as exc:
        raise MalformedRequest(str(exc)) from exc


async def node_console(request: web.Request) -> web.Response:
    key, limit = _key(request), tail_bytes(request)
    data = await asyncio.to_thread(request.app[SERVICE].console, key, limit)
    return web.Response(
        text=data.decode("utf-8", errors="replace"), content_type="text/plain", charset="utf-8"
    )


async def put_node(request: web.Request) -> web.Response:
    key = _key(request)
    spec = parse_spec(await request.read())
    node, created = await request.app[SERVICE].put(key, spec)
    return _json(node, 201 if created else 200)


async def get_node(request: web.Request) -> web.Response:
    return _json(request.app[SERVICE].get(_key(request)))


async def node_events(request: web.Request) -> web.Response:
    key = _key(request)
    service = request.app[SERVICE]
    service.get(key)
    items = [
        {"phase": t.phase.value, "message": t.message, "at": t.at}
        for t in service.store.transitions(key)
    ]
    return web.json_response({"items": items})


async def list_nodes(request: web.Request) -> web.Response:
    items = [node.model_dump(mode="json") for node in request.app[SERVICE].all()]
    return web.json_response({"items": items})


async def delete_node(request: web.Request) -> web.Response:
    return _json(await request.app[SERVICE].delete(_key(request)), 202)


def _cluster(request: web.Request) -> str:
    try:
        return check_name("cluster", request.match_info["cluster"])
    except ValueError as exc:
        raise Invalid(str(exc)) from exc


async def put_peers(request: web.Request) -> web.Response:
    cluster = _cluster(request)
    peers = parse_peers(cluster, await request.read())
    return _json(PeerList.of(await request.app[PEERS].put(cluster, peers)))


async def get_peers(request: web.Request) -> web.Response:
    return _json(PeerList.of(request.app[PEERS].get(_cluster(request))))


async def delete_peers(request: web.Request) -> web.Response:
    await request.app[PEERS].delete(_cluster(request))
    return web.Response(status=204)


def _guest_key(request: web.Request) -> NodeKey:
    """The node a guest speaks for. No node has an invalid name, so no node token fits it:
    401 as for any other node, not 422."""
    try:
        return _key(request)
    except Invalid as exc:
        raise Unauthorized("wrong or missing node token") from exc


async def phone_home(request: web.Request) -> web.Response:
    key = _guest_key(request)
    node = await request.app[SERVICE].phone_home(key, _bearer(request), await request.read())
    log.info("%s phoned home", key)
    return _json(node)


async def guest_health(request: web.Request) -> web.Response:
    key = _guest_key(request)
    health = request.app[SERVICE].guest_health(key, _bearer(request), await request.read())
    return _json(health)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(__version__))


def phone_home_app(service: NodeService) -> web.Application:
    """The app served on each cluster's gateway address: phone-home and nothing else."""
    app = web.Application(middlewares=[errors], client_max_size=64 * 1024)
    app[SERVICE] = service
    app.router.add_post("/v1/phone-home/{cluster}/{node}", phone_home)
    app.router.add_post("/v1/phone-home/{cluster}/{node}/health", guest_health)
    return app


def api_app(
    service: NodeService,
    token: str,
    *,
    peers: StoredPeers,
    host_info: Callable[[], Awaitable[dict[str, Any]]],
    healthy: Callable[[], Awaitable[bool]],
    metrics_text: Callable[[], bytes],
    images: ImageService,
) -> web.Application:
    app = web.Application(middlewares=[errors, auth])
    app[SERVICE] = service
    app[PEERS] = peers
    app[TOKEN] = token
    app[HOST_INFO] = host_info
    app[HEALTHY] = healthy
    app[METRICS] = metrics_text
    app[IMAGES] = images
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/v1/host", host)
    app.router.add_get("/v1/images", list_images)
    image = "/v1/images/{image}"
    app.router.add_put(image, put_image)
    app.router.add_get(image, get_image)
    app.router.add_delete(image, delete_image)
    app.router.add_get("/v1/nodes", list_nodes)
    node = "/v1/clusters/{cluster}/nodes/{node}"
    app.router.add_put(node, put_node)
    app.router.add_get(node, get_node)
    app.router.add_delete(node, delete_node)
    app.router.add_get(node + "/events", node_events)
    app.router.add_get(node + "/console", node_console)
    cluster_peers = "/v1/clusters/{cluster}/peers"
    app.router.add_put(cluster_peers, put_peers)
    app.router.add_get(cluster_peers, get_peers)
    app.router.add_delete(cluster_peers, delete_peers)
    app.router.add_post("/v1/phone-home/{cluster}/{node}", phone_home)
    app.router.add_post("/v1/phone-home/{cluster}/{node}/health", guest_health)
    return app
