"""Static IPv6 configuration (`--ip6 ADDR/PREFIX --gateway6 GW`, ipv6.py
set_static): the words are checked (bad ones name what is wrong, exit 2), and
in memory with a fake clock the static address is tentative until DAD passes
(its solicited-node group joined by MLDv2 first), a duplicate is reported and
never used, the gateway is resolved by NS, NS for the address is answered,
TCP serves on it byte-exact, and router advertisements add no SLAAC address
and start no DHCPv6. Every frame is checked by scapy."""
import ipaddress

import pytest
from click.testing import CliRunner
from scapy.layers.inet import TCP
from scapy.layers.inet6 import (ICMPv6MLReport2, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RA, ICMPv6NDOptDstLLAddr,
                                ICMPv6NDOptPrefixInfo, ICMPv6NDOptSrcLLAddr, IPv6)
from scapy.layers.l2 import Ether

from appliance.stack.ipv6 import Static6, ip6_mode, parse_static6, solicited_node
from tests.stack_support import SERVER_MAC, Client, expected
from tests.test_stack_ipv6 import RLL, RMAC, drain, link_local, run_to, v6stack
from tests.test_stack_tcp6 import Client6, store  # noqa: F401  (the store fixture, cut at 1440)

ADDR = "2001:2:0:7::10"
GW = "fe80::1"


def _mac(g: bytes) -> str:
    return "33:33:" + ":".join(f"{b:02x}" for b in g[12:])


# ------------------------------------------------------------------ the words


def test_static_forms_parse():
    s = ip6_mode("2001:2:0:7::10/64", "fe80::1")
    assert s == Static6(ipaddress.IPv6Address(ADDR).packed, 64, ipaddress.IPv6Address(GW).packed)
    assert str(s) == "2001:2:0:7::10/64"
    assert parse_static6("2001:2:0:7::10/64", "2001:2:0:7::1").gateway == ipaddress.IPv6Address("2001:2:0:7::1").packed
    assert parse_static6("2001:2::5/128").gateway is None
    assert ip6_mode("auto") == "auto" and ip6_mode("off") == "off"


@pytest.mark.parametrize("value,gateway,message", [
    ("2001:2:0:7::10", None, "--ip6 '2001:2:0:7::10' needs a prefix length, like 2001:2:0:7::10/64"),
    ("on", None, "--ip6 'on' is neither off, auto nor an IPv6 ADDR/PREFIX"),
    ("2001:2:0:7::zz/64", None, "'2001:2:0:7::zz' is not an IPv6 address"),
    ("198.18.0.1/24", None, "'198.18.0.1' is not an IPv6 address"),
    ("2001:2:0:7::10/129", None, "the prefix length '129' is out of range (1..128)"),
    ("2001:2:0:7::10/0", None, "the prefix length '0' is out of range"),
    ("2001:2:0:7::10/x", None, "the prefix length 'x' is out of range"),
    ("ff02::10/64", None, "ff02::10 is a multicast address"),
    ("fe80::10/64", None, "fe80::10 is link-local"),
    ("::/64", None, "is the unspecified address"),
    ("::1/128", None, "is the loopback address"),
    ("2001:2:0:7::/64", None, "subnet-router anycast address of 2001:2:0:7::/64"),
    ("2001:2:0:7::10/64", "2001:2:0:8::1", "--gateway6 '2001:2:0:8::1' is neither link-local (fe80::/10) "
                                           "nor on-link in 2001:2:0:7::/64"),
    ("2001:2:0:7::10/64", "ff02::2", "--gateway6 'ff02::2' is not a router's unicast address"),
    ("2001:2:0:7::10/64", "2001:2:0:7::10", "is our own address"),
    ("2001:2:0:7::10/64", "router", "--gateway6 'router' is not an IPv6 address"),
    ("auto", "fe80::1", "--gateway6 needs a static --ip6 ADDR/PREFIX"),
    ("off", "fe80::1", "--gateway6 needs a static --ip6 ADDR/PREFIX"),
])
def test_bad_static_forms_name_what_is_wrong(value, gateway, message):
    with pytest.raises(ValueError) as e:
        ip6_mode(value, gateway)
    assert message in str(e.value)
    # and `serve` says the same on stderr, exit 2, before touching any interface
    from appliance.stack.cli import serve_cmd
    args = ["--store", "/nonexistent.store", "--iface", "hbnosuch0", "--ip", "198.18.0.1/24", "--ip6", value]
    r = CliRunner().invoke(serve_cmd, args + (["--gateway6", gateway] if gateway else []))
    assert r.exit_code == 2 and message in r.stderr and "HABOOB-READY" not in r.stdout


# ------------------------------------------------------------------ in memory


class StaticClient(Client6):
    """Client6 frames to the static address (Client6 looks for a SLAAC one)."""

    def __init__(self, stack):
        Client.__init__(self, stack, port=40000, ip="2001:2:0:7::2", mac="02:00:00:00:00:22", now=1000.0, mss=1440)
        self.server = ADDR


def static_stack(store, gateway=GW):  # noqa: F811
    st = v6stack(store)
    st.ip6.set_static(parse_static6(ADDR + "/64", gateway))
    st.start(0.0)
    return st


def test_static_address_joins_its_group_passes_dad_and_resolves_the_gateway(store):  # noqa: F811
    st = static_stack(store)
    a = ipaddress.IPv6Address(ADDR).packed
    g = solicited_node(a)
    out = drain(st)
    groups = {str(r.dst) for p in out if ICMPv6MLReport2 in p for r in p[ICMPv6MLReport2].records}
    assert str(ipaddress.IPv6Address(g)) in groups and len(groups) == 2     # the link-local's and ours
    assert st.ip6.addrs[a].state == "tentative" and st.ip6.addrs[a].prefix == 64
    out = run_to(st, 1.5)
    dad = [p for p in out if ICMPv6ND_NS in p and p[ICMPv6ND_NS].tgt == ADDR]
    assert len(dad) == 1 and dad[0][IPv6].src == "::" and dad[0][IPv6].dst == str(ipaddress.IPv6Address(g))
    assert dad[0][Ether].dst == _mac(g) and ICMPv6NDOptSrcLLAddr not in dad[0]
    out = run_to(st, 3.0, 1.5)
    assert st.ip6.addrs[a].state == "preferred"
    ev = [e for k, e in st.events if e.get("how") == "static"]
    assert ev == [{"event": "acquired", "ip6": ADDR, "prefix": 64, "how": "static", "gateway": GW}]
    # the gateway: an NS from our link-local address to its solicited-node group
    ll = str(ipaddress.IPv6Address(link_local(st)))
    gns = [p for p in out if ICMPv6ND_NS in p and p[ICMPv6ND_NS].tgt == GW]
    assert gns and gns[0][IPv6].src == ll and gns[0][IPv6].hlim == 255
    assert gns[0][IPv6].dst == "ff02::1:ff00:1" and gns[0][ICMPv6NDOptSrcLLAddr].lladdr == SERVER_MAC
    na = Ether(src=RMAC, dst=SERVER_MAC) / IPv6(src=GW, dst=ll, hlim=255) / ICMPv6ND_NA(tgt=GW, S=1, O=1) / \
        ICMPv6NDOptDstLLAddr(lladdr=RMAC)
    st.receive(bytes(na), 3.1)
    gwb = ipaddress.IPv6Address(GW).packed
    assert st.ip6.neigh[gwb][0] == bytes.fromhex(RMAC.replace(":", "")) and gwb in st.ip6.routers
    sent = st.counters["nd_gateway_ns_sent"]
    assert 1 <= sent <= 3 and not [p for p in run_to(st, 30.0, 3.1) if ICMPv6ND_NS in p]
    assert st.counters["nd_gateway_ns_sent"] == sent                       # resolved: no more


def test_unanswered_gateway_gets_three_solicitations_then_none(store):  # noqa: F811
    st = static_stack(store)
    out = run_to(st, 60.0)
    assert len([p for p in out if ICMPv6ND_NS in p and p[ICMPv6ND_NS].tgt == GW]) == 3
    assert ipaddress.IPv6Address(GW).packed in st.ip6.routers             # still the default router


def test_static_address_answers_ns_and_serves_tcp(store):  # noqa: F811
    st = static_stack(store, gateway=None)
    run_to(st, 3.0)
    ns = Ether(src="02:00:00:00:00:22", dst=_mac(solicited_node(ipaddress.IPv6Address(ADDR).packed))) / \
        IPv6(src="2001:2:0:7::2", dst="ff02::1:ff00:10", hlim=255) / ICMPv6ND_NS(tgt=ADDR) / \
        ICMPv6NDOptSrcLLAddr(lladdr="02:00:00:00:00:22")
    st.receive(bytes(ns), 3.2)
    (na,) = drain(st)
    assert na[IPv6].src == ADDR and na[IPv6].dst == "2001:2:0:7::2" and na[Ether].dst == "02:00:00:00:00:22"
    assert na[ICMPv6ND_NA].tgt == ADDR and na[ICMPv6ND_NA].S == 1 and na[ICMPv6NDOptDstLLAddr].lladdr == SERVER_MAC
    c = StaticClient(st)
    sa = c.connect()
    assert sa[IPv6].src == ADDR and dict(sa[TCP].options)["MSS"] == 1440
    for path in ("/", "/big.bin"):
        data, frames = c.get(path)
        assert data == expected(store, path)
        assert all(p[IPv6].src == ADDR for p in frames if TCP in p)


def test_router_advertisements_add_no_slaac_address_and_no_dhcpv6(store):  # noqa: F811
    st = static_stack(store)
    run_to(st, 3.0)
    ra = Ether(src=RMAC, dst="33:33:00:00:00:01") / IPv6(src=RLL, dst="ff02::1", hlim=255) / \
        ICMPv6ND_RA(routerlifetime=0, M=1) / ICMPv6NDOptSrcLLAddr(lladdr=RMAC) / \
        ICMPv6NDOptPrefixInfo(prefix="2001:2:0:9::", prefixlen=64, validlifetime=3600, preferredlifetime=1800)
    st.receive(bytes(ra), 3.5)
    run_to(st, 10.0, 3.5)
    assert {x.how for x in st.ip6.addrs.values()} == {"link-local", "static"}
    assert st.counters["nd_prefix_ignored_static"] == 1 and st.counters["nd_ra_managed_ignored_static"] == 1
    assert st.ip6.dhcp6 is None
    # router lifetime 0 from the gateway itself (RLL == GW): it stays the default router
    assert ipaddress.IPv6Address(GW).packed in st.ip6.routers


def test_duplicate_static_address_is_reported_and_never_used(store):  # noqa: F811
    st = static_stack(store)
    run_to(st, 1.2)
    a = ipaddress.IPv6Address(ADDR).packed
    assert st.ip6.addrs[a].sent                                          # the DAD NS went out
    na = Ether(src="02:00:00:00:00:33", dst="33:33:00:00:00:01") / IPv6(src=ADDR, dst="ff02::1", hlim=255) / \
        ICMPv6ND_NA(tgt=ADDR, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr="02:00:00:00:00:33")
    st.receive(bytes(na), 1.3)
    assert a not in st.ip6.addrs
    assert st.counters["ip6_dad_duplicates"] == 1 and st.counters["ip6_static_duplicate"] == 1
    assert ("address6", {"event": "duplicate", "ip6": ADDR, "prefix": 64, "how": "static"}) in st.events
    run_to(st, 20.0, 1.3)
    assert {x.how for x in st.ip6.addrs.values()} == {"link-local"}      # no other identifier is tried
    assert all(x.state == "preferred" for x in st.ip6.addrs.values())
    # a SYN to it is not served (and an NS for it gets no answer)
    ns = Ether(src="02:00:00:00:00:22", dst=SERVER_MAC) / IPv6(src="2001:2:0:7::2", dst=ADDR, hlim=255) / \
        ICMPv6ND_NS(tgt=ADDR) / ICMPv6NDOptSrcLLAddr(lladdr="02:00:00:00:00:22")
    st.receive(bytes(ns), 21.0)
    assert not drain(st)
