"""network.batch: the bytes of each request, read back with pyroute2's own decoders."""

from __future__ import annotations

import socket
import struct

from pyroute2 import IPBatch
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg

from network.batch import AddressChange, FdbRequest, ForwardingOff, LinkChange, encode


def decode(data: bytes) -> ndmsg:
    msg = ndmsg(data)
    msg.decode()
    return msg


def test_fdb_append_is_what_bridge_fdb_append_sends() -> None:
    data = encode(FdbRequest(True, 7, "52:54:00:ab:cd:ef", "192.0.2.2"), seq=5)
    msg = decode(data)
    assert msg["header"]["length"] == len(data) == 48
    assert msg["header"]["type"] == 28  # RTM_NEWNEIGH
    assert msg["header"]["flags"] == 0x1 | 0x4 | 0x400 | 0x800  # request ack create append
    assert msg["header"]["sequence_number"] == 5
    assert (msg["family"], msg["ifindex"]) == (socket.AF_BRIDGE, 7)
    assert (msg["state"], msg["flags"]) == (0x80 | 0x40, 0x02)  # permanent|noarp, self
    assert (msg.get("lladdr"), msg.get("dst")) == ("52:54:00:ab:cd:ef", "192.0.2.2")


def test_fdb_delete() -> None:
    msg = decode(encode(FdbRequest(False, 7, "00:00:00:00:00:00", "192.0.2.3"), seq=1))
    assert (msg["header"]["type"], msg["header"]["flags"]) == (29, 0x1 | 0x4)  # RTM_DELNEIGH
    assert (msg.get("lladdr"), msg.get("dst")) == ("00:00:00:00:00:00", "192.0.2.3")


def test_forwarding_off_is_a_setlink_with_ipv4_devconf() -> None:
    data = encode(ForwardingOff(9), seq=3)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data)
    assert (length, kind, flags, seq) == (len(data), 19, 0x1 | 0x4, 3)  # RTM_SETLINK
    assert struct.unpack_from("=BBHiII", data, 16) == (socket.AF_UNSPEC, 0, 0, 9, 0, 0)
    # IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { IPV4_DEVCONF_FORWARDING: u32 0 } } }
    nested = 0x8000
    assert len(data) == 16 + 16 + 20
    assert struct.unpack_from("=HHHHHHHHI", data, 32) == (
        20,
        26 | nested,
        16,
        socket.AF_INET | nested,
        12,
        1 | nested,
        8,
        1,
        0,
    )


def test_address_add_is_what_pyroute2_sends() -> None:
    ours = ifaddrmsg(encode(AddressChange(True, 5, "10.42.0.1", 24), seq=1))
    ours.decode()
    with IPBatch() as compiler:
        compiler.addr("add", index=5, address="10.42.0.1", prefixlen=24)
        theirs = ifaddrmsg(bytes(compiler.batch))
    theirs.decode()
    for msg in (ours, theirs):
        msg["header"].pop("sequence_number")
        msg["header"].pop("pid")
    assert ours["header"] == theirs["header"]
    fields = ("family", "prefixlen", "flags", "scope", "index")
    assert [ours[f] for f in fields] == [theirs[f] for f in fields]
    assert [(name, str(value)) for name, value in ours["attrs"]] == [
        (name, str(value)) for name, value in theirs["attrs"]
    ]


def test_address_delete_and_link_change() -> None:
    msg = ifaddrmsg(encode(AddressChange(False, 5, "10.42.0.1", 24), seq=1))
    msg.decode()
    assert (msg["header"]["type"], msg["header"]["flags"]) == (21, 0x1 | 0x4)  # RTM_DELADDR
    link = ifinfmsg(encode(LinkChange(6, up=True, mtu=1450, master=3), seq=2))
    link.decode()
    assert (link["header"]["type"], link["index"]) == (19, 6)  # RTM_SETLINK
    assert (link["flags"] & 1, link["change"] & 1) == (1, 1)  # IFF_UP
    assert (link.get("mtu"), link.get("master")) == (1450, 3)
