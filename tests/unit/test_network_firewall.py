"""network.firewall: the agent's nftables table as data, and its plan. No nft, no kernel."""

from __future__ import annotations

import pytest

from network.firewall import (
    BridgeGuard,
    DeleteTable,
    ReplaceTable,
    TableWanted,
    plan_table,
    same_listing,
    table_name,
    table_wanted,
)
from network.model import ClusterNetworkWanted, NetworkError
from network.nftables import NfTables

PORT = 8472  # the phone-home port (config.phone_home.port's default)
ALPHA = ClusterNetworkWanted("alpha", 100, "10.100.0.1/24")
BETA = ClusterNetworkWanted("beta", 200, "10.200.0.1/24")
GAMMA = ClusterNetworkWanted("gamma", 30, "10.30.7.254/16")


def wanted(*clusters: ClusterNetworkWanted, host: str = "h1") -> TableWanted:
    table = table_wanted(clusters, host=host, tcp_ports=[PORT])
    assert table is not None
    return table


def chain(definition: str, name: str) -> list[str]:
    """The rule lines of one chain of a definition."""
    lines = [line.strip() for line in definition.splitlines()]
    start = lines.index(f"chain {name} {{") + 1
    return lines[start : lines.index("}", start)]


def test_no_cluster_no_table() -> None:
    assert table_wanted([], host="h1", tcp_ports=[PORT]) is None
    with pytest.raises(ValueError, match="host id"):
        table_wanted([], host="h 1", tcp_ports=[PORT])


def test_one_cluster_reaches_its_gateway_and_nothing_else() -> None:
    definition = wanted(ALPHA).definition()
    assert definition.splitlines()[:2] == [
        "table inet hostagent_h1 {",
        '\tcomment "hostagent host=h1"',
    ]
    assert chain(definition, "input") == [
        "type filter hook input priority filter; policy accept;",
        'iifname "habr*" jump bridge_input',
    ]
    assert chain(definition, "forward") == [
        "type filter hook forward priority filter; policy accept;",
        'iifname "habr*" jump bridge_forward',
        'oifname "habr*" jump bridge_forward',
    ]
    assert chain(definition, "bridge_input") == [
        'iifname "habr100" ip daddr 10.100.0.1 tcp dport 8472 accept',
        'iifname "habr100" ip daddr 10.100.0.1 icmp type echo-request accept',
        'iifname "habr100" ip daddr 10.100.0.1 ct state established,related accept',
        'iifname "habr100" drop',
    ]
    assert chain(definition, "bridge_forward") == [
        'iifname "habr100" oifname != "habr100" drop',
        'oifname "habr100" iifname != "habr100" drop',
    ]


def test_three_clusters_in_vni_order_each_with_its_own_gateway() -> None:
    table = wanted(BETA, ALPHA, GAMMA)
    assert table.bridges == (
        BridgeGuard("habr30", "10.30.7.254"),
        BridgeGuard("habr100", "10.100.0.1"),
        BridgeGuard("habr200", "10.200.0.1"),
    )
    rules = chain(table.definition(), "bridge_input")
    assert len(rules) == 3 * 4
    assert rules[3::4] == [
        'iifname "habr30" drop',
        'iifname "habr100" drop',
        'iifname "habr200" drop',
    ]
    accepted = [rule for rule in rules if rule.endswith("accept")]
    for guard in table.bridges:  # a bridge accepts to its own gateway only
        own = [rule for rule in accepted if f'"{guard.bridge}"' in rule]
        assert len(own) == 3
        assert all(f"ip daddr {guard.gateway} " in rule for rule in own)
    assert len(chain(table.definition(), "bridge_forward")) == 3 * 2
    assert wanted(ALPHA, BETA, GAMMA) == table  # the order given does not matter


def test_ports_sorted_once_each_and_checked() -> None:
    table = table_wanted([ALPHA], host="h1", tcp_ports=[9000, PORT, 9000])
    assert table is not None and table.tcp_ports == (PORT, 9000)
    assert chain(table.definition(), "bridge_input")[:2] == [
        'iifname "habr100" ip daddr 10.100.0.1 tcp dport 8472 accept',
        'iifname "habr100" ip daddr 10.100.0.1 tcp dport 9000 accept',
    ]
    with pytest.raises(ValueError, match="TCP port 0"):
        table_wanted([ALPHA], host="h1", tcp_ports=[0])


def test_two_host_ids_own_two_tables() -> None:
    assert table_name("h1") == "hostagent_h1"
    assert table_name("lab-2.example") == "hostagent_lab-2.example"
    assert table_name("h1") != table_name("H1") != table_name("h1.")
    one, other = wanted(ALPHA, host="h1"), wanted(BETA, host="lab-2.example")
    assert other.definition().startswith("table inet hostagent_lab-2.example {")
    assert '"hostagent host=lab-2.example"' in other.definition()
    assert "habr100" not in other.definition() and "habr200" not in one.definition()
    # Deleting names this host's table only.
    assert plan_table("h1", None, one.definition()) == [DeleteTable("hostagent_h1")]
    assert DeleteTable("hostagent_h1").script() == "delete table inet hostagent_h1\n"
    with pytest.raises(ValueError, match="host id"):
        table_name("h1; flush ruleset")


def test_replacing_is_one_transaction_from_any_state() -> None:
    table = wanted(ALPHA)
    script = ReplaceTable(table).script()
    head = "table inet hostagent_h1\ndelete table inet hostagent_h1\n"
    assert script == head + table.definition()
    assert str(ReplaceTable(wanted(ALPHA, BETA))) == (
        "replace nftables table inet hostagent_h1 (habr100, habr200)"
    )


def test_plan_compares_listings() -> None:
    table = wanted(ALPHA, BETA)
    assert plan_table("h1", table, None) == [ReplaceTable(table)]
    assert plan_table("h1", table, table.definition()) == []
    # nft's own indentation and blank lines do not count...
    relisted = table.definition().replace("\t", "    ").replace("\n", "\n\n")
    assert same_listing(relisted, table.definition())
    assert plan_table("h1", table, relisted) == []
    # ...a rule changed or gone by hand does, as does a cluster leaving.
    drifted = table.definition().replace('\t\tiifname "habr200" drop\n', "")
    assert plan_table("h1", table, drifted) == [ReplaceTable(table)]
    assert plan_table("h1", wanted(ALPHA), table.definition()) == [ReplaceTable(wanted(ALPHA))]
    assert plan_table("h1", None, None) == []


def test_without_nft_the_error_says_what_to_install() -> None:
    # shutil.which fails before any process runs: nothing is touched.
    with pytest.raises(NetworkError, match="'hostagent-no-nft' not found: install nftables"):
        NfTables(nft="hostagent-no-nft").reconcile([ALPHA], host="h1", tcp_ports=[PORT])
