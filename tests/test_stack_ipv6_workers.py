"""IPv6 for several workers, in memory (ipv6.py's delegated mode; lease.py's filter):
the parent's host acquires link-local + SLAAC (DAD, MLD, RS, RA) and hands its
`delegation()` to a worker's host, which serves those addresses at once and
sends nothing of its own: no MLD report, no DAD probe, no RS, no DHCPv6; it
answers NS and echo and serves TCP byte-exact, and leaves RAs, MLD queries and
DHCPv6 replies to the parent. The parent answers no NS while workers run, but
still detects a duplicate of an address it is testing. Frames checked by scapy."""
import ipaddress
import random

from scapy.layers.inet import UDP
from scapy.layers.inet6 import (ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6MLQuery2, ICMPv6ND_NA, ICMPv6ND_NS,
                                ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr, IPv6, IPv6ExtHdrHopByHop,
                                RouterAlert)
from scapy.layers.l2 import Ether

from appliance.stack.ipv6 import Ip6Config, solicited_node
from tests.stack_support import SERVER_MAC, expected, make_stack
from tests.test_stack_ipv6 import PFX, RLL, _ra, drain, link_local, run_to
from tests.test_stack_tcp6 import Client6, store  # noqa: F401  (the store fixture, cut at 1440)

PEER, PEER_MAC = "2001:2:0:7::2", "02:00:00:00:00:22"
SECRET = b"rfc7217-test-secret"


def parent(store, **cfg):  # noqa: F811
    """The parent's host (as lease.ParentControl drives it): link-local, then SLAAC from an RA (MTU 1400)."""
    st = make_stack(store)
    st.enable_ipv6(SECRET, Ip6Config(**cfg), random.Random(5))
    st.start(0.0)
    run_to(st, 3.0)
    assert not st.ip6.settled()                             # no router heard yet
    st.receive(_ra(mtu=1400), 3.0)
    drain(st)
    assert not st.ip6.settled()                             # the SLAAC address is tentative
    run_to(st, 6.0, 3.0)
    assert st.ip6.settled()
    st.events.clear()
    return st


def worker(store, d):  # noqa: F811
    st = make_stack(store)
    st.enable_ipv6(SECRET, Ip6Config(), random.Random(9))
    st.ip6.set_delegated(d)
    st.start(100.0)
    return st


def _ga(st):
    return next(a for a, x in st.ip6.addrs.items() if x.how == "slaac")


def test_the_delegation_is_what_the_parent_acquired(store):  # noqa: F811
    p = parent(store)
    d = p.ip6.delegation()
    ll, ga = link_local(p), _ga(p)
    assert d.addrs == tuple(sorted([(ll, 64, "link-local"), (ga, 64, "slaac")]))
    assert d.mtu == 1400 and d.routers == ((ipaddress.IPv6Address(RLL).packed, bytes.fromhex("02000000" "00fe")),)
    # a new prefix changes the key (the workers are restarted); a repeated RA does not
    p.receive(_ra(), 6.0)
    assert p.ip6.delegation().key() == d.key()
    p.receive(_ra(prefix="2001:2:0:8::"), 6.1)
    run_to(p, 9.0, 6.1)
    assert p.ip6.delegation().key() != d.key() and len(p.ip6.delegation().addrs) == 3


def test_a_worker_serves_the_delegated_addresses_without_dad_mld_or_rs(store):  # noqa: F811
    p = parent(store)
    d = p.ip6.delegation()
    w = worker(store, d)
    ga = _ga(p)
    assert drain(w) == [] and w.events == []                 # no MLD report, no DAD NS, no RS
    assert {a for a, x in w.ip6.addrs.items() if x.state == "preferred"} == {x[0] for x in d.addrs}
    assert w.ip6.mtu == 1400
    assert run_to(w, 130.0, 100.0) == []                     # nor later
    # NS for the SLAAC address to its solicited-node group: the worker answers
    g = solicited_node(ga)
    gs = str(ipaddress.IPv6Address(g))
    gas = str(ipaddress.IPv6Address(ga))
    ns = Ether(src=PEER_MAC, dst="33:33:" + ":".join(f"{b:02x}" for b in g[12:])) / \
        IPv6(src=PEER, dst=gs, hlim=255) / ICMPv6ND_NS(tgt=gas) / ICMPv6NDOptSrcLLAddr(lladdr=PEER_MAC)
    w.receive(bytes(ns), 131.0)
    (na,) = drain(w)
    assert na[IPv6].src == gas and na[IPv6].dst == PEER and na[Ether].dst == PEER_MAC
    assert na[ICMPv6ND_NA].tgt == gas and na[ICMPv6ND_NA].S == 1 and na[ICMPv6NDOptDstLLAddr].lladdr == SERVER_MAC
    assert w.ip6.neigh[ipaddress.IPv6Address(PEER).packed][0] == bytes.fromhex(PEER_MAC.replace(":", ""))
    ping = Ether(src=PEER_MAC, dst=SERVER_MAC) / IPv6(src=PEER, dst=gas) / ICMPv6EchoRequest(id=1, seq=2, data=b"hi")
    w.receive(bytes(ping), 131.1)
    (rep,) = drain(w)
    assert rep[IPv6].src == gas and rep[ICMPv6EchoReply].data == b"hi"
    # TCP on the delegated address, byte-exact
    c = Client6(w, now=132.0)
    sa = c.connect()
    assert sa[IPv6].src == gas
    data, frames = c.get("/big.bin")
    assert data == expected(store, "/big.bin")


def test_a_worker_leaves_ras_mld_queries_and_dhcpv6_to_the_parent(store):  # noqa: F811
    p = parent(store)
    w = worker(store, p.ip6.delegation())
    before = dict(w.ip6.addrs)
    w.receive(_ra(prefix="2001:2:0:9::", mtu=1280), 101.0)
    assert drain(w) == [] and w.ip6.addrs == before and w.ip6.mtu == 1400
    assert w.counters["nd_ra_left_to_parent"] == 1
    ll = str(ipaddress.IPv6Address(link_local(p)))
    q = Ether(src="02:00:00:00:00:fe", dst="33:33:00:00:00:01") / \
        IPv6(src=RLL, dst="ff02::1", hlim=1) / IPv6ExtHdrHopByHop(options=[RouterAlert()]) / ICMPv6MLQuery2()
    w.receive(bytes(q), 101.1)
    assert drain(w) == [] and w.counters["mld_query_left_to_parent"] == 1
    # a DHCPv6 reply for the parent's client: no Port Unreachable from the worker
    r = Ether(src="02:00:00:00:00:fe", dst=SERVER_MAC) / IPv6(src=RLL, dst=ll) / UDP(sport=547, dport=546) / \
        bytes([7, 1, 2, 3])
    w.receive(bytes(r), 101.2)
    assert drain(w) == [] and w.counters["drop_udp6_dhcp6_left_to_parent"] == 1
    # the parent answers the query (it joined the groups)
    p.receive(bytes(q), 7.0)
    (rep,) = drain(p)
    assert rep[IPv6].dst == "ff02::16"


def test_a_serving_parent_answers_no_ns_but_still_detects_a_duplicate(store):  # noqa: F811
    p = parent(store)
    p.ip6.answer_ns = False
    ga = str(ipaddress.IPv6Address(_ga(p)))
    ns = Ether(src=PEER_MAC, dst=SERVER_MAC) / IPv6(src=PEER, dst=ga, hlim=255) / ICMPv6ND_NS(tgt=ga) / \
        ICMPv6NDOptSrcLLAddr(lladdr=PEER_MAC)
    p.receive(bytes(ns), 7.0)
    assert drain(p) == [] and p.counters["nd_ns_left_to_workers"] == 1
    # a new prefix: its SLAAC address is tentative, and another node's DAD probe for it is a duplicate
    p.receive(_ra(prefix="2001:2:0:8::"), 7.1)
    drain(p)
    new = next(a for a, x in p.ip6.addrs.items() if x.state == "tentative")
    g = solicited_node(new)
    dad = Ether(src=PEER_MAC, dst="33:33:" + ":".join(f"{b:02x}" for b in g[12:])) / \
        IPv6(src="::", dst=str(ipaddress.IPv6Address(g)), hlim=255) / ICMPv6ND_NS(tgt=str(ipaddress.IPv6Address(new)))
    p.receive(bytes(dad), 7.2)
    assert p.counters["ip6_dad_duplicates"] == 1 and new not in p.ip6.addrs


def test_the_parents_filter_passes_only_the_control_plane():
    """lease.CONTROL_BPF run over frames by a small classic-BPF interpreter (the
    instructions it uses): ARP, DHCP (UDP 68), MLD queries (bare and behind the
    router alert), RA/NS/NA, DHCPv6 (UDP 546) pass; TCP, echo, other UDP do not."""
    from scapy.layers.dhcp import BOOTP
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import ICMPv6ND_RA, ICMPv6ND_RS, ICMPv6MLReport2
    from scapy.layers.l2 import ARP
    from appliance.stack.lease import CONTROL_BPF

    def run(frame):
        a = x = pc = 0
        while True:
            code, jt, jf, k = CONTROL_BPF[pc]
            pc += 1
            if code == 0x28:
                a = int.from_bytes(frame[k:k + 2], "big")
            elif code == 0x30:
                a = frame[k]
            elif code == 0xB1:
                x = 4 * (frame[k] & 0xF)
            elif code == 0x48:
                a = int.from_bytes(frame[x + k:x + k + 2], "big")
            elif code == 0x15:
                pc += jt if a == k else jf
            elif code == 0x45:
                pc += jt if a & k else jf
            elif code == 0x06:
                return k != 0
            else:
                raise AssertionError(f"opcode {code:#x}")

    e = Ether(src=PEER_MAC, dst=SERVER_MAC)
    v6 = IPv6(src=RLL, dst="ff02::1", hlim=255)
    yes = [e / ARP(), e / IP() / UDP(sport=67, dport=68) / BOOTP(), e / v6 / ICMPv6ND_RA(),
           e / v6 / ICMPv6ND_NS(tgt=RLL), e / v6 / ICMPv6ND_NA(tgt=RLL), e / v6 / ICMPv6MLQuery2(),
           e / IPv6(src=RLL, dst="ff02::1", hlim=1) / IPv6ExtHdrHopByHop(options=[RouterAlert()]) / ICMPv6MLQuery2(),
           e / IPv6(src=RLL, dst=PFX + "5") / UDP(sport=547, dport=546)]
    no = [e / IP() / TCP(dport=80), e / IP(frag=3) / UDP(dport=68), e / IP() / UDP(dport=69),
          e / IPv6() / TCP(dport=80), e / IPv6() / ICMPv6EchoRequest(), e / v6 / ICMPv6ND_RS(),
          e / IPv6() / UDP(dport=547), e / IPv6(hlim=1) / IPv6ExtHdrHopByHop(options=[RouterAlert()]) /
          ICMPv6MLReport2()]
    assert [run(bytes(f)) for f in yes] == [True] * len(yes)
    assert [run(bytes(f)) for f in no] == [False] * len(no)
