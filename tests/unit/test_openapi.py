"""The served OpenAPI documents of the agent and the zone say exactly what their routers
route: every route is documented and every documented operation is routed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from common.names import DNS1123_LABEL, check_name
from hostagent.api import STATUS, api_app
from hostagent.model import NodeSpec
from hostagent.networks import parse_peers
from hostagent.openapi import EXAMPLE_NAMES, NODE_SPEC_EXAMPLE, PEER_LIST_EXAMPLE, openapi_document
from hostagent.zone.api import STATUS as ZONE_STATUS
from hostagent.zone.api import zone_app
from hostagent.zone.model import ClusterSpec, HostReport, SignRequest
from hostagent.zone.openapi import (
    CLUSTER_SPEC_EXAMPLE,
    HOST_REPORT_EXAMPLE,
    SIGN_REQUEST_EXAMPLE,
    zone_openapi,
)

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
METHODS = {"get", "put", "post", "delete", "patch"}
METRICS = b"# TYPE hostagent_x gauge\nhostagent_x 1.0\n"


async def _host_info() -> dict[str, Any]:
    return {}


async def _healthy() -> bool:
    return True


def agent() -> web.Application:
    """The agent's app; what stands behind it is never reached by these tests."""
    nothing: Any = None
    return api_app(
        nothing,
        TOKEN,
        peers=nothing,
        host_info=_host_info,
        healthy=_healthy,
        metrics_text=lambda: METRICS,
        images=nothing,
    )


def zone() -> web.Application:
    nothing: Any = None
    return zone_app(
        nothing,
        TOKEN,
        "host-secret",
        metrics_text=lambda: METRICS,
        heartbeat_s=5.0,
        control=nothing,
        zone_view=dict,
    )


@pytest.fixture(params=[agent, zone], ids=["agent", "zone"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(request.param())) as test_client:
        yield test_client


async def document(client: TestClient[Any, Any]) -> dict[str, Any]:
    response = await client.get("/v1/openapi.json", headers=AUTH)
    assert response.status == 200
    served: dict[str, Any] = await response.json()
    return served


def routed(app: web.Application) -> set[tuple[str, str]]:
    return {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"  # HEAD comes with GET
    }


async def test_every_route_is_documented_and_every_operation_routed(
    client: TestClient[Any, Any],
) -> None:
    paths = (await document(client))["paths"]
    documented = {(p, m) for p, ops in paths.items() for m in ops if m in METHODS}
    assert routed(client.server.app) == documented


async def test_every_operation_with_a_body_documents_413(client: TestClient[Any, Any]) -> None:
    """aiohttp answers 413 for a body over the app's client_max_size."""
    paths = (await document(client))["paths"]
    for path, ops in paths.items():
        for method, op in ops.items():
            if method in METHODS and "requestBody" in op:
                assert "413" in op["responses"], (method, path)


async def test_a_large_peer_list_is_a_documented_413() -> None:
    async with TestClient(TestServer(agent())) as client:
        big = b'{"peers": [' + b" " * (1024 * 1024) + b"]}"
        response = await client.put("/v1/clusters/alpha/peers", data=big, headers=AUTH)
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_entity_too_large"
        put = (await document(client))["paths"]["/v1/clusters/{cluster}/peers"]["put"]
    schema = put["responses"]["413"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}


async def test_metrics_are_documented_as_what_they_are(client: TestClient[Any, Any]) -> None:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    ok = (await document(client))["paths"]["/metrics"]["get"]["responses"]["200"]
    assert set(ok["content"]) == {"text/plain"}


async def test_a_405_names_the_allowed_methods(client: TestClient[Any, Any]) -> None:
    """RFC 9110: a 405 carries Allow. The error middleware answers in the error shape and
    keeps aiohttp's Allow header."""
    response = await client.request("TRACE", "/healthz")
    assert response.status == 405
    assert (await response.json())["error"]["code"] == "method_not_allowed"
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}


async def test_every_name_in_a_path_is_documented_as_a_dns_label(
    client: TestClient[Any, Any],
) -> None:
    """Cluster, node and host names are DNS-1123 labels (API.md): a name the document
    allows is one the API takes."""
    paths = (await document(client))["paths"]
    for path, ops in paths.items():
        for parameter in ops.get("parameters", []):
            assert parameter["in"] == "path", (path, parameter)
            schema = parameter["schema"]
            assert schema["pattern"] == DNS1123_LABEL.pattern, (path, parameter)
            assert schema["maxLength"] == 63, (path, parameter)


@pytest.mark.parametrize(
    ("served", "statuses"),
    [(openapi_document("test"), STATUS), (zone_openapi("test"), ZONE_STATUS)],
    ids=["agent", "zone"],
)
def test_every_write_documents_every_error_status(
    served: dict[str, Any], statuses: dict[type[Exception], int]
) -> None:
    """A write can meet each error its app maps to a status, a full store's 503
    (store_full) included."""
    codes = {str(status) for status in statuses.values()}
    for path, ops in served["paths"].items():
        for method in {"put", "post", "delete"} & set(ops):
            assert codes <= set(ops[method]["responses"]), (method, path)


async def test_a_204_is_documented_without_a_body(client: TestClient[Any, Any]) -> None:
    paths = (await document(client))["paths"]
    no_content = [
        op["responses"]["204"]
        for ops in paths.values()
        for op in ops.values()
        if isinstance(op, dict) and "204" in op.get("responses", {})
    ]
    assert no_content
    for response in no_content:
        assert "content" not in response, response


@pytest.mark.parametrize(
    ("app", "path"),
    [
        (agent, "/v1/clusters/{cluster}/nodes/{node}"),
        (zone, "/v1/clusters/{cluster}"),
        (zone, "/v1/hosts/{host}"),
    ],
)
async def test_a_put_that_creates_documents_201_and_200(app: Any, path: str) -> None:
    async with TestClient(TestServer(app())) as client:
        put = (await document(client))["paths"][path]["put"]
    assert {"200", "201"} <= set(put["responses"])
    assert put["responses"]["200"]["content"] == put["responses"]["201"]["content"]


def test_the_documents_examples_are_valid_requests() -> None:
    """What a reader copies from the documents passes the models (the fuzz test also sends
    them to the real apps)."""
    NodeSpec.model_validate(NODE_SPEC_EXAMPLE)
    parse_peers(EXAMPLE_NAMES["cluster"], json.dumps(PEER_LIST_EXAMPLE).encode())
    HostReport.model_validate(HOST_REPORT_EXAMPLE)
    ClusterSpec.model_validate(CLUSTER_SPEC_EXAMPLE)
    SignRequest.model_validate(SIGN_REQUEST_EXAMPLE)
    for served in (openapi_document("test"), zone_openapi("test")):
        for ops in served["paths"].values():
            for parameter in ops.get("parameters", []):
                check_name(parameter["name"], parameter["example"])
