"""The DHCPv4 client (RFC 2131/2132/3442, RFC 5227 probing) alone, sans-IO, with
a fake clock: every message it sends is parsed by scapy, every reply it gets is
built by scapy."""
import pytest
from hypothesis import given, settings, strategies as st_
from scapy.layers.dhcp import BOOTP, DHCP

from appliance.stack.dhcp4 import classless_routes, parse_message
from appliance.stack.wire import Malformed, ip_bytes
from tests.dhcp_support import CMAC, SIP, Server, make_client, msg_type, opts, sent

A = ip_bytes("198.18.0.10")


def bound(c, srv, now=0.0, probe=True):
    """Drive a client from start to BOUND against `srv`; returns the time it got there."""
    c.start(now)
    c.poll(now)
    (_, _, _, d), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(d, "offer"), now)
    (_, _, _, r), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(r, "ack"), now)
    while c.state != "bound":
        now = c._t
        c.poll(now)
    sent(c)
    return now


def test_discover_offer_request_ack_probe_bound():
    c = make_client(hostname="haboob")
    srv = Server(extra=[("router", SIP)])
    c.start(10.0)
    assert c.poll(10.0) > 10.0
    (dmac, src, dst, d), = sent(c)[0]
    assert (dmac, src, dst) == (b"\xff" * 6, b"\0" * 4, b"\xff" * 4)
    o = opts(d)
    assert msg_type(d) == "discover" and d.op == 1 and d.chaddr[:6] == CMAC and d.ciaddr == "0.0.0.0"
    assert o["client_id"] == b"\x01" + CMAC and o["hostname"] == b"haboob"
    assert {1, 3, 26, 51, 54, 58, 59, 121} <= set(o["param_req_list"])
    c.receive(srv.mac_b, srv.reply(d, "offer"), 10.5)
    (dmac, src, dst, r), = sent(c)[0]
    o = opts(r)
    assert msg_type(r) == "request" and r.xid == d.xid and dst == b"\xff" * 4
    assert (o["requested_addr"], o["server_id"]) == ("198.18.0.10", SIP) and r.ciaddr == "0.0.0.0"
    c.receive(srv.mac_b, srv.reply(r, "ack"), 10.6)
    assert c.state == "probing" and c.events == []
    # RFC 5227 §2.1.1: PROBE_NUM probes PROBE_MIN..PROBE_MAX apart, then ANNOUNCE_WAIT
    times, now = [], 10.6
    while c.state == "probing":
        now = c._t
        c.poll(now)
        if c.out:
            times.append(now)
            assert sent(c)[1] == [A]
    assert len(times) == 3 and all(1.0 <= b - a <= 2.0 for a, b in zip(times, times[1:]))
    assert now - times[-1] == pytest.approx(2.0)
    (ev,) = c.events
    L = ev.lease
    assert ev.kind == "acquired" and L.address == A and L.prefix == 24 and L.routers == (ip_bytes(SIP),)
    # lease times count from the REQUEST (RFC 2131 §4.4.1): defaults 0.5 and 0.875
    assert (L.t1, L.t2, L.expires) == (10.5 + 1800, 10.5 + 3150, 10.5 + 3600)
    assert c.counters["dhcp_leases_bound"] == 1


def test_discover_backoff_is_exponential_randomized_and_capped_and_says_once():
    c = make_client()
    c.start(0.0)
    now, times = 0.0, []
    for _ in range(9):
        c.poll(now)
        ((_, _, _, d),), _ = sent(c)
        assert msg_type(d) == "discover"
        times.append(now)
        now = c._t
    gaps = [b - a for a, b in zip(times, times[1:])]
    for g, base in zip(gaps, [4, 8, 16, 32, 64, 64, 64, 64]):
        assert base - 1 <= g <= base + 1          # RFC 2131 §4.1
    assert [e.kind for e in c.events] == ["no_answer"]


def test_request_retried_then_starts_over():
    c = make_client()
    srv = Server()
    c.start(0.0)
    c.poll(0.0)
    (_, _, _, d), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(d, "offer"), 0.0)
    kinds, now = [], 0.0
    for _ in range(5):
        kinds += [msg_type(p) for *_, p in sent(c)[0]]
        now = c._t
        c.poll(now)
    kinds += [msg_type(p) for *_, p in sent(c)[0]]
    assert kinds[:4] == ["request"] * 4 and kinds[4] == "discover"
    assert c.counters["dhcp_request_timeouts"] == 1


def test_rogue_second_server_cannot_break_the_exchange():
    c = make_client()
    good, rogue = Server(), Server(ip="198.18.0.66", mac="02:00:00:00:00:66", addr="198.18.0.99")
    c.start(0.0)
    c.poll(0.0)
    (_, _, _, d), = sent(c)[0]
    c.receive(good.mac_b, good.reply(d, "offer"), 0.1)
    (_, _, _, r), = sent(c)[0]
    c.receive(rogue.mac_b, rogue.reply(d, "offer"), 0.2)             # late offer: ignored
    c.receive(rogue.mac_b, rogue.reply(r, "nak"), 0.2)               # NAK from a server we did not pick
    c.receive(rogue.mac_b, rogue.reply(r, "ack"), 0.2)
    assert c.state == "requesting" and sent(c)[0] == []
    assert c.counters["drop_dhcp_offer_ignored"] == 1 and c.counters["drop_dhcp_wrong_server"] == 2
    c.receive(good.mac_b, good.reply(r, "ack"), 0.3)
    assert c.state == "probing"
    # once bound, nothing from anyone counts
    now = 0.3
    while c.state != "bound":
        now = c._t
        c.poll(now)
    c.receive(rogue.mac_b, rogue.reply(r, "nak"), now)
    assert c.state == "bound" and c.lease.address == A


@pytest.mark.parametrize("mutate,reason", [
    (dict(xid=12345), "dhcp_wrong_xid"),
    (dict(chaddr=bytes.fromhex("0200000000aa")), "dhcp_not_our_mac"),
])
def test_replies_for_another_transaction_or_client_are_dropped(mutate, reason):
    c = make_client()
    srv = Server()
    c.start(0.0)
    c.poll(0.0)
    (_, _, _, d), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(d, "offer", **mutate), 0.1)
    assert c.state == "selecting" and c.counters["drop_" + reason] == 1


def test_renewal_at_t1_unicast_then_rebinding_at_t2_broadcast_then_expiry():
    c = make_client()
    srv = Server(lease=1000, t1=400, t2=700)
    bound(c, srv)
    L = c.lease
    assert (L.t1, L.t2, L.expires) == (400, 700, 1000)
    c.events.clear()
    c.poll(399.9)
    assert sent(c)[0] == []
    c.poll(400.0)
    (dmac, src, dst, r), = sent(c)[0]
    # RFC 2131 §4.4.5: RENEWING: unicast to the server, ciaddr set, no 50/54
    assert (dmac, src, dst) == (srv.mac_b, A, ip_bytes(SIP))
    o = opts(r)
    assert msg_type(r) == "request" and r.ciaddr == "198.18.0.10"
    assert "requested_addr" not in o and "server_id" not in o
    # retransmission: half the time left to T2, at least 60 s
    assert c._t == 400 + 150
    c.poll(550.0)
    assert len(sent(c)[0]) == 1 and c._t == 550 + 75
    c.poll(625.0)
    assert len(sent(c)[0]) == 1 and c._t == 685           # 60 s minimum
    c.poll(685.0)
    assert c._t == 700                                      # never past T2
    sent(c)
    c.poll(700.0)
    (dmac, src, dst, r), = sent(c)[0]
    assert (dmac, src, dst) == (b"\xff" * 6, A, b"\xff" * 4) and r.ciaddr == "198.18.0.10"
    assert c.state == "rebinding" and c.counters["dhcp_rebinds"] == 1
    while c.state == "rebinding":
        now = c._t
        c.poll(now)
    assert now == 1000 and [e.kind for e in c.events] == ["lost"] and c.lease is None
    (_, _, _, d), = sent(c)[0][-1:]
    assert msg_type(d) == "discover"
    assert c.counters["dhcp_leases_lost_expired"] == 1


def test_renewal_ack_extends_the_lease_and_a_new_address_is_a_change():
    c = make_client()
    srv = Server(lease=1000)
    bound(c, srv)
    c.events.clear()
    c.poll(500.0)
    (_, _, _, r), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(r, "ack"), 500.2)
    (ev,) = c.events
    assert ev.kind == "renewed" and c.state == "bound" and c.lease.expires == 1500.0 and c.lease.t1 == 1000.0
    c.events.clear()
    c.poll(1000.0)
    (_, _, _, r), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(r, "ack", addr="198.18.0.11"), 1000.1)
    (ev,) = c.events
    assert ev.kind == "changed" and ev.old.address == A and ev.lease.address == ip_bytes("198.18.0.11")


def test_renewing_accepts_only_its_server_rebinding_any():
    c = make_client()
    srv, other = Server(lease=1000), Server(ip="198.18.0.253", mac="02:00:00:00:00:fd")
    bound(c, srv)
    c.events.clear()
    c.poll(500.0)
    (_, _, _, r), = sent(c)[0]
    c.receive(other.mac_b, other.reply(r, "ack"), 500.1)
    assert c.state == "renewing" and c.counters["drop_dhcp_wrong_server"] == 1
    c.poll(875.0)
    (_, _, _, r), = sent(c)[0]
    assert c.state == "rebinding"
    c.receive(other.mac_b, other.reply(r, "ack"), 875.1)
    assert c.state == "bound" and c.lease.server == ip_bytes("198.18.0.253")
    assert c.lease.server_mac == other.mac_b


def test_nak_while_renewing_loses_the_address_and_starts_over():
    c = make_client()
    srv = Server(lease=1000)
    bound(c, srv)
    c.events.clear()
    c.poll(500.0)
    (_, _, _, r), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(r, "nak"), 500.1)
    assert [e.kind for e in c.events] == ["lost"] and c.lease is None
    c.poll(500.1)
    (_, _, _, d), = sent(c)[0]
    assert msg_type(d) == "discover" and d.xid != r.xid
    # a second NAK in a row: the restart waits (no tight loop against a NAKing server)
    c.receive(srv.mac_b, srv.reply(d, "offer"), 500.2)
    (_, _, _, r), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(r, "nak"), 500.3)
    assert c._t == pytest.approx(504.3)


def test_probe_conflict_sends_decline_and_restarts_after_ten_seconds():
    c = make_client()
    srv = Server()
    c.start(0.0)
    c.poll(0.0)
    (_, _, _, d), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(d, "offer"), 0.0)
    (_, _, _, r), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(r, "ack"), 0.0)
    c.poll(c._t)
    assert sent(c)[1] == [A]
    c.arp(2, bytes.fromhex("02000000bbbb"), A, b"\0" * 4, 1.5)          # someone has it
    (dmac, src, dst, x), = sent(c)[0]
    o = opts(x)
    assert msg_type(x) == "decline" and (o["requested_addr"], o["server_id"]) == ("198.18.0.10", SIP)
    assert (src, dst) == (b"\0" * 4, b"\xff" * 4) and x.ciaddr == "0.0.0.0"
    assert [e.kind for e in c.events] == ["declined"] and c.lease is None
    assert c._t == 11.5
    c.poll(11.5)
    assert msg_type(sent(c)[0][0][3]) == "discover"


def test_simultaneous_probe_by_another_host_is_a_conflict_our_own_is_not():
    c = make_client()
    srv = Server()
    c.start(0.0)
    c.poll(0.0)
    (_, _, _, d), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(d, "offer"), 0.0)
    (_, _, _, r), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(r, "ack"), 0.0)
    c.arp(1, CMAC, b"\0" * 4, A, 0.5)                                   # our own probe echoed
    assert c.state == "probing"
    c.arp(1, bytes.fromhex("02000000bbbb"), b"\0" * 4, A, 0.6)          # RFC 5227 §2.1.1
    assert c.state == "init" and c.counters["dhcp_declines_sent"] == 1


def test_classless_routes_take_precedence_and_slash32_with_offlink_gateway():
    # RFC 3442 §3 example encodings; a cloud-style /32 with a host route to the gateway
    raw = bytes([0, 10, 0, 0, 1]) + bytes([32, 10, 0, 0, 1, 0, 0, 0, 0]) + bytes([24, 192, 168, 5, 10, 0, 0, 1])
    assert classless_routes(raw) == ((b"\0\0\0\0", 0, ip_bytes("10.0.0.1")),
                                     (ip_bytes("10.0.0.1"), 32, b"\0\0\0\0"),
                                     (ip_bytes("192.168.5.0"), 24, ip_bytes("10.0.0.1")))
    c = make_client(probe=False)
    srv = Server(addr="10.0.0.5", mask="255.255.255.255",
                 extra=[("router", "10.9.9.9"), ("classless_static_routes", "0.0.0.0/0:10.0.0.1",
                                                                          "10.0.0.1/32:0.0.0.0"),
                        ("interface-mtu", 1460)])
    bound(c, srv)
    L = c.lease
    assert L.prefix == 32 and L.mtu == 1460 and L.routers == (ip_bytes("10.9.9.9"),)
    assert L.routes == ((b"\0" * 4, 0, ip_bytes("10.0.0.1")), (ip_bytes("10.0.0.1"), 32, b"\0" * 4))


@pytest.mark.parametrize("raw,reason", [
    (bytes([33, 1, 2, 3, 4, 5, 0, 0, 0, 0]), "dhcp_bad_classless_routes"),   # width > 32
    (bytes([24, 10, 0, 0, 1, 2]), "dhcp_bad_classless_routes"),              # truncated router
    (bytes([7, 0x0B, 1, 2, 3, 4]), "dhcp_bad_classless_routes"),              # a bit set beyond /7
])
def test_bad_classless_routes_are_refused(raw, reason):
    with pytest.raises(Malformed) as e:
        classless_routes(raw)
    assert e.value.reason == reason


@pytest.mark.parametrize("extra,reason", [
    ([("interface-mtu", 40)], "dhcp_bad_mtu"),
    ([("subnet_mask", "255.0.255.0")], "dhcp_bad_mask"),
    ([(121, b"\x21\x01\x02\x03\x04\x05\0\0\0\0")], "dhcp_bad_classless_routes"),
])
def test_bad_options_in_an_ack_drop_it(extra, reason):
    c = make_client(probe=False)
    srv = Server()
    c.start(0.0)
    c.poll(0.0)
    (_, _, _, d), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(d, "offer"), 0.0)
    (_, _, _, r), = sent(c)[0]
    o = [("message-type", "ack"), ("server_id", SIP)] + extra + [("lease_time", 60), "end"]
    c.receive(srv.mac_b, bytes(BOOTP(op=2, xid=r.xid, yiaddr="198.18.0.10", chaddr=r.chaddr) / DHCP(options=o)), 0.1)
    assert c.state == "requesting" and c.counters["drop_" + reason] == 1


def test_inconsistent_t1_t2_fall_back_to_defaults_and_infinite_lease_never_renews():
    c = make_client(probe=False)
    bound(c, Server(lease=1000, t1=900, t2=800))      # T1 > T2: T1 takes its default, T2 is valid
    assert (c.lease.t1, c.lease.t2) == (500.0, 800.0)
    c = make_client(probe=False)
    bound(c, Server(lease=1000, t1=300, t2=2000))     # T2 past the lease: its default
    assert (c.lease.t1, c.lease.t2) == (300.0, 875.0)
    c = make_client(probe=False)
    bound(c, Server(lease=0xFFFFFFFF))
    assert c.poll(1e9) == float("inf") and c.state == "bound"


def test_option_overload_and_concatenation():
    c = make_client(probe=False)
    srv = Server()
    c.start(0.0)
    c.poll(0.0)
    (_, _, _, d), = sent(c)[0]
    # server id in the file field (option 52 = 1), lease time split over two options (RFC 3396)
    file = bytes([54, 4]) + ip_bytes(SIP) + bytes([255])
    o = [("message-type", "offer"), ("dhcp-option-overload", 1), "end"]
    p = BOOTP(op=2, xid=d.xid, yiaddr="198.18.0.10", chaddr=d.chaddr, file=file) / DHCP(options=o)
    m = parse_message(bytes(p))
    assert m.options[54] == ip_bytes(SIP)
    raw = bytes(BOOTP(op=2, xid=1, chaddr=CMAC) / DHCP(options=[("message-type", "ack"), (121, b"\x00\x0a"),
                                                                (121, b"\x00\x00\x01"), "end"]))
    assert parse_message(raw).options[121] == b"\x00\x0a\x00\x00\x01"


@given(st_.binary(max_size=400))
@settings(max_examples=200, deadline=None)
def test_fuzz_random_bytes_never_raise(data):
    c = make_client()
    c.start(0.0)
    c.poll(0.0)
    c.receive(b"\x02" * 6, data, 0.1)
    assert c.state == "selecting"


@given(st_.lists(st_.tuples(st_.integers(0, 299), st_.integers(0, 255)), min_size=1, max_size=8),
       st_.sampled_from(["offer", "ack", "nak"]))
@settings(max_examples=200, deadline=None)
def test_fuzz_mutated_replies_never_raise(muts, mtype):
    c = make_client(probe=False)
    srv = Server(extra=[("router", SIP), ("classless_static_routes", "0.0.0.0/0:198.18.0.254"),
                        ("interface-mtu", 1400)])
    c.start(0.0)
    c.poll(0.0)
    (_, _, _, d), = sent(c)[0]
    c.receive(srv.mac_b, srv.reply(d, "offer"), 0.0)
    (_, _, _, r), = sent(c)[0]
    raw = bytearray(srv.reply(r, mtype))
    for i, v in muts:
        if i < len(raw):
            raw[i] = v
    c.receive(srv.mac_b, bytes(raw), 0.1)
    c.poll(100.0)
    assert c.state in ("requesting", "bound", "selecting", "init")
    assert len(c.out) <= 2 and len(c.events) <= 1
