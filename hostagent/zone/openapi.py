"""The zone's API as an OpenAPI 3 document, schemas generated from the pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from hostagent.imagesource import ImageSource
from hostagent.model import ErrorResponse
from hostagent.openapi import CONSOLE_PATH, IMAGE_SOURCE_EXAMPLE, json_body, name_parameters
from hostagent.zone.model import CertificateRequest, ClusterSpec, HostReport, SignRequest

_JSON = "application/json"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": {"type": "object"}}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref("ErrorResponse")}}}


ERRORS = {
    str(code): _error(text)
    for code, text in (
        (400, "malformed request"),
        (401, "no or wrong token, and no client certificate"),
        (403, "a token or client certificate that may not make this call"),
        (404, "no such cluster"),
        (409, "conflicts with existing state"),
        (422, "well-formed but invalid"),
        (503, "a backend the call needs is unavailable"),
        (507, "the zone has not enough capacity"),
    )
}
# aiohttp's answer to a body over the app's client_max_size, for every operation with one.
TOO_LARGE = {"413": _error("body too large")}
# The document's examples (docs/zone.md's): a host, and a cluster that fits on it.
EXAMPLE_NAMES = {"cluster": "demo", "host": "h1"}
HOST_REPORT_EXAMPLE: dict[str, Any] = {
    "api_url": "https://10.250.0.11:8470",
    "api_token": "agent-token",
    "underlay_address": "10.250.0.11",
    "failure_domain": "rack-1",
    "allocatable": {"vcpus": 12.0, "memory_mib": 30720, "disk_gib": 490},
    "allocated": {"vcpus": 0.0, "memory_mib": 0, "disk_gib": 0},
    "domain_type": "kvm",
    "version": "0.1.0",
}
CLUSTER_SPEC_EXAMPLE: dict[str, Any] = {
    "kubernetes_version": "1.31.2",
    "image": "lab",
    "masters": {"count": 1, "vcpus": 2, "memory_mib": 2048, "disk_gib": 20},
    "workers": {"count": 2, "vcpus": 2, "memory_mib": 2048, "disk_gib": 20},
    "ssh_authorized_keys": [],
}
# kube-proxy's client certificate request (CN system:kube-proxy, an ECDSA P-256 key).
SIGN_REQUEST_EXAMPLE = {
    "name": "kube-proxy",
    "csr": "-----BEGIN CERTIFICATE REQUEST-----\n"
    "MIHVMH4CAQAwHDEaMBgGA1UEAwwRc3lzdGVtOmt1YmUtcHJveHkwWTATBgcqhkjO\n"
    "PQIBBggqhkjOPQMBBwNCAAToMynCsFRt6JXp+VIXzQTuyAXIna9fHDdDTaOQTEM5\n"
    "W+FSs41eScd+R8zqBacLeS68Lfl/RbPo6IOWmXlY5XzroAAwCgYIKoZIzj0EAwID\n"
    "RwAwRAIgamCfRfCeqm0vu4gyDdQZ+B1J5fArhoxRznEieBWMXDICIAt8ePI245oG\n"
    "Hj9/5Dn1NTrtMRG21LAb7334oosYkPOS\n"
    "-----END CERTIFICATE REQUEST-----\n",
    "ttl_s": 86400,
}
# A host's control-plane certificate request (CN h1, an ECDSA P-256 key).
CERTIFICATE_REQUEST_EXAMPLE = {
    "csr": "-----BEGIN CERTIFICATE REQUEST-----\n"
    "MIHHMG8CAQAwDTELMAkGA1UEAwwCaDEwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC\n"
    "AAS7TANTH5RNSeQMzf1Y+Ko8gV/hKuyh4nlJjTjUu/Fei7Z39CQaJQTAWMSFKJRv\n"
    "LJOoojp4Rze4RXYOt9J+b3LmoAAwCgYIKoZIzj0EAwIDSAAwRQIhAL6hL/3EQLGy\n"
    "H6PoPY+R7vUHDQiZY/Kejw8GzZlg/pPgAiA2b366rb8gS6tbXutbUXXDoInWFF2U\n"
    "Ub46SyGImgbDVQ==\n"
    "-----END CERTIFICATE REQUEST-----\n",
}
_NAME = name_parameters(cluster=EXAMPLE_NAMES["cluster"])
_HOST = name_parameters(host=EXAMPLE_NAMES["host"])
_IMAGE = name_parameters(image="debian-12")
_NODE = name_parameters(cluster=EXAMPLE_NAMES["cluster"], node="m1")


def _paths() -> dict[str, Any]:
    def op(summary: str, *statuses: str, **extra: Any) -> dict[str, Any]:
        """An operation answering a JSON object with each of statuses (200 if none given;
        a 204 has no body)."""
        errors = {**ERRORS, **TOO_LARGE} if "requestBody" in extra else ERRORS
        ok = {s: {"description": summary} if s == "204" else _ok(summary) for s in statuses}
        return {
            "summary": summary,
            "responses": {**(ok or {"200": _ok(summary)}), **errors},
            **extra,
        }

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
                "Register (201) or heartbeat (200) as the host itself: its own client "
                "certificate (its token on a plain-http zone)",
                "200",
                "201",
                requestBody=json_body("HostReport", HOST_REPORT_EXAMPLE),
            ),
            "delete": op("Forget a host that runs no wanted node (admin token)", "204"),
        },
        "/v1/hosts/{host}/certificate": {
            "parameters": _HOST,
            "post": op(
                "The host's control-plane client certificate for the CSR's key: "
                '{"certificate", "ca", "not_after"}. Bootstrap with a one-time host token '
                "(403 once its generation was used), renew with the current certificate; "
                "over TLS only",
                "201",
                requestBody=json_body("CertificateRequest", CERTIFICATE_REQUEST_EXAMPLE),
            ),
        },
        "/v1/images": {"get": op("The zone's image catalogue, each with its hosts' copies")},
        "/v1/images/{image}": {
            "parameters": _IMAGE,
            "put": op(
                "Add (201) or keep (200) an image of the catalogue: the agent's ImageSource; "
                "409 for another source while a cluster names it",
                "200",
                "201",
                requestBody=json_body("ImageSource", IMAGE_SOURCE_EXAMPLE),
            ),
            "get": op("The image, the clusters naming it and its hosts' copies"),
            "delete": op("Remove an image no cluster names from the catalogue", "204"),
        },
        "/v1/clusters": {"get": op("Every cluster with its status")},
        "/v1/clusters/{cluster}": {
            "parameters": _NAME,
            "put": op(
                "Create (201), scale or roll (200) a cluster: a new kubernetes_version, image "
                "or node size starts a rollout (docs/zone.md)",
                "200",
                "201",
                requestBody=json_body("ClusterSpec", CLUSTER_SPEC_EXAMPLE),
            ),
            "get": op("The cluster with its allocation and each node's host and phase"),
            "delete": op("Delete the cluster from every host", "202"),
        },
        "/v1/clusters/{cluster}/nodes/{node}/console": {
            "parameters": _NODE,
            "get": {
                **CONSOLE_PATH["get"],
                "summary": "The end of the node's serial console, relayed from its host's agent",
                "responses": {**CONSOLE_PATH["get"]["responses"], **ERRORS},
            },
        },
        "/v1/clusters/{cluster}/pki/ca": {"parameters": _NAME, "get": op("The cluster's CAs")},
        "/v1/clusters/{cluster}/pki/sign": {
            "parameters": _NAME,
            "post": op(
                "Sign a node's CSR (the host's certificate or token)",
                requestBody=json_body("SignRequest", SIGN_REQUEST_EXAMPLE),
            ),
        },
        "/v1/clusters/{cluster}/pki/service-account": {
            "parameters": _NAME,
            "get": op("The cluster's service-account key pair (the host's certificate or token)"),
        },
    }


def zone_openapi(version: str) -> dict[str, Any]:
    _, schemas = models_json_schema(
        [
            (m, "validation")
            for m in (
                ClusterSpec,
                HostReport,
                SignRequest,
                CertificateRequest,
                ImageSource,
                ErrorResponse,
            )
        ],
        ref_template="#/components/schemas/{model}",
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "hostagent zone API", "version": version},
        "paths": _paths(),
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "clientCertificate": {"type": "mutualTLS"},
            },
        },
        "security": [{"bearer": []}, {"clientCertificate": []}],
    }
