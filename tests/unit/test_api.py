"""hostagent.api over real HTTP (aiohttp's test server): auth, status codes, error shape."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from hostagent.api import api_app, phone_home_app
from hostagent.capacity import Resources
from hostagent.config import CapacityConfig, Config
from hostagent.imagepull import ImagePuller
from hostagent.images import ImageCatalog, ImageLayout
from hostagent.imageservice import ImageService
from hostagent.model import NodeKey
from hostagent.networks import StoredPeers
from hostagent.nodehealth import Reason, Verdict
from hostagent.nodes import NodeService, parse_spec
from hostagent.store import Store
from network.model import Peer
from tests.rawhttp import bearer_error, raw_request

TOKEN = "secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NODE = "/v1/clusters/alpha/nodes/m1"
PEERS = "/v1/clusters/alpha/peers"
PEER_LIST = {
    "peers": [
        {"address": "10.250.0.12", "macs": ["52:54:00:aa:bb:cc"]},
        {"address": "10.250.0.11", "macs": []},
    ]
}
SPEC: dict[str, Any] = {
    "role": "master",
    "vcpus": 2,
    "memory_mib": 2048,
    "disk_gib": 20,
    "image": "lab",
    "kubernetes_version": "1.31.2",
    "network": {"vni": 4242, "address": "10.42.0.11/24", "gateway": "10.42.0.1", "mtu": 1450},
    "ssh_authorized_keys": [],
}
# Every path of the API contract (/work/shared/API.md).
CONTRACT_PATHS = [
    "/healthz",
    "/metrics",
    "/v1/host",
    "/v1/images",
    "/v1/clusters/{cluster}/nodes/{node}",
    "/v1/nodes",
    "/v1/phone-home/{cluster}/{node}",
    "/v1/phone-home/{cluster}/{node}/health",
]
HOST_INFO = {"host_id": "h1", "capacity": {"vcpus": 8, "memory_mib": 8192, "disk_gib": 100}}
METRICS = b"# HELP hostagent_nodes Nodes\n# TYPE hostagent_nodes gauge\nhostagent_nodes 0\n"
# Room for two SPECs, overhead included: vcpus 4, memory 2 * 2048 + 2 * 224 MiB.
PHYSICAL = Resources(vcpus=1 + 2, memory_mib=1024 + 2 * 2272, disk_gib=10 + 100)


class Health:
    ok = True


@pytest.fixture
def health() -> type[Health]:
    Health.ok = True
    return Health


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "state.db")
    yield store
    store.close()


@pytest.fixture
def puller(tmp_path: Path, store: Store) -> ImagePuller:
    config = Config(host_id="h1", state_dir=tmp_path, image_dir=tmp_path / "images")
    layout = ImageLayout(config.pulled_images)
    return ImagePuller(store, layout, config.image_cache, qemu_img_timeout_s=10)


@pytest.fixture
def service(tmp_path: Path, store: Store, puller: ImagePuller) -> NodeService:
    lab = tmp_path / "images" / "lab"
    lab.mkdir(parents=True)
    (lab / "image.json").write_text(
        json.dumps(
            {
                "name": "lab",
                "kernel": "vmlinuz",
                "initrd": "initrd.img",
                "disk": "disk.qcow2",
                "cmdline": "x",
                "recipe": "r",
                "created_at": "t",
            }
        )
    )
    for name in ("vmlinuz", "initrd.img", "disk.qcow2"):
        (lab / name).touch()
    config = Config(
        host_id="h1",
        state_dir=tmp_path,
        image_dir=tmp_path / "images",
        capacity=CapacityConfig(vcpu_ratio=2.0),
    )
    images = ImageCatalog(config.images, puller)
    return NodeService(config, store, images, PHYSICAL, lambda _key: None)


@pytest.fixture
def rewired() -> list[str]:
    """The clusters whose networks the API asked to rewire, in order."""
    return []


@pytest.fixture
async def client(
    service: NodeService,
    store: Store,
    puller: ImagePuller,
    health: type[Health],
    rewired: list[str],
) -> AsyncIterator[TestClient[Any, Any]]:
    async def host_info() -> dict[str, Any]:
        return HOST_INFO

    async def healthy() -> bool:
        return health.ok

    app = api_app(
        service,
        TOKEN,
        peers=StoredPeers(store, rewired.append),
        host_info=host_info,
        healthy=healthy,
        metrics_text=lambda: METRICS,
        images=ImageService(store, service.images, puller),
    )
    async with TestClient(TestServer(app)) as client:
        yield client


async def error_of(response: ClientResponse, status: int, code: str) -> str:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return str(body["error"]["message"])


async def put(client: TestClient[Any, Any], path: str = NODE, **changes: Any) -> ClientResponse:
    return await client.put(path, json={**SPEC, **changes}, headers=AUTH)


# --- auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
        {"Authorization": TOKEN},
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/nodes"),
        ("GET", NODE),
        ("PUT", NODE),
        ("DELETE", NODE),
        ("GET", "/v1/host"),
        ("GET", "/v1/images"),
        ("GET", "/v1/openapi.json"),
        ("GET", "/v1/no-such-thing"),
        ("PUT", PEERS),
        ("GET", PEERS),
        ("DELETE", PEERS),
    ],
)
async def test_v1_needs_the_api_token(
    client: TestClient[Any, Any], store: Store, headers: dict[str, str], method: str, path: str
) -> None:
    body = PEER_LIST if path == PEERS else SPEC
    response = await client.request(method, path, headers=headers, json=body)
    await error_of(response, 401, "unauthorized")
    assert store.all() == []
    assert store.all_peers() == {}


async def test_bearer_scheme_is_case_insensitive(client: TestClient[Any, Any]) -> None:
    response = await client.get("/v1/nodes", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status == 200


async def test_healthz_needs_no_token(client: TestClient[Any, Any], health: type[Health]) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert (await response.json())["status"] == "ok"
    health.ok = False
    response = await client.get("/healthz")
    assert response.status == 503
    assert (await response.json())["status"] == "degraded"


async def test_metrics_needs_no_token(client: TestClient[Any, Any]) -> None:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert await response.read() == METRICS


async def test_host_and_images(client: TestClient[Any, Any]) -> None:
    host = await client.get("/v1/host", headers=AUTH)
    assert host.status == 200
    assert await host.json() == HOST_INFO
    images = await client.get("/v1/images", headers=AUTH)
    assert images.status == 200
    (lab,) = (await images.json())["items"]
    assert (lab["name"], lab["origin"], lab["status"]["phase"]) == ("lab", "folder", "Ready")


# --- nodes ------------------------------------------------------------------------------------


async def test_put_creates_then_returns_200(client: TestClient[Any, Any]) -> None:
    created = await put(client)
    assert created.status == 201
    node = await created.json()
    assert (node["cluster"], node["name"]) == ("alpha", "m1")
    assert {k: node["spec"][k] for k in SPEC} == SPEC  # plus defaults for what was left out
    assert node["status"]["phase"] == "Pending"
    assert node["status"]["domain"] == "alpha-m1"
    assert node["status"]["updated_at"]

    again = await put(client)
    assert again.status == 200
    assert await again.json() == node


async def test_get_and_list(client: TestClient[Any, Any]) -> None:
    await put(client)
    got = await client.get(NODE, headers=AUTH)
    assert got.status == 200
    node = await got.json()
    assert {k: node["spec"][k] for k in SPEC} == SPEC
    assert [e["kind"] for e in node["events"]] == ["created"]
    listed = await client.get("/v1/nodes", headers=AUTH)
    assert listed.status == 200
    assert await listed.json() == {"items": [{**node, "events": None}]}  # GET of one only


async def test_empty_list(client: TestClient[Any, Any]) -> None:
    response = await client.get("/v1/nodes", headers=AUTH)
    assert await response.json() == {"items": []}


async def test_delete_is_202_then_deleting(client: TestClient[Any, Any]) -> None:
    await put(client)
    response = await client.delete(NODE, headers=AUTH)
    assert response.status == 202
    assert (await response.json())["status"]["phase"] == "Deleting"
    got = await client.get(NODE, headers=AUTH)
    assert (await got.json())["status"]["phase"] == "Deleting"


async def test_events(client: TestClient[Any, Any]) -> None:
    await put(client)
    await client.delete(NODE, headers=AUTH)
    response = await client.get(NODE + "/events", headers=AUTH)
    assert response.status == 200
    items = (await response.json())["items"]
    assert [item["phase"] for item in items] == ["Pending", "Deleting"]


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{not json", b"[]", b"", b'"spec"'])
async def test_malformed_body_is_400(
    client: TestClient[Any, Any], store: Store, body: bytes
) -> None:
    response = await client.put(NODE, data=body, headers=AUTH)
    await error_of(response, 400, "malformed")
    assert store.all() == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", NODE), ("DELETE", NODE), ("GET", NODE + "/events")],
)
async def test_unknown_node_is_404(client: TestClient[Any, Any], method: str, path: str) -> None:
    response = await client.request(method, path, headers=AUTH)
    message = await error_of(response, 404, "not_found")
    assert "alpha/m1" in message


async def test_unknown_route_is_404_in_the_same_shape(client: TestClient[Any, Any]) -> None:
    await error_of(await client.get("/v1/nope", headers=AUTH), 404, "not_found")


async def test_role_change_is_409(client: TestClient[Any, Any]) -> None:
    await put(client)
    message = await error_of(await put(client, role="worker"), 409, "conflict")
    assert "role" in message


@pytest.mark.parametrize(
    ("path", "changes", "words"),
    [
        ("/v1/clusters/Alpha/nodes/m1", {}, "cluster"),
        ("/v1/clusters/alpha/nodes/m..1", {}, "name"),
        ("/v1/clusters/" + "a" * 64 + "/nodes/m1", {}, "cluster"),
        (NODE, {"role": "boss"}, "role"),
        (NODE, {"vcpus": 0}, "vcpus"),
        (NODE, {"vcpus": True}, "vcpus"),
        (NODE, {"vcpus": "2"}, "vcpus"),
        (NODE, {"network": {**SPEC["network"], "mtu": "1450"}}, "mtu"),
        (NODE, {"unknown": 1}, "unknown"),
        (NODE, {"image": "nope"}, "nope"),
        (NODE, {"memory_mib": 64 * 1024}, "memory_mib"),
        (NODE, {"network": {"vni": 1, "address": "10.0.0.1", "gateway": "10.0.0.2"}}, "address"),
    ],
)
async def test_invalid_is_422(
    client: TestClient[Any, Any], store: Store, path: str, changes: dict[str, Any], words: str
) -> None:
    message = await error_of(await put(client, path, **changes), 422, "invalid")
    assert words in message
    assert store.all() == []


async def test_out_of_capacity_is_507(client: TestClient[Any, Any], store: Store) -> None:
    assert (await put(client)).status == 201
    worker = {"role": "worker", "network": {**SPEC["network"], "address": "10.42.0.21/24"}}
    assert (await put(client, "/v1/clusters/alpha/nodes/w1", **worker)).status == 201
    before = store.all()
    third = {"role": "worker", "network": {**SPEC["network"], "address": "10.42.0.22/24"}}
    response = await put(client, "/v1/clusters/alpha/nodes/w2", **third)
    await error_of(response, 507, "out_of_capacity")
    assert store.all() == before


async def test_method_not_allowed_is_an_error_document(client: TestClient[Any, Any]) -> None:
    response = await client.post(NODE, headers=AUTH)
    await error_of(response, 405, "method_not_allowed")


# --- phone home -------------------------------------------------------------------------------


async def test_phone_home_needs_the_node_token_not_the_api_token(
    client: TestClient[Any, Any], store: Store
) -> None:
    await put(client)
    path = "/v1/phone-home/alpha/m1"
    await error_of(await client.post(path, json={}), 401, "unauthorized")
    await error_of(await client.post(path, json={}, headers=AUTH), 401, "unauthorized")
    record = store.get(NodeKey(cluster="alpha", name="m1"))
    assert record is not None
    report = {"hostname": "alpha-m1"}
    response = await client.post(
        path, json=report, headers={"Authorization": f"Bearer {record.token}"}
    )
    assert response.status == 200
    node = await response.json()
    assert node["status"]["phase"] == "Ready"
    assert node["status"]["guest"] == report


async def test_the_guest_reports_its_health_with_the_node_token(
    client: TestClient[Any, Any], store: Store, service: NodeService
) -> None:
    await put(client)
    key = NodeKey(cluster="alpha", name="m1")
    record = store.get(key)
    assert record is not None
    path = "/v1/phone-home/alpha/m1/health"
    await error_of(await client.post(path, json={}, headers=AUTH), 401, "unauthorized")
    assert service.health.last_report(key) is None
    node_auth = {"Authorization": f"Bearer {record.token}"}
    await error_of(await client.post(path, data=b"[1]", headers=node_auth), 400, "malformed")
    response = await client.post(path, json={"kubelet": "active"}, headers=node_auth)
    assert response.status == 200
    healthy = {"healthy": True, "reason": "", "message": "", "since": None, "etcd": None}
    assert await response.json() == healthy
    assert service.health.last_report(key) is not None
    phase = store.get(key)
    assert phase is not None and phase.phase is record.phase  # a report is not a phone-home


async def test_a_master_reports_its_etcd_member_and_the_agent_keeps_the_last(
    client: TestClient[Any, Any], store: Store, service: NodeService
) -> None:
    await put(client)
    key = NodeKey(cluster="alpha", name="m1")
    record = store.get(key)
    assert record is not None
    path = "/v1/phone-home/alpha/m1/health"
    node_auth = {"Authorization": f"Bearer {record.token}"}
    for bad in ({"etcd": True}, {"etcd": {"healthy": "yes"}}, {"etcd": {}}):
        await error_of(await client.post(path, json=bad, headers=node_auth), 400, "malformed")
    assert service.health.get(key).etcd is None
    sick = await client.post(path, json={"etcd": {"healthy": False}}, headers=node_auth)
    first = (await sick.json())["etcd"]
    assert first["healthy"] is False
    await client.post(path, json={"etcd": {"healthy": True}}, headers=node_auth)
    await client.post(path, json={"kubelet": "active"}, headers=node_auth)  # says nothing
    node = await (await client.get(NODE, headers=AUTH)).json()
    etcd = node["status"]["health"]["etcd"]
    assert etcd["healthy"] is True
    assert etcd["checked_at"] >= first["checked_at"]
    assert node["status"]["health"]["healthy"] is True


async def test_get_and_list_show_the_nodes_health(
    client: TestClient[Any, Any], service: NodeService
) -> None:
    await put(client)
    key = NodeKey(cluster="alpha", name="m1")
    verdict = Verdict(Reason.NOT_RUNNING, "the VM is not running")
    service.health.record(key, verdict, "2026-12-07T05:00:00Z")
    sick = {
        "healthy": False,
        "reason": "vm-not-running",
        "message": "the VM is not running",
        "since": "2026-12-07T05:00:00Z",
        "etcd": None,
    }
    node = await (await client.get(NODE, headers=AUTH)).json()
    assert node["status"]["health"] == sick
    listed = await (await client.get("/v1/nodes", headers=AUTH)).json()
    assert listed["items"][0]["status"]["health"] == sick


async def test_phone_home_for_unknown_node_is_401(client: TestClient[Any, Any]) -> None:
    response = await client.post("/v1/phone-home/alpha/m1", json={}, headers=AUTH)
    await error_of(response, 401, "unauthorized")


@pytest.mark.parametrize(
    "path", ["/v1/phone-home/Alpha/m1", "/v1/phone-home/alpha/m..1", "/v1/phone-home/%20/m1"]
)
async def test_phone_home_for_a_name_that_cannot_be_a_node_is_401(
    client: TestClient[Any, Any], store: Store, path: str
) -> None:
    """No node has that name, so no node token fits: the same 401 as for any unknown node,
    not a 422 that tells a caller without a token how names are checked."""
    await put(client)
    before = store.all()
    await error_of(await client.post(path, json={}, headers=AUTH), 401, "unauthorized")
    assert store.all() == before


async def test_node_token_does_not_open_the_api(client: TestClient[Any, Any], store: Store) -> None:
    await put(client)
    record = store.get(NodeKey(cluster="alpha", name="m1"))
    assert record is not None
    response = await client.get("/v1/nodes", headers={"Authorization": f"Bearer {record.token}"})
    await error_of(response, 401, "unauthorized")


@pytest.mark.parametrize("path", ["/v1/phone-home/../nodes", "/v1/phone-home/%2E%2E/nodes"])
async def test_phone_home_prefix_does_not_bypass_auth(
    client: TestClient[Any, Any], path: str
) -> None:
    """A raw request line, as an attacker would send it (the client would normalise '..')."""
    status, body = await raw_request(client.server, "GET", path)
    assert status != 200
    assert b'"items"' not in body


# Bytes a header can carry that are not ASCII: UTF-8, and Latin-1 (not valid UTF-8).
NON_ASCII_TOKENS = ["wröng".encode(), "wröng".encode("latin-1"), f"{TOKEN}ö".encode()]


@pytest.mark.parametrize("token", NON_ASCII_TOKENS)
@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/nodes"), ("POST", "/v1/phone-home/alpha/m1")]
)
async def test_a_non_ascii_token_is_401_not_an_error(
    client: TestClient[Any, Any],
    caplog: pytest.LogCaptureFixture,
    token: bytes,
    method: str,
    path: str,
) -> None:
    await put(client)
    caplog.set_level(logging.ERROR)
    await bearer_error(client.server, method, path, token)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_phone_home_app_takes_health_reports(service: NodeService) -> None:
    key = NodeKey(cluster="alpha", name="m1")
    await service.put(key, parse_spec(json.dumps(SPEC).encode()))
    record = service.store.get(key)
    assert record is not None
    async with TestClient(TestServer(phone_home_app(service))) as guest:
        path = "/v1/phone-home/alpha/m1/health"
        response = await guest.post(path, json={}, headers={"Authorization": "Bearer x"})
        await error_of(response, 401, "unauthorized")
        response = await guest.post(
            path, json={}, headers={"Authorization": f"Bearer {record.token}"}
        )
        assert response.status == 200
    assert service.health.last_report(key) is not None


@pytest.mark.parametrize("token", NON_ASCII_TOKENS)
async def test_a_non_ascii_token_is_401_on_the_phone_home_app(
    service: NodeService, caplog: pytest.LogCaptureFixture, token: bytes
) -> None:
    await service.put(NodeKey(cluster="alpha", name="m1"), parse_spec(json.dumps(SPEC).encode()))
    caplog.set_level(logging.ERROR)
    async with TestServer(phone_home_app(service)) as server:
        await bearer_error(server, "POST", "/v1/phone-home/alpha/m1", token)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- peers ------------------------------------------------------------------------------------

STORED = {
    "peers": [
        {"address": "10.250.0.11", "macs": []},
        {"address": "10.250.0.12", "macs": ["52:54:00:aa:bb:cc"]},
    ]
}


async def test_peers_put_get_delete(
    client: TestClient[Any, Any], store: Store, rewired: list[str]
) -> None:
    await error_of(await client.get(PEERS, headers=AUTH), 404, "not_found")

    response = await client.put(PEERS, json=PEER_LIST, headers=AUTH)
    assert response.status == 200
    assert await response.json() == STORED  # the stored list, in address order
    assert rewired == ["alpha"]
    assert store.peers("alpha") == [
        Peer("10.250.0.11"),
        Peer("10.250.0.12", frozenset({"52:54:00:aa:bb:cc"})),
    ]

    got = await client.get(PEERS, headers=AUTH)
    assert got.status == 200
    assert await got.json() == STORED

    again = await client.put(PEERS, json=PEER_LIST, headers=AUTH)
    assert again.status == 200
    assert rewired == ["alpha"]  # the same list: nothing to rewire

    deleted = await client.delete(PEERS, headers=AUTH)
    assert deleted.status == 204
    assert await deleted.read() == b""
    assert rewired == ["alpha", "alpha"]
    assert store.peers("alpha") is None
    await error_of(await client.get(PEERS, headers=AUTH), 404, "not_found")
    assert (await client.delete(PEERS, headers=AUTH)).status == 204  # forgetting twice is fine


async def test_peers_replace_the_list(client: TestClient[Any, Any], rewired: list[str]) -> None:
    await client.put(PEERS, json=PEER_LIST, headers=AUTH)
    response = await client.put(PEERS, json={"peers": [{"address": "10.250.0.13"}]}, headers=AUTH)
    assert await response.json() == {"peers": [{"address": "10.250.0.13", "macs": []}]}
    assert rewired == ["alpha", "alpha"]


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "words"),
    [
        (PEERS, b"{not json", 400, "malformed", "JSON"),
        (PEERS, b"[]", 400, "malformed", "object"),
        (PEERS, b"{}", 422, "invalid", "peers"),
        (PEERS, b'{"peers": [{"address": "10.0.0.300"}]}', 422, "invalid", "10.0.0.300"),
        (
            PEERS,
            b'{"peers": [{"address": "10.0.0.1", "macs": ["01:00:5e:00:00:01"]}]}',
            422,
            "invalid",
            "unicast MAC",
        ),
        (
            PEERS,
            b'{"peers": [{"address": "10.0.0.1"}, {"address": "10.0.0.1"}]}',
            422,
            "invalid",
            "twice",
        ),
        (
            PEERS,
            b'{"peers": [{"address": "10.0.0.1", "macs": ["52:54:00:00:00:01"]}, '
            b'{"address": "10.0.0.2", "macs": ["52:54:00:00:00:01"]}]}',
            422,
            "invalid",
            "one host",
        ),
        ("/v1/clusters/Alpha/peers", json.dumps(PEER_LIST).encode(), 422, "invalid", "cluster"),
    ],
)
async def test_bad_peers_change_nothing(
    client: TestClient[Any, Any],
    store: Store,
    rewired: list[str],
    path: str,
    body: bytes,
    status: int,
    code: str,
    words: str,
) -> None:
    assert (await client.put(PEERS, json=PEER_LIST, headers=AUTH)).status == 200
    before = store.all_peers()
    response = await client.put(path, data=body, headers=AUTH)
    assert words in await error_of(response, status, code)
    assert store.all_peers() == before
    assert rewired == ["alpha"]


async def test_peers_of_a_bad_cluster_name_is_422(client: TestClient[Any, Any]) -> None:
    for method in ("GET", "DELETE"):
        response = await client.request(method, "/v1/clusters/a_b/peers", headers=AUTH)
        await error_of(response, 422, "invalid")


# --- OpenAPI ----------------------------------------------------------------------------------


async def test_openapi_document(client: TestClient[Any, Any]) -> None:
    response = await client.get("/v1/openapi.json", headers=AUTH)
    assert response.status == 200
    document = await response.json()
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"]
    assert set(CONTRACT_PATHS) <= set(document["paths"])
    schemas = document["components"]["schemas"]
    assert {"NodeSpec", "Node"} <= set(schemas)
    assert set(SPEC) <= set(schemas["NodeSpec"]["properties"])
    node_ops = document["paths"]["/v1/clusters/{cluster}/nodes/{node}"]
    assert {"put", "get", "delete"} <= set(node_ops)
    assert {"200", "201", "400", "401", "409", "422", "507"} <= set(node_ops["put"]["responses"])
    assert "202" in node_ops["delete"]["responses"]
    assert "post" in document["paths"]["/v1/phone-home/{cluster}/{node}"]
    peers = document["paths"]["/v1/clusters/{cluster}/peers"]
    assert {"put", "get", "delete"} <= set(peers)
    assert {"200", "400", "401", "422"} <= set(peers["put"]["responses"])
    assert "204" in peers["delete"]["responses"]
    assert {"PeerList", "PeerEntry"} <= set(schemas)


async def test_openapi_references_resolve(client: TestClient[Any, Any]) -> None:
    document = await (await client.get("/v1/openapi.json", headers=AUTH)).json()
    schemas = document["components"]["schemas"]
    refs: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("$ref"), str):
                refs.append(value["$ref"])
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(document)
    assert refs
    for ref in refs:
        prefix, _, name = ref.rpartition("/")
        assert prefix == "#/components/schemas"
        assert name in schemas
