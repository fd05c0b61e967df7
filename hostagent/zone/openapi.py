"""The zone's API as an OpenAPI 3 document, schemas generated from the pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from hostagent.model import ErrorResponse
from hostagent.zone.model import ClusterSpec, HostReport, SignRequest

_JSON = "application/json"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {_JSON: {"schema": _ref(schema)}}}


def _ok(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": {"type": "object"}}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref("ErrorResponse")}}}


ERRORS = {
    str(code): _error(text)
    for code, text in (
        (400, "malformed request"),
        (401, "no or wrong token"),
        (403, "a token that may not make this call"),
        (404, "no such cluster"),
        (409, "conflicts with existing state"),
        (422, "well-formed but invalid"),
        (503, "a backend the call needs is unavailable"),
        (507, "the zone has not enough capacity"),
    )
}
# aiohttp's answer to a body over the app's client_max_size, for every operation with one.
TOO_LARGE = {"413": _error("body too large")}
_NAME = [{"name": "cluster", "in": "path", "required": True, "schema": {"type": "string"}}]
_HOST = [{"name": "host", "in": "path", "required": True, "schema": {"type": "string"}}]


def _paths() -> dict[str, Any]:
    def op(summary: str, status: str = "200", **extra: Any) -> dict[str, Any]:
        errors = {**ERRORS, **TOO_LARGE} if "requestBody" in extra else ERRORS
        return {"summary": summary, "responses": {status: _ok(summary), **errors}, **extra}

    return {
        "/healthz": {
            "get": {"summary": "Liveness", "security": [], "responses": {"200": _ok("ok")}}
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v1/openapi.json": {"get": op("This document")},
        "/v1/zone": {
            "get": op(
                "The zone's replicas (id, api_url, started, leader), the leader's id, this "
                "replica's id and the store (backend; etcd: endpoints, prefix, revision)"
            )
        },
        "/v1/hosts": {"get": op("Every registered host with its state (admin token)")},
        "/v1/hosts/{host}": {
            "parameters": _HOST,
            "put": op(
                "Register or heartbeat (the host's own token); 201 the first time",
                requestBody=_body("HostReport"),
            ),
            "delete": op("Forget a host that runs no wanted node (admin token)", "204"),
        },
        "/v1/clusters": {"get": op("Every cluster with its status")},
        "/v1/clusters/{cluster}": {
            "parameters": _NAME,
            "put": op("Create (201) or scale (200) a cluster", requestBody=_body("ClusterSpec")),
            "get": op("The cluster with its allocation and each node's host and phase"),
            "delete": op("Delete the cluster from every host", "202"),
        },
        "/v1/clusters/{cluster}/pki/ca": {"parameters": _NAME, "get": op("The cluster's CAs")},
        "/v1/clusters/{cluster}/pki/sign": {
            "parameters": _NAME,
            "post": op("Sign a node's CSR (host token)", requestBody=_body("SignRequest")),
        },
        "/v1/clusters/{cluster}/pki/service-account": {
            "parameters": _NAME,
            "get": op("The cluster's service-account key pair (host token)"),
        },
    }


def zone_openapi(version: str) -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(m, "validation") for m in (ClusterSpec, HostReport, SignRequest, ErrorResponse)],
        ref_template="#/components/schemas/{model}",
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "hostagent zone API", "version": version},
        "paths": _paths(),
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
