"""The API as an OpenAPI 3 document, schemas generated from the pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from common.names import DNS1123_LABEL
from hostagent import console
from hostagent.imagesource import ImageInfo, ImageList, ImageSource
from hostagent.model import ErrorResponse, Health, Node, NodeHealth, NodeList, NodeSpec
from hostagent.networks import PeerList

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(model=name)}


def _response(description: str, schema: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description}
    if schema:
        response["content"] = {"application/json": {"schema": _ref(schema)}}
    return response


ERRORS = {
    str(code): _response(text, "ErrorResponse")
    for code, text in (
        (400, "malformed request"),
        (401, "no or wrong token, and no client certificate of the zone"),
        (403, "a client certificate that may not make this call (mutual TLS)"),
        (404, "no such node, peer list or image"),
        (409, "conflicts with existing state"),
        (422, "well-formed but invalid"),
        (507, "host out of capacity"),
    )
}
# A write that finds the store's disk full changes nothing and answers 503 store_full.
WRITE_ERRORS = {**ERRORS, "503": _response("the state store cannot be written", "ErrorResponse")}
# aiohttp's answer to a body over the app's client_max_size (1 MiB; phone-home's own app
# 64 KiB), for every operation that reads one.
TOO_LARGE = {"413": _response("body too large", "ErrorResponse")}


def name_parameters(**examples: str) -> list[dict[str, Any]]:
    """Path parameters that are names (cluster, node, host: DNS-1123 labels), each with
    its example."""
    label = {"type": "string", "maxLength": 63, "pattern": DNS1123_LABEL.pattern}
    return [
        {"name": name, "in": "path", "required": True, "schema": label, "example": example}
        for name, example in examples.items()
    ]


def json_body(schema: str, example: dict[str, Any]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": _ref(schema), "example": example}},
    }


# The documents' examples (API.md's), one node of each example cluster.
EXAMPLE_NAMES = {"cluster": "alpha", "node": "m1"}
NODE_SPEC_EXAMPLE: dict[str, Any] = {
    "role": "master",
    "vcpus": 2,
    "memory_mib": 2048,
    "disk_gib": 20,
    "image": "lab",
    "kubernetes_version": "1.31.2",
    "network": {"vni": 4242, "address": "10.42.0.11/24", "gateway": "10.42.0.1", "mtu": 1450},
    "ssh_authorized_keys": [],
}
IMAGE_SOURCE_EXAMPLE: dict[str, Any] = {
    "url": "https://images.example.com/debian-12/disk.qcow2",
    "sha256": "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef",
    "format": "qcow2",
    "kernel": {
        "url": "https://images.example.com/debian-12/vmlinuz",
        "sha256": "0263829989b6fd954f72baaf2fc64bc2e2f01d692d4de72986ea808f6e99813f",
    },
    "initrd": {
        "url": "https://images.example.com/debian-12/initrd.img",
        "sha256": "a4e624d686e03ed2767c0abd85c14426b0b1157d2ce81d27bb4fe4f6f01d688a",
    },
    "cmdline": "console=ttyS0 root=/dev/vda",
}
PEER_LIST_EXAMPLE = {"peers": [{"address": "10.250.0.12", "macs": ["52:54:00:aa:bb:cc"]}]}
NAME_PARAMS = name_parameters(**EXAMPLE_NAMES)
PEERS_PATH = {
    "parameters": NAME_PARAMS[:1],
    "put": {
        "summary": "Replace the cluster's peer hosts (the zone sends them) and rewire its FDB",
        "requestBody": json_body("PeerList", PEER_LIST_EXAMPLE),
        "responses": {
            "200": _response("the stored list", "PeerList"),
            **WRITE_ERRORS,
            **TOO_LARGE,
        },
    },
    "get": {
        "summary": "The cluster's peer hosts as last stored",
        "responses": {"200": _response("the stored list", "PeerList"), **ERRORS},
    },
    "delete": {
        "summary": "Forget the cluster's peer list (also when there is none)",
        "responses": {"204": {"description": "forgotten"}, **WRITE_ERRORS},
    },
}


IMAGE_PATH = {
    "parameters": name_parameters(image="debian-12"),
    "put": {
        "summary": "Pull the image from its source (in the background: GET it for the "
        "progress); the same source again changes nothing",
        "requestBody": json_body("ImageSource", IMAGE_SOURCE_EXAMPLE),
        "responses": {
            "200": _response("existed", "ImageInfo"),
            "201": _response("accepted, downloading", "ImageInfo"),
            **WRITE_ERRORS,
            **TOO_LARGE,
        },
    },
    "get": {
        "summary": "The image, and how its pull goes",
        "responses": {"200": _response("the image", "ImageInfo"), **ERRORS},
    },
    "delete": {
        "summary": "Remove a pulled image no node names (409 naming the nodes otherwise)",
        "responses": {"204": {"description": "removed"}, **WRITE_ERRORS},
    },
}
CONSOLE_PATH: dict[str, Any] = {
    "parameters": NAME_PARAMS,
    "get": {
        "summary": "The end of the node's serial console log (rotated by size)",
        "parameters": [
            {
                "name": "tail_bytes",
                "in": "query",
                "required": False,
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": console.MAX_TAIL_BYTES,
                    "default": console.DEFAULT_TAIL_BYTES,
                },
            }
        ],
        "responses": {
            "200": {
                "description": "the log's last tail_bytes bytes (UTF-8, invalid bytes replaced)",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **ERRORS,
        },
    },
}


def _paths() -> dict[str, Any]:
    node_path = {
        "parameters": NAME_PARAMS,
        "put": {
            "summary": "Create or update the desired node",
            "requestBody": json_body("NodeSpec", NODE_SPEC_EXAMPLE),
            "responses": {
                "200": _response("existed", "Node"),
                "201": _response("created", "Node"),
                **WRITE_ERRORS,
                **TOO_LARGE,
            },
        },
        "get": {
            "summary": "The node",
            "responses": {"200": _response("the node", "Node"), **ERRORS},
        },
        "delete": {
            "summary": "Delete the node: Deleting, then gone",
            "responses": {"202": _response("deleting", "Node"), **WRITE_ERRORS},
        },
    }
    plain = {
        "200": {
            "description": "ok",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    }
    return {
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "security": [],
                "responses": {
                    "200": _response("ok", "Health"),
                    "503": _response("libvirt unreachable", "Health"),
                },
            }
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
        "/v1/openapi.json": {
            "get": {"summary": "This document", "responses": {**plain, **ERRORS}},
        },
        "/v1/host": {
            "get": {"summary": "Host capacity and allocation", "responses": {**plain, **ERRORS}}
        },
        "/v1/images": {
            "get": {
                "summary": "The images on this host: folders and pulled ones, any phase",
                "responses": {"200": _response("images", "ImageList"), **ERRORS},
            }
        },
        "/v1/images/{image}": IMAGE_PATH,
        "/v1/clusters/{cluster}/nodes/{node}/console": CONSOLE_PATH,
        "/v1/nodes": {
            "get": {
                "summary": "All nodes",
                "responses": {"200": _response("nodes", "NodeList"), **ERRORS},
            }
        },
        "/v1/clusters/{cluster}/nodes/{node}": node_path,
        "/v1/clusters/{cluster}/peers": PEERS_PATH,
        "/v1/clusters/{cluster}/nodes/{node}/events": {
            "parameters": NAME_PARAMS,
            "get": {"summary": "Phase transitions of the node", "responses": {**plain, **ERRORS}},
        },
        "/v1/phone-home/{cluster}/{node}": {
            "parameters": NAME_PARAMS,
            "post": {
                "summary": "Called by the guest when booted; bearer is the node token",
                "security": [{"nodeToken": []}],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {"200": _response("ready", "Node"), **WRITE_ERRORS, **TOO_LARGE},
            },
        },
        "/v1/phone-home/{cluster}/{node}/health": {
            "parameters": NAME_PARAMS,
            "post": {
                "summary": "The guest's periodic report that it is alive (every "
                "[health] report_interval_s); bearer is the node token",
                "security": [{"nodeToken": []}],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": _response("the node's health", "NodeHealth"),
                    **WRITE_ERRORS,
                    **TOO_LARGE,
                },
            },
        },
    }


def openapi_document(version: str) -> dict[str, Any]:
    _, schemas = models_json_schema(
        [
            (m, "serialization")
            for m in (
                NodeSpec,
                Node,
                NodeList,
                NodeHealth,
                ErrorResponse,
                Health,
                PeerList,
                ImageSource,
                ImageInfo,
                ImageList,
            )
        ],
        ref_template=REF,
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "hostagent", "version": version},
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "nodeToken": {"type": "http", "scheme": "bearer"},
                "zoneCertificate": {"type": "mutualTLS"},
            },
        },
        "security": [{"bearer": []}, {"zoneCertificate": []}],
        "paths": _paths(),
    }
