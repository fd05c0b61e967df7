"""The agent's and the zone's HTTP APIs fuzzed from their served OpenAPI documents.

schemathesis draws requests for every documented operation (valid ones and ones that break
the document: wrong types, missing fields, bad names, odd headers) and sends them over
HTTP on loopback to the real apps (the agent's NodeService and Store, the zone's
ZoneService, Store and local CA; nothing boots a VM or reaches libvirt), authenticated and
not. Each answer must: not be a 5xx (but a documented 507); match the served document
(status, content type, body); be in API.md's error shape when it is an error; refuse a
caller without the right token first (401/403, whatever else the request holds); and,
when it rejects the request, leave the state as it was (the stores and the zone's CA
files, compared before and after).

HOSTAGENT_FUZZ_EXAMPLES sets how many requests are drawn per operation for the right
caller (default 25; a quarter of it for refused callers); HOSTAGENT_FUZZ_RANDOM=1 draws
from a random seed instead of the fixed one (a failure shows its request as a curl
command). See docs/operations.md, "Fuzzing the API".
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import schemathesis
from aiohttp import ClientSession, web
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from hostagent import __version__
from hostagent.api import api_app
from hostagent.capacity import Resources
from hostagent.config import CapacityConfig, Config, ImagesConfig
from hostagent.imagepull import ImagePuller
from hostagent.images import ImageCatalog, ImageLayout
from hostagent.imageservice import ImageService
from hostagent.metrics import Metrics, ZoneMetrics
from hostagent.model import NodeKey
from hostagent.networks import StoredPeers, parse_peers
from hostagent.nodes import NodeService, parse_spec
from hostagent.openapi import (
    EXAMPLE_NAMES,
    NODE_SPEC_EXAMPLE,
    PEER_LIST_EXAMPLE,
    openapi_document,
)
from hostagent.store import Store
from hostagent.zone.api import zone_app
from hostagent.zone.auth import host_token
from hostagent.zone.config import ControlCaConfig, ZoneServerConfig
from hostagent.zone.controlplane import ControlPlane
from hostagent.zone.model import ClusterSpec, HostReport
from hostagent.zone.openapi import CLUSTER_SPEC_EXAMPLE, HOST_REPORT_EXAMPLE, zone_openapi
from hostagent.zone.openapi import EXAMPLE_NAMES as ZONE_EXAMPLE_NAMES
from hostagent.zone.service import ZoneService
from hostagent.zone.store import SqliteZoneStore
from pki.local import LocalBackend

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("HOSTAGENT_FUZZ_EXAMPLES", "25"))
RANDOM = os.environ.get("HOSTAGENT_FUZZ_RANDOM", "") not in ("", "0")
TIMEOUT_S = 30.0
TOKEN = "agent-fuzz-token"
ADMIN = "zone-fuzz-admin"
HOST_SECRET = "zone-fuzz-host-secret"
HOST, CLUSTER = ZONE_EXAMPLE_NAMES["host"], ZONE_EXAMPLE_NAMES["cluster"]
# Room for a few nodes of the example's size, overheads included.
PHYSICAL = Resources(vcpus=16, memory_mib=32768, disk_gib=500)
T = TypeVar("T")


# A request that fits the document must be taken, or refused for who sent it or for the
# state it meets; a body can also break rules no JSON schema states (an image this host
# lacks, an even number of masters, capacity: 422, 507) or be over the size limit (413).
ACCEPTED = ["2xx", "401", "403", "404", "409"]
REJECTED = ["400", "401", "403", "404", "405", "409", "413", "422"]
CONFIG = {
    "generation": {"deterministic": not RANDOM, "database": "none"},
    "checks": {
        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "507"]},
        "positive_data_acceptance": {"expected-statuses": ACCEPTED},
        "negative_data_rejection": {"expected-statuses": REJECTED},
    },
    "operations": [
        {
            "include-method": ["PUT", "POST"],
            "checks": {
                "positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "413", "422", "507"]}
            },
        },
        {
            # The zone relays the console from the node's agent, which the fuzzed zone's
            # host (an address of the documentation) never answers: 503, and it says so.
            "include-path": "/v1/clusters/{cluster}/nodes/{node}/console",
            "checks": {
                "not_a_server_error": {"expected-statuses": ["2xx", "4xx", "503"]},
                "positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "503"]},
            },
        },
    ],
}


def loaded(document: dict[str, Any], *, refused: bool) -> Any:
    """The document as schemathesis' schema. For callers who are refused, whatever they
    send, a quarter of the examples and no coverage phase (every boundary and every kind
    of wrong value of each field, a few hundred requests for a large body): the first
    thing that answers them is auth."""
    examples = max(1, EXAMPLES // 4) if refused else EXAMPLES
    generation = {**CONFIG["generation"], "max-examples": examples}
    phases = {"coverage": {"enabled": not refused}}
    config = SchemathesisConfig.from_dict({**CONFIG, "generation": generation, "phases": phases})
    return schemathesis.openapi.from_dict(document, config=config)


AGENT = loaded(openapi_document(__version__), refused=False)
AGENT_ANONYMOUS = loaded(openapi_document(__version__), refused=True)
ZONE = loaded(zone_openapi(__version__), refused=False)
ZONE_WRONG = loaded(zone_openapi(__version__), refused=True)


class Served:
    """An aiohttp app on 127.0.0.1 (a free port), served by an event loop in a thread of
    its own, so that schemathesis' blocking client can call it from the test's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="fuzz-server", daemon=True
        )
        self.thread.start()
        self.runner: web.AppRunner | None = None
        self.url = ""

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(TIMEOUT_S)

    def call(self, work: Callable[[], T]) -> T:
        """work() on the server's loop, between two requests."""

        async def on_loop() -> T:
            return work()

        return self.run(on_loop())

    def serve(self, make_app: Callable[[], Awaitable[web.Application]]) -> None:
        async def start() -> str:
            self.runner = web.AppRunner(await make_app(), access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            host, port = self.runner.addresses[0][:2]
            return f"http://{host}:{port}"

        self.url = self.run(start())

    def close(self, *after: Coroutine[Any, Any, None]) -> None:
        """Stop serving, then run `after` on the loop (closing what the app used), then
        stop the loop."""
        if self.runner is not None:
            self.run(self.runner.cleanup())
        for work in after:
            self.run(work)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT_S)
        self.loop.close()


@dataclass
class Target:
    served: Served
    state: Callable[[], Any]  # everything a rejected request must leave as it was
    # (case, who) -> our bearer token for the caller, if any, and the status the operation
    # must refuse it with (None: it may pass)
    credentials: Callable[[Any, str], tuple[str | None, int | None]]


def lab_image(images: Path) -> None:
    lab = images / "lab"
    lab.mkdir(parents=True)
    manifest = {"kernel": "vmlinuz", "initrd": "initrd.img", "disk": "disk.qcow2"}
    (lab / "image.json").write_text(json.dumps({**manifest, "cmdline": "x", "recipe": "r"}))
    for name in manifest.values():
        (lab / name).touch()


# --- the agent ----------------------------------------------------------------------------

KEY = NodeKey(cluster=EXAMPLE_NAMES["cluster"], name=EXAMPLE_NAMES["node"])


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Target]:
    lab_image(tmp_path / "images")
    config = Config(
        host_id="h1",
        state_dir=tmp_path,
        image_dir=tmp_path / "images",
        capacity=CapacityConfig(vcpu_ratio=2.0),
    )
    store = Store(tmp_path / "state.db")
    # One attempt per pull: the examples name images.example.com, which is not reached.
    layout = ImageLayout(config.pulled_images)
    puller = ImagePuller(
        store,
        layout,
        ImagesConfig(download_attempts=1, download_timeout_s=2),
        qemu_img_timeout_s=10,
    )
    catalog = ImageCatalog(config.images, puller)
    service = NodeService(config, store, catalog, PHYSICAL, lambda _: None)
    peers = StoredPeers(store, lambda _: None)
    metrics = Metrics(lambda: {}, lambda: 0, lambda: {}, lambda: {})

    async def host_info() -> dict[str, Any]:
        return {"host_id": config.host_id}

    async def healthy() -> bool:
        return True

    async def make_app() -> web.Application:
        # What the document's examples name: a node and its cluster's peer list, as there.
        await service.put(KEY, parse_spec(json.dumps(NODE_SPEC_EXAMPLE).encode()))
        await peers.put(
            KEY.cluster, parse_peers(KEY.cluster, json.dumps(PEER_LIST_EXAMPLE).encode())
        )
        return api_app(
            service,
            TOKEN,
            peers=peers,
            host_info=host_info,
            healthy=healthy,
            metrics_text=metrics.render,
            images=ImageService(store, catalog, puller),
        )

    def credentials(case: Any, who: str) -> tuple[str | None, int | None]:
        """The API token; for phone-home the example node's token, which opens no other
        node's phone-home, whatever the name."""
        if who == "anonymous":
            return None, None
        if not case.operation.path.startswith("/v1/phone-home/"):
            return TOKEN, None
        own = case.path_parameters == {"cluster": KEY.cluster, "node": KEY.name}
        return node_token, None if own else 401

    served = Served()
    try:
        served.serve(make_app)
        node_token = served.call(lambda: store.get(KEY)).token  # type: ignore[union-attr]
        yield Target(served, lambda: (store.all(), store.all_peers()), credentials)
    finally:
        served.close()
        store.close()


# --- the zone -----------------------------------------------------------------------------


@pytest.fixture
def zone(tmp_path: Path) -> Iterator[Target]:
    config = ZoneServerConfig(state_dir=tmp_path)
    store = SqliteZoneStore(tmp_path / "zone.db")
    pki_dir = tmp_path / "pki"
    service = ZoneService(store, config, LocalBackend(pki_dir))
    metrics = ZoneMetrics(lambda: {}, lambda: {}, lambda: 0, lambda: 0)

    async def make_app() -> web.Application:
        await store.start()
        # What the document's examples name: a registered host, and a cluster on it.
        await service.report(HOST, HostReport.model_validate(HOST_REPORT_EXAMPLE))
        await service.put_cluster(CLUSTER, ClusterSpec.model_validate(CLUSTER_SPEC_EXAMPLE))
        return zone_app(
            service,
            ADMIN,
            HOST_SECRET,
            metrics_text=metrics.render,
            heartbeat_s=5,
            control=ControlPlane(ControlCaConfig(), tmp_path),
            zone_view=dict,
        )

    host = host_token(HOST_SECRET, HOST)

    def credentials(case: Any, who: str) -> tuple[str | None, int | None]:
        """The host's own token for what agents call, the admin's for the rest; "other"
        swaps them (any valid token may read the document and the replicas)."""
        path, method = case.operation.path, case.operation.method.upper()
        for_hosts = "/pki/" in path or (path == "/v1/hosts/{host}" and method == "PUT")
        right, other = (host, ADMIN) if for_hosts else (ADMIN, host)
        if who == "right":
            return right, None
        if who == "other":
            readable = ("/v1/openapi.json", "/v1/zone", "/healthz", "/metrics")
            return other, None if path in readable else 403
        return None, None

    def state() -> Any:
        hosts = store.hosts()
        deliveries = {h.id: store.deliveries(h.id) for h in hosts}
        files = sorted(str(p.relative_to(pki_dir)) for p in pki_dir.rglob("*"))
        return hosts, store.clusters(), store.nodes(), store.gateways(), deliveries, files

    served = Served()
    try:
        served.serve(make_app)
        yield Target(served, state, credentials)
    finally:
        served.close(store.close())


# --- the checks ---------------------------------------------------------------------------


def check_error_shape(response: Any) -> None:
    """API.md: {"error": {"code": "<word>", "message": "<for a person>"}}, nothing else."""
    assert response.headers["content-type"][0].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    code, message = body["error"]["code"], body["error"]["message"]
    assert isinstance(code, str) and code and code.replace("_", "").isalnum(), body
    assert isinstance(message, str) and message, body


def fuzz(case: Any, target: Target, who: str) -> None:
    """One drawn request, sent as `who` ("right": the credentials the operation needs,
    "other": a valid token of the wrong kind, "anonymous": none but what schemathesis
    draws), and what its answer must be."""
    token, refusal = target.credentials(case, who)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    before = target.served.call(target.state)
    response = case.call_and_validate(
        base_url=target.served.url, headers=headers, timeout=TIMEOUT_S
    )
    # No 5xx but API.md's 507 (out of capacity), which the document says where it can come,
    # and the zone's console relay's 503: its host (a documentation address) never answers.
    relayed = case.operation.path.endswith("/console") and response.status_code == 503
    assert response.status_code < 500 or response.status_code == 507 or relayed, response.text
    if case.method.upper() == case.operation.method.upper():
        # Who may not call is told so first, and nothing more about the request: no token
        # or another (schemathesis draws some, and leaves ours out to try without) is 401.
        sent = response.request.headers.get("Authorization")
        if sent != headers.get("Authorization") and case.operation.path.startswith("/v1/"):
            refusal = 401
        if refusal is not None:
            assert response.status_code == refusal, (response.text, case.as_curl_command())
    if response.status_code >= 400:
        check_error_shape(response)
        assert target.served.call(target.state) == before, "a rejected request changed state"


@pytest.mark.parametrize(
    ("app", "schema", "token"), [("agent", AGENT, TOKEN), ("zone", ZONE, ADMIN)]
)
def test_the_fuzzed_documents_are_the_served_ones(
    request: pytest.FixtureRequest, app: str, schema: Any, token: str
) -> None:
    target: Target = request.getfixturevalue(app)

    async def served() -> Any:
        url = target.served.url + "/v1/openapi.json"
        headers = {"Authorization": f"Bearer {token}"}
        async with ClientSession() as session, session.get(url, headers=headers) as response:
            assert response.status == 200
            return await response.json()

    assert target.served.run(served()) == schema.raw_schema


# One server per test serves all its drawn requests: a function-scoped fixture on purpose.
SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


# Each test's id ends in who sends: [right], [other] or [anonymous].
@AGENT.parametrize()
@pytest.mark.parametrize("who", ["right"])
@SETTINGS
def test_agent_api(case: Any, agent: Target, who: str) -> None:
    fuzz(case, agent, who)


@AGENT_ANONYMOUS.parametrize()
@pytest.mark.parametrize("who", ["anonymous"])
@SETTINGS
def test_agent_api_refused(case: Any, agent: Target, who: str) -> None:
    fuzz(case, agent, who)


@ZONE.parametrize()
@pytest.mark.parametrize("who", ["right"])
@SETTINGS
def test_zone_api(case: Any, zone: Target, who: str) -> None:
    fuzz(case, zone, who)


@ZONE_WRONG.parametrize()
@pytest.mark.parametrize("who", ["other", "anonymous"])
@SETTINGS
def test_zone_api_refused(case: Any, zone: Target, who: str) -> None:
    fuzz(case, zone, who)
