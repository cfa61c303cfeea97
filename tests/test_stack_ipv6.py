"""IPv6 control plane through the Stack (ipv6.py): link-local and SLAAC addresses
with DAD (and a duplicate), MLDv2 reports, NS/NA, RS/RA, ICMPv6 echo, the RFC
4861 input checks, and fuzz. Every frame is checked by scapy (checksums
recomputed by scapy)."""
import random

import pytest
from hypothesis import given, settings, strategies as st_
from scapy.layers.inet6 import (ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6MLReport2, ICMPv6ND_NA, ICMPv6ND_NS,
                                ICMPv6ND_RA, ICMPv6ND_RS, ICMPv6NDOptMTU, ICMPv6NDOptPrefixInfo,
                                ICMPv6NDOptSrcLLAddr, ICMPv6NDOptDstLLAddr, IPv6, IPv6ExtHdrHopByHop)
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from appliance.stack.ipv6 import Ip6Config, solicited_node
from tests.stack_support import SERVER_MAC, make_stack, make_store

RMAC = "02:00:00:00:00:fe"
RLL = "fe80::1"
PFX = "2001:2:0:7::"
HOST = "2001:2:0:7::99"
HMAC = "02:00:00:00:00:99"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("ipv6"))


def v6stack(store, **cfg):
    st = make_stack(store)
    st.enable_ipv6(b"rfc7217-test-secret", Ip6Config(**cfg), random.Random(5))
    return st


def icmp6_checked(raw):
    p = Ether(raw)
    assert IPv6 in p
    q = Ether(raw)
    layer = q[IPv6].payload
    while isinstance(layer, IPv6ExtHdrHopByHop):
        layer = layer.payload
    if hasattr(layer, "cksum"):
        orig = layer.cksum
        del layer.cksum
        assert Ether(bytes(q)).getlayer(type(layer)).cksum == orig, f"bad ICMPv6 checksum: {p.summary()}"
    assert p[IPv6].plen == len(raw) - 54
    return p


def drain(st):
    out = [icmp6_checked(bytes(f[0])) for f in st.txq if bytes(f[0])[12:14] == b"\x86\xdd"]
    st.txq.clear()
    return out


def run_to(st, t, now=0.0):
    out = []
    while True:
        d = st.poll(now)
        out += drain(st)
        if d > t:
            break
        now = d
    return out


def link_local(st):
    return next(a for a, x in st.ip6.addrs.items() if x.how == "link-local")


def test_link_local_mld_join_dad_then_router_solicitation(store):
    st = v6stack(store)
    st.start(0.0)
    out = drain(st)
    (mld,) = out
    ll = link_local(st)
    g = solicited_node(ll)
    assert mld[IPv6].dst == "ff02::16" and mld[IPv6].hlim == 1 and mld[IPv6].src == "::"
    assert mld[IPv6ExtHdrHopByHop].options[0].otype == 5                # router alert
    rec = mld[ICMPv6MLReport2].records[0]
    assert rec.rtype == 4 and mld[ICMPv6MLReport2].records_number == 1
    import ipaddress
    assert ipaddress.IPv6Address(rec.dst).packed == g
    assert ll[:8] == bytes.fromhex("fe80000000000000") and st.ip6.addrs[ll].state == "tentative"
    out = run_to(st, 1.5)
    (ns,) = [p for p in out if ICMPv6ND_NS in p]
    assert ns[IPv6].src == "::" and ns[IPv6].hlim == 255 and ipaddress.IPv6Address(ns[IPv6].dst).packed == g
    assert ns[Ether].dst == "33:33:" + ":".join(f"{b:02x}" for b in g[12:])
    assert ipaddress.IPv6Address(ns[ICMPv6ND_NS].tgt).packed == ll and ICMPv6NDOptSrcLLAddr not in ns
    out = run_to(st, 3.0, 1.5)
    assert st.ip6.addrs[ll].state == "preferred"
    assert ("address6", {"event": "acquired", "ip6": str(ipaddress.IPv6Address(ll)), "prefix": 64,
                         "how": "link-local"}) in st.events
    rs = [p for p in out if ICMPv6ND_RS in p]
    assert rs and rs[0][IPv6].dst == "ff02::2" and rs[0][IPv6].src == str(ipaddress.IPv6Address(ll))
    assert rs[0][ICMPv6NDOptSrcLLAddr].lladdr == SERVER_MAC
    out = run_to(st, 20.0, 3.0)
    assert len([p for p in out if ICMPv6ND_RS in p]) == 2                # three in all, 4 s apart


def _ready(store, **cfg):
    st = v6stack(store, **cfg)
    st.start(0.0)
    run_to(st, 3.0)
    st.events.clear()
    return st


def _ra(prefix=PFX, plen=64, valid=3600, pref=1800, mtu=None, hlim=255, src=RLL, lifetime=1800, extra=()):
    p = (Ether(src=RMAC, dst="33:33:00:00:00:01") / IPv6(src=src, dst="ff02::1", hlim=hlim) /
         ICMPv6ND_RA(routerlifetime=lifetime) / ICMPv6NDOptSrcLLAddr(lladdr=RMAC) /
         ICMPv6NDOptPrefixInfo(prefix=prefix, prefixlen=plen, validlifetime=valid, preferredlifetime=pref))
    if mtu:
        p = p / ICMPv6NDOptMTU(mtu=mtu)
    for e in extra:
        p = p / e
    return bytes(p)


def test_router_advertisement_slaac_address_with_dad_router_and_mtu(store):
    import ipaddress
    st = _ready(store)
    st.receive(_ra(mtu=1400), 3.0)
    out = drain(st)
    ga = next(a for a, x in st.ip6.addrs.items() if x.how == "slaac")
    assert ga[:8] == ipaddress.IPv6Address(PFX).packed[:8] and st.ip6.addrs[ga].state == "tentative"
    assert [p[IPv6].dst for p in out] == ["ff02::16"]                   # joined its solicited-node group
    assert st.ip6.mtu == 1400 and ipaddress.IPv6Address(RLL).packed in st.ip6.routers
    run_to(st, 6.0, 3.0)
    assert st.ip6.addrs[ga].state == "preferred"
    assert [e[1]["how"] for e in st.events] == ["slaac"]
    # RFC 7217: the identifier differs per prefix and is stable for one secret + MAC
    st2 = _ready(store)
    st2.receive(_ra(), 3.0)
    assert next(a for a, x in st2.ip6.addrs.items() if x.how == "slaac") == ga
    assert ga[8:] != link_local(st)[8:]


def test_neighbour_solicitation_is_answered_and_echo_replied(store):
    import ipaddress
    st = _ready(store)
    ll = str(ipaddress.IPv6Address(link_local(st)))
    ns = Ether(src=HMAC, dst=SERVER_MAC) / IPv6(src="fe80::99", dst=ll, hlim=255) / ICMPv6ND_NS(tgt=ll) / \
        ICMPv6NDOptSrcLLAddr(lladdr=HMAC)
    st.receive(bytes(ns), 4.0)
    (na,) = drain(st)
    assert na[Ether].dst == HMAC and na[IPv6].dst == "fe80::99" and na[IPv6].src == ll and na[IPv6].hlim == 255
    assert na[ICMPv6ND_NA].tgt == ll and na[ICMPv6ND_NA].S == 1 and na[ICMPv6ND_NA].O == 1
    assert na[ICMPv6NDOptDstLLAddr].lladdr == SERVER_MAC
    ping = Ether(src=HMAC, dst=SERVER_MAC) / IPv6(src="fe80::99", dst=ll) / ICMPv6EchoRequest(id=7, seq=3,
                                                                                              data=b"x" * 100)
    st.receive(bytes(ping), 4.1)
    (rep,) = drain(st)
    assert rep[IPv6].src == ll and rep[IPv6].dst == "fe80::99" and rep[Ether].dst == HMAC
    assert (rep[ICMPv6EchoReply].id, rep[ICMPv6EchoReply].seq, rep[ICMPv6EchoReply].data) == (7, 3, b"x" * 100)
    # a solicitation to our solicited-node multicast group (MAC 33:33:ff:..) is taken too
    g = solicited_node(link_local(st))
    ns = Ether(src=HMAC, dst="33:33:" + ":".join(f"{b:02x}" for b in g[12:])) / \
        IPv6(src="fe80::99", dst=str(ipaddress.IPv6Address(g)), hlim=255) / ICMPv6ND_NS(tgt=ll) / \
        ICMPv6NDOptSrcLLAddr(lladdr=HMAC)
    st.receive(bytes(ns), 4.2)
    assert len(drain(st)) == 1 and st.counters["nd_na_sent"] == 2


def test_dad_duplicate_tries_the_next_identifier(store):
    import ipaddress
    st = v6stack(store)
    st.start(0.0)
    first = link_local(st)
    run_to(st, 1.2)                                                    # the DAD NS went out
    na = Ether(src=HMAC, dst="33:33:00:00:00:01") / IPv6(src=str(ipaddress.IPv6Address(first)), dst="ff02::1",
                                                          hlim=255) / \
        ICMPv6ND_NA(tgt=str(ipaddress.IPv6Address(first)), S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr=HMAC)
    st.receive(bytes(na), 1.3)
    assert first not in st.ip6.addrs and st.counters["ip6_dad_duplicates"] == 1
    second = link_local(st)
    assert second != first and st.ip6.addrs[second].dad_counter == 1
    assert [e[1]["event"] for e in st.events] == ["duplicate"]
    # another node's DAD probe for our tentative address is a duplicate too (RFC 4862 §5.4.3)
    g = solicited_node(second)
    probe = Ether(src=HMAC, dst="33:33:" + ":".join(f"{b:02x}" for b in g[12:])) / \
        IPv6(src="::", dst=str(ipaddress.IPv6Address(g)), hlim=255) / \
        ICMPv6ND_NS(tgt=str(ipaddress.IPv6Address(second)))
    st.receive(bytes(probe), 1.4)
    assert second not in st.ip6.addrs and st.counters["ip6_dad_duplicates"] == 2


@pytest.mark.parametrize("raw,reason", [
    (_ra(hlim=64), "drop_nd_bad_hop_limit"),
    (_ra(src="2001:2::1"), "drop_nd_ra_not_link_local"),
    # a zero-length option (RFC 4861 §4.6) after a valid prefix option
    (_ra(extra=[Raw(bytes([3, 0]) + bytes(6))]), "drop_nd_bad_option"),
], ids=["hop_limit", "not_link_local", "zero_length_option"])
def test_bad_router_advertisements_are_dropped(store, raw, reason):
    st = _ready(store)
    st.receive(raw, 4.0)
    assert st.counters[reason] == 1 and not st.ip6.routers
    assert not any(x.how == "slaac" for x in st.ip6.addrs.values())


def test_prefix_rules_and_flood_stays_bounded(store):
    st = _ready(store, max_addresses=4, max_routers=2)
    st.receive(_ra(plen=48), 4.0)
    st.receive(_ra(valid=100, pref=200), 4.0)
    assert st.counters["nd_prefix_not_64"] == 1 and st.counters["nd_prefix_bad_lifetimes"] == 1
    for i in range(50):
        st.receive(_ra(prefix=f"2001:2:0:{i:x}::", src=f"fe80::{i + 1:x}"), 4.0 + i * 0.01)
    assert len(st.ip6.addrs) <= 4 and len(st.ip6.routers) <= 2 and st.counters["drop_ip6_address_table_full"] > 0
    assert st.counters["drop_internal_error"] == 0


def test_valid_lifetime_expiry_drops_the_address(store):
    st = _ready(store)
    st.receive(_ra(valid=30, pref=20), 3.0)
    run_to(st, 10.0, 3.0)
    assert any(x.how == "slaac" for x in st.ip6.addrs.values())
    run_to(st, 40.0, 10.0)
    assert not any(x.how == "slaac" for x in st.ip6.addrs.values())
    assert [e[1]["event"] for e in st.events] == ["acquired", "lost"]


@given(st_.lists(st_.tuples(st_.integers(14, 150), st_.integers(0, 255)), min_size=1, max_size=8),
       st_.sampled_from(["ra", "ns", "echo", "na"]))
@settings(max_examples=150, deadline=None)
def test_fuzz_mutated_nd_and_icmp6_frames_never_raise(store, muts, kind):
    import ipaddress
    st = _ready(store)
    ll = str(ipaddress.IPv6Address(link_local(st)))
    base = {"ra": _ra(mtu=1400),
            "ns": bytes(Ether(src=HMAC, dst=SERVER_MAC) / IPv6(src="fe80::99", dst=ll, hlim=255) /
                        ICMPv6ND_NS(tgt=ll) / ICMPv6NDOptSrcLLAddr(lladdr=HMAC)),
            "na": bytes(Ether(src=HMAC, dst=SERVER_MAC) / IPv6(src="fe80::99", dst=ll, hlim=255) /
                        ICMPv6ND_NA(tgt="fe80::99") / ICMPv6NDOptDstLLAddr(lladdr=HMAC)),
            "echo": bytes(Ether(src=HMAC, dst=SERVER_MAC) / IPv6(src="fe80::99", dst=ll) / ICMPv6EchoRequest())}[kind]
    raw = bytearray(base)
    for i, v in muts:
        if i < len(raw):
            raw[i] = v
    st.receive(bytes(raw), 4.0)
    st.poll(5000.0)
    assert st.counters["drop_internal_error"] == 0, st.last_error
    assert len(st.ip6.addrs) <= 8 and len(st.ip6.neigh) <= 256


def test_unknown_next_header_gets_a_parameter_problem_rate_limited(store):
    """RFC 8200 §4 / RFC 4443 §3.4: an unknown next header (253, RFC 3692's
    experiment number) is answered with a Parameter Problem, code 1, pointing
    at the Next Header field; never for a multicast destination; rate-limited
    (RFC 4443 §2.4 f). TCP over IPv6 is served: tests/test_stack_tcp6.py; UDP
    (port 546 only): tests/test_stack_dhcp6.py."""
    import ipaddress
    from scapy.layers.inet6 import ICMPv6ParamProblem
    st = _ready(store)
    ll = str(ipaddress.IPv6Address(link_local(st)))
    udp = Ether(src=HMAC, dst=SERVER_MAC) / IPv6(src="fe80::99", dst=ll, nh=253) / Raw(b"x" * 8)
    st.receive(bytes(udp), 4.0)
    (pp,) = drain(st)
    assert pp[ICMPv6ParamProblem].code == 1 and pp[ICMPv6ParamProblem].ptr == 6 and pp[IPv6].dst == "fe80::99"
    st.receive(bytes(Ether(src=HMAC, dst="33:33:00:00:00:01") / IPv6(src="fe80::99", dst="ff02::1", nh=253) /
                     Raw(b"x" * 8)), 4.0)
    assert drain(st) == []                                                  # not for a multicast destination
    for i in range(15):                                                     # rate-limited (RFC 4443 §2.4 f)
        st.receive(bytes(udp), 5.0)
    assert len(drain(st)) == 10
