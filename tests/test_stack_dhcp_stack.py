"""DHCPv4 through the Stack: frames on the wire (checked by scapy's Ether/IP/UDP/
BOOTP/DHCP layers), the address acquired, changed and lost, routes, MTU -> MSS,
the RFC 5227 probe, and fuzzed DHCP frames into the stack."""
import random

import pytest
from hypothesis import given, settings, strategies as st_
from scapy.layers.dhcp import BOOTP
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from appliance.stack.dhcp4 import DhcpConfig
from appliance.stack.iface import Stack, StackConfig
from appliance.stack.rings.base import Offload
from appliance.stack.wire import ip_bytes
from tests.dhcp_support import Server, msg_type, opts
from tests.stack_support import SECRET, SERVER_IP, SERVER_MAC, Client, check_frame, make_store, NOW_UNIX

BC = "ff:ff:ff:ff:ff:ff"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("dhcpstack"))


def dstack(store, probe=True, mtu=1500):
    st = Stack(store, bytes.fromhex(SERVER_MAC.replace(":", "")), None, 0, None, Offload(), StackConfig(mtu=mtu),
               secret=SECRET)
    st.set_date(NOW_UNIX)
    st.enable_dhcp(DhcpConfig(hostname="www", probe=probe), random.Random(3))
    return st


def wire(st):
    out = [check_frame(bytes(f[0])) for f in st.txq]
    st.txq.clear()
    for p in out:
        if UDP in p:                           # scapy recomputes the UDP checksum too
            q = p.copy()
            del q[UDP].chksum
            assert Ether(bytes(q))[UDP].chksum == p[UDP].chksum
    return out


def dhcp_frames(out):
    return [p for p in out if BOOTP in p]


def lease(st, srv, now=0.0):
    """start -> DISCOVER/OFFER/REQUEST/ACK (-> probes) -> bound; returns the time."""
    st.start(now)
    st.poll(now)
    (d,) = dhcp_frames(wire(st))
    st.receive(srv.frame(srv.reply(d[BOOTP], "offer"), dst="198.18.0.1"), now)
    (r,) = dhcp_frames(wire(st))
    st.receive(srv.frame(srv.reply(r[BOOTP], "ack")), now)
    while st.dhcp.state != "bound":
        now = st.poll(now)
    return now


def test_no_address_until_bound_then_serving_with_the_leased_one(store):
    st = dstack(store)
    srv = Server(addr=SERVER_IP, extra=[("router", "198.18.0.254")])
    st.start(0.0)
    st.poll(0.0)
    (d,) = wire(st)
    assert (d[Ether].src, d[Ether].dst, d[IP].src, d[IP].dst, d[UDP].sport, d[UDP].dport) == \
        (SERVER_MAC, BC, "0.0.0.0", "255.255.255.255", 68, 67)
    assert msg_type(d) == "discover" and opts(d)["hostname"] == b"www"
    c = Client(st, now=0.0)
    assert c.syn() == [] and st.counters["drop_ip_not_for_us"] == 1      # no address: nothing served
    # the OFFER unicast to the offered address (we have none yet: still taken)
    st.receive(srv.frame(srv.reply(d[BOOTP], "offer"), dst=SERVER_IP, dmac=SERVER_MAC), 0.1)
    (r,) = wire(st)
    assert msg_type(r) == "request" and r[IP].src == "0.0.0.0"
    st.receive(srv.frame(srv.reply(r[BOOTP], "ack")), 0.2)
    now, probes = 0.2, []
    while st.dhcp.state == "probing":
        now = st.poll(now)
        probes += [p for p in wire(st) if ARP in p]
    p3 = probes[:3]
    assert [(p[Ether].dst, p[ARP].op, p[ARP].psrc, p[ARP].pdst, p[ARP].hwdst) for p in p3] == \
        [(BC, 1, "0.0.0.0", SERVER_IP, "00:00:00:00:00:00")] * 3
    # bound: the announcement (gratuitous ARP) and the router resolved
    ann = [(p[ARP].psrc, p[ARP].pdst) for p in probes[3:]]
    assert ann == [(SERVER_IP, SERVER_IP), (SERVER_IP, "198.18.0.254")]
    assert st.ip == SERVER_IP and st.prefix == 24 and st.gateway == ip_bytes("198.18.0.254")
    (ev,) = st.events
    assert ev[0] == "address" and ev[1]["event"] == "acquired" and ev[1]["how"] == "dhcp"
    assert ev[1]["ip"] == SERVER_IP and ev[1]["gateway"] == "198.18.0.254" and ev[1]["lease"] == 3600
    c = Client(st, port=40001, now=now)
    c.connect()
    c.send("PA", data=c.request("/"))
    assert c.data_segments()


def test_mtu_option_lowers_our_mss(store):
    st = dstack(store, probe=False)
    lease(st, Server(addr=SERVER_IP, extra=[("interface-mtu", 1400)]))
    c = Client(st, now=1.0)
    sa = c.connect()
    assert dict(sa[TCP].options)["MSS"] == 1360 and st.cfg.mtu == 1400
    # never above the device's MTU
    st2 = dstack(store, probe=False, mtu=1280)
    lease(st2, Server(addr=SERVER_IP, extra=[("interface-mtu", 9000)]))
    assert st2.cfg.mtu == 1280


def test_slash32_with_classless_routes_to_an_off_link_gateway(store):
    st = dstack(store, probe=False)
    srv = Server(addr="198.18.5.5", mask="255.255.255.255",
                 extra=[("router", "198.18.9.9"),
                        ("classless_static_routes", "0.0.0.0/0:198.18.5.1", "198.18.5.1/32:0.0.0.0")])
    st.start(0.0)
    st.poll(0.0)
    (d,) = dhcp_frames(wire(st))
    st.receive(srv.frame(srv.reply(d[BOOTP], "offer")), 0.0)
    (r,) = dhcp_frames(wire(st))
    st.receive(srv.frame(srv.reply(r[BOOTP], "ack")), 0.0)
    out = wire(st)
    assert st.ip == "198.18.5.5" and st.prefix == 32
    assert st.gateway == ip_bytes("198.18.5.1")                # option 121 wins over option 3
    arps = [(p[ARP].psrc, p[ARP].pdst) for p in out if ARP in p]
    assert ("198.18.5.5", "198.18.5.1") in arps
    # the gateway answers (it is outside our /32): learned
    st.receive(bytes(Ether(src="02:00:00:00:00:51", dst=SERVER_MAC) /
                     ARP(op=2, hwsrc="02:00:00:00:00:51", psrc="198.18.5.1", pdst="198.18.5.5", hwdst=SERVER_MAC)),
               0.5)
    assert st.gateway_mac == bytes.fromhex("020000000051")
    # a client behind the gateway is served through it (replies to the frame's source MAC)
    c = Client(st, ip="203.0.113.9", mac="02:00:00:00:00:51", now=1.0)
    c.seg = _seg_to(c, "198.18.5.5")
    sa = c.connect()
    assert sa[IP].dst == "203.0.113.9" and sa[Ether].dst == "02:00:00:00:00:51"


def _seg_to(c, dst):
    orig = c.seg

    def seg(*a, **kw):
        p = orig(*a, **kw)
        p[IP].dst = dst
        return Ether(bytes(p))
    return seg


def test_address_change_on_renewal_drops_old_connections_and_serves_the_new(store):
    st = dstack(store, probe=False)
    srv = Server(addr=SERVER_IP, lease=1000)
    lease(st, srv)
    c = Client(st, now=1.0)
    c.connect()
    assert len(st.conns) == 1
    st.events.clear()
    st.poll(500.0)
    (r,) = dhcp_frames(wire(st))
    assert r[IP].src == SERVER_IP and r[IP].dst == "198.18.0.254" and r[Ether].dst == srv.mac
    st.receive(srv.frame(srv.reply(r[BOOTP], "ack", addr="198.18.0.7"), dst=SERVER_IP, dmac=SERVER_MAC), 500.1)
    assert st.ip == "198.18.0.7" and len(st.conns) == 0
    assert st.counters["tcp_conns_dropped_address_change"] == 1
    assert [e[1]["event"] for e in st.events] == ["changed"]
    ann = [p for p in wire(st) if ARP in p][0]
    assert (ann[ARP].psrc, ann[ARP].pdst) == ("198.18.0.7", "198.18.0.7")     # the new address announced
    c.now = 501.0
    assert c.syn() == []                                      # the old address is gone
    c2 = Client(st, port=40002, now=501.0)
    c2.seg = _seg_to(c2, "198.18.0.7")
    assert c2.connect()[IP].src == "198.18.0.7"


def test_expiry_stops_serving_and_starts_over(store):
    st = dstack(store, probe=False)
    lease(st, Server(addr=SERVER_IP, lease=1000))
    st.events.clear()
    now = nxt = 0.0
    while st.ip is not None:
        now = nxt
        nxt = st.poll(now)
    assert now == pytest.approx(1000.0)
    assert [e[1]["event"] for e in st.events] == ["lost"] and st.gateway is None
    kinds = [msg_type(p) for p in dhcp_frames(wire(st))]
    assert kinds[-1] == "discover" and "request" in kinds
    c = Client(st, now=now + 1)
    assert c.syn() == []


def test_probe_conflict_through_the_stack_sends_decline(store):
    st = dstack(store)
    srv = Server(addr=SERVER_IP)
    st.start(0.0)
    st.poll(0.0)
    (d,) = dhcp_frames(wire(st))
    st.receive(srv.frame(srv.reply(d[BOOTP], "offer")), 0.0)
    (r,) = dhcp_frames(wire(st))
    st.receive(srv.frame(srv.reply(r[BOOTP], "ack")), 0.0)
    st.poll(st.poll(0.0))
    wire(st)
    st.receive(bytes(Ether(src="02:00:00:00:00:99", dst=BC) /
                     ARP(op=1, hwsrc="02:00:00:00:00:99", psrc=SERVER_IP, pdst="198.18.0.254")), 1.5)
    (x,) = dhcp_frames(wire(st))
    assert msg_type(x) == "decline" and opts(x)["requested_addr"] == SERVER_IP
    assert st.ip is None and [e[0] for e in st.events] == ["declined"]


def test_server_that_never_answers_is_said_once(store):
    st = dstack(store)
    st.start(0.0)
    now = 0.0
    while now < 600:
        now = st.poll(now)
    wire(st)
    assert [e[0] for e in st.events] == ["no_answer"]
    assert st.counters["dhcp_discovers_sent"] >= 10


@given(st_.lists(st_.tuples(st_.integers(14, 341), st_.integers(0, 255)), min_size=1, max_size=10),
       st_.sampled_from(["offer", "ack", "nak"]))
@settings(max_examples=150, deadline=None)
def test_fuzz_mutated_dhcp_frames_never_raise_and_tables_stay_bounded(store, muts, mtype):
    st = dstack(store, probe=False)
    srv = Server(addr=SERVER_IP, extra=[("router", "198.18.0.254"),
                                        ("classless_static_routes", "198.19.0.0/16:198.18.0.253"),
                                        ("interface-mtu", 1400)])
    st.start(0.0)
    st.poll(0.0)
    (d,) = dhcp_frames(wire(st))
    raw = bytearray(srv.frame(srv.reply(d[BOOTP], "offer")))
    for i, v in muts:
        if i < len(raw):
            raw[i] = v
    st.receive(bytes(raw), 0.1)
    (r,) = dhcp_frames(wire(st)) or (d,)
    raw = bytearray(srv.frame(srv.reply(r[BOOTP], mtype)))
    for i, v in muts:
        if i < len(raw):
            raw[i] ^= v
    st.receive(bytes(raw), 0.2)
    st.poll(5000.0)
    assert st.counters["drop_internal_error"] == 0, st.last_error
    assert len(st.routes) <= st.routes.size and len(st.arp) <= st.arp.size
    assert 576 <= st.cfg.mtu <= 1500


def test_replies_rearm_the_stack_poll_so_the_probe_starts_at_once(store):
    st = dstack(store)
    srv = Server(addr=SERVER_IP)
    st.start(0.0)
    st.poll(0.0)
    (d,) = dhcp_frames(wire(st))
    st.receive(srv.frame(srv.reply(d[BOOTP], "offer")), 0.1)
    (r,) = dhcp_frames(wire(st))
    st.receive(srv.frame(srv.reply(r[BOOTP], "ack")), 0.2)
    # the first probe is due within PROBE_WAIT (1 s), not at the REQUEST's retransmission (~4 s)
    assert st.poll(0.2) <= 1.2
    assert st.poll(1.2) and [p[ARP].psrc for p in wire(st) if ARP in p] == ["0.0.0.0"]
