"""The etcd store's key layout (pure) and its [store] configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent.errors import ConfigError
from hostagent.zone.config import load_zone_config
from hostagent.zone.etcdstore import EtcdZoneStore
from hostagent.zone.keys import Layout
from hostagent.zone.store import SqliteZoneStore
from hostagent.zone.stores import make_store


def test_every_key_reads_back_as_what_it_names() -> None:
    layout = Layout("/z")
    assert layout.prefix == "/z/"
    cases = {
        layout.host("h1"): ("hosts", "h1", "report"),
        layout.placed("h1"): ("hosts", "h1", "placed"),
        layout.cluster("demo"): ("clusters", "demo"),
        layout.node("demo", "w10"): ("nodes", "demo", "w10"),
        layout.gateway("demo", "h1"): ("gateways", "demo", "h1"),
        layout.delivery("h1", "node", "demo/m1"): ("deliveries", "h1", "node", "demo/m1"),
        layout.delivery("h1", "peers", "demo"): ("deliveries", "h1", "peers", "demo"),
        "/z/alloc/node-subnet/10.128.0.0/24": ("alloc", "node-subnet", "10.128.0.0/24"),
        layout.replica("zone-a-1f2e3d"): ("replicas", "zone-a-1f2e3d"),
        layout.leader: ("leader",),
    }
    for key, parts in cases.items():
        assert layout.parse(key) == parts, key
    for stranger in ("/other/clusters/demo", "/z/nodes/demo", "/z/unknown/x", "/z/clusters/a/b"):
        assert layout.parse(stranger) == (), stranger


def test_a_prefix_is_a_folder_of_its_own() -> None:
    # "demo" and "demo2" never share a key range: deleting one's nodes spares the other's.
    layout = Layout()
    assert not layout.node("demo2", "m1").startswith(layout.nodes_of("demo"))
    assert not layout.host("h10").startswith(layout.host_keys("h1"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "zone.toml"
    path.write_text(text)
    return path


def test_sqlite_is_the_default_and_etcd_is_chosen_by_backend(tmp_path: Path) -> None:
    config = load_zone_config(write(tmp_path, f'state_dir = "{tmp_path}"\n'))
    assert config.store.backend == "sqlite"
    assert isinstance(make_store(config), SqliteZoneStore)
    text = f'state_dir = "{tmp_path}"\n[store]\nbackend = "etcd"\nprefix = "/zones/a"\n'
    config = load_zone_config(write(tmp_path, text))
    store = make_store(config)
    assert isinstance(store, EtcdZoneStore)
    assert store.layout.prefix == "/zones/a/"
    assert store.etcd.endpoints == ["http://127.0.0.1:2379"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('endpoints = ["10.0.0.1:2379"]', "is not http(s)://host:port"),
        ('endpoints = ["http://10.0.0.1:2379"]', "plain http only to a loopback address"),
        ("endpoints = []", "at least one endpoint"),
        ('prefix = "zone"', "must start with /"),
        ('cert_file = "/etc/c.pem"', "cert_file and key_file go together"),
        ('backend = "postgres"', "store.backend"),
        ("request_timeout_s = 0", "store.request_timeout_s"),
    ],
)
def test_bad_store_settings_are_refused(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match="invalid zone configuration") as error:
        load_zone_config(write(tmp_path, f"[store]\n{text}\n"))
    assert words in str(error.value)
