"""The route table (route.py) and the Stack's next-hop resolution over it."""
import pytest
from scapy.layers.l2 import ARP, Ether

from appliance.stack.iface import Stack, StackConfig
from appliance.stack.rings.base import Offload
from appliance.stack.route import RouteTable, TableFull
from appliance.stack.wire import ip_bytes as ipb
from tests.stack_support import SERVER_MAC, make_store


def test_longest_prefix_wins_and_on_link_is_the_destination_itself():
    t = RouteTable()
    t.add(ipb("198.18.0.0"), 24, None, "connected")
    t.add(ipb("0.0.0.0"), 0, ipb("198.18.0.254"), "dhcp")
    t.add(ipb("198.19.5.0"), 24, ipb("198.18.0.253"), "dhcp")
    assert t.lookup(ipb("198.18.0.7")) == ipb("198.18.0.7")
    assert t.lookup(ipb("198.19.5.9")) == ipb("198.18.0.253")
    assert t.lookup(ipb("203.0.113.1")) == ipb("198.18.0.254")
    assert t.gateways() == [ipb("198.18.0.253"), ipb("198.18.0.254")]
    assert t.default() == ipb("198.18.0.254") and t.on_link(ipb("198.18.0.9"))
    t.remove("dhcp")
    assert t.lookup(ipb("203.0.113.1")) is None and len(t) == 1


def test_off_link_gateway_gets_an_on_link_host_route():
    # a /32 address with the router outside it (as some clouds hand out)
    t = RouteTable()
    t.add(ipb("10.0.0.5"), 32, None, "connected")
    t.add(ipb("0.0.0.0"), 0, ipb("10.0.0.1"), "dhcp")
    assert t.on_link(ipb("10.0.0.1")) and t.lookup(ipb("8.8.8.8")) == ipb("10.0.0.1")
    t.remove("dhcp")
    assert not t.on_link(ipb("10.0.0.1"))


def test_router_zero_means_on_link_and_a_route_replaces_its_twin():
    t = RouteTable()
    t.add(ipb("198.18.7.0"), 24, ipb("0.0.0.0"), "dhcp")
    assert t.on_link(ipb("198.18.7.1"))
    t.add(ipb("198.18.7.0"), 24, ipb("198.18.7.1"), "static")
    assert len(t) == 1 and not t.on_link(ipb("198.18.7.3"))


def test_the_table_is_bounded():
    t = RouteTable(size=4)
    for i in range(4):
        t.add(bytes([198, 18, i, 0]), 24, None, "dhcp")
    with pytest.raises(TableFull):
        t.add(ipb("198.18.9.0"), 24, None, "dhcp")
    assert len(t) == 4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("route"))


def test_stack_resolves_every_gateway_in_use(store):
    st = Stack(store, bytes.fromhex("020000000001"), "198.18.0.1", 24, "198.18.0.254", Offload(), StackConfig(),
               secret=b"s" * 32)
    st.routes.add(ipb("198.19.0.0"), 16, ipb("198.18.0.253"), "static")
    st.start(0.0)
    st.txq.clear()
    st.poll(1.0)
    asked = sorted(Ether(bytes(f[0]))[ARP].pdst for f in st.txq)
    assert asked == ["198.18.0.253", "198.18.0.254"]
    st.txq.clear()
    st.receive(bytes(Ether(src="02:00:00:00:00:fd", dst=SERVER_MAC) /
                     ARP(op=2, hwsrc="02:00:00:00:00:fd", psrc="198.18.0.253", pdst="198.18.0.1",
                         hwdst=SERVER_MAC)), 1.1)
    st.poll(2.5)
    assert [Ether(bytes(f[0]))[ARP].pdst for f in st.txq] == ["198.18.0.254"]
    assert st.arp.lookup(ipb("198.18.0.253"), 2.5) == bytes.fromhex("0200000000fd")
