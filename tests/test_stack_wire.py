"""Wire formats and the non-TCP layers: Ethernet, ARP, IPv4, ICMP, sequence numbers,
and malformed frames of every layer dropped under the right counter."""
import struct

import pytest
from hypothesis import given, strategies as st_
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from appliance.stack import seq as sq
from appliance.stack.arp import ArpCache
from appliance.stack.ipv4 import IPv4Header
from appliance.stack.tcp import Options, TcpSegment
from appliance.stack.wire import Malformed, ip_bytes
from tests.stack_support import (CLIENT_IP, CLIENT_MAC, SERVER_IP, SERVER_MAC, Client, check_frame, make_stack,
                                 make_store)

BCAST = "ff:ff:ff:ff:ff:ff"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("wire"))


@pytest.fixture
def stack(store):
    return make_stack(store)


def feed(stack, pkt, now=1.0):
    stack.receive(memoryview(bytes(pkt)), now)
    out = [check_frame(bytes(f[0])) for f in stack.txq]
    stack.txq.clear()
    return out


def eth(dst=SERVER_MAC):
    return Ether(src=CLIENT_MAC, dst=dst)


# ---------------------------------------------------------------- sequence numbers

def test_seq_wraparound_comparison():
    """RFC 9293 §3.4: comparisons are modulo 2**32."""
    a = sq.Seq(0xFFFFFFF0)
    b = a + 0x20
    assert int(b) == 0x10
    assert a < b and b > a and a <= b and not b < a
    assert b - a == 0x20 and a - b == -0x20
    assert sq.lt(0xFFFFFFFF, 0) and not sq.lt(0, 0xFFFFFFFF)
    assert sq.between(0xFFFFFFF0, 5, 0x10) and not sq.between(0xFFFFFFF0, 0x11, 0x10)
    assert sq.diff(5, 0xFFFFFFFB) == 10


@given(st_.integers(0, 2**32 - 1), st_.integers(1, 2**31 - 1))
def test_seq_order_property(a, d):
    assert sq.lt(a, sq.add(a, d)) and sq.gt(sq.add(a, d), a) and sq.diff(sq.add(a, d), a) == d


# ---------------------------------------------------------------- parse/emit round trips

def test_tcp_emit_parse_roundtrip_checked_by_scapy():
    seg = TcpSegment(80, 4000, 123, 456, 0x12, 1000, Options(mss=1460, wscale=0), b"data")
    raw = seg.emit(ip_bytes(SERVER_IP), ip_bytes(CLIENT_IP))
    p = IP(src=SERVER_IP, dst=CLIENT_IP, proto=6) / TCP(raw)
    ref = TCP(bytes(p[TCP]))
    del ref.chksum
    assert TCP(bytes(IP(src=SERVER_IP, dst=CLIENT_IP) / ref)[20:]).chksum == p[TCP].chksum
    assert dict(p[TCP].options)["MSS"] == 1460 and dict(p[TCP].options)["WScale"] == 0
    back = TcpSegment.parse(raw, ip_bytes(SERVER_IP), ip_bytes(CLIENT_IP))
    assert back.options.mss == 1460 and back.options.wscale == 0 and bytes(back.payload) == b"data"


def test_tcp_options_parse_all_kinds():
    """RFC 9293 §3.2 options; RFC 7323 §2.3: a shift above 14 is used as 14."""
    t = bytes(TCP(options=[("MSS", 1000), ("SAckOK", b""), ("Timestamp", (1, 2)), ("WScale", 20)]))
    o = Options.parse(t[20:])
    assert o == Options(1000, 14, True, True)
    with pytest.raises(Malformed) as e:
        Options.parse(b"\x02\x09\x00")
    assert e.value.reason == "tcp_bad_options"


def test_ipv4_parse_trims_ethernet_padding():
    raw = bytes(IP(src=CLIENT_IP, dst=SERVER_IP) / ICMP()) + b"\0" * 10
    h = IPv4Header.parse(raw)
    assert len(h.payload) == 8 and h.proto == 1


def test_arp_cache_expiry_and_bound():
    c = ArpCache(ttl=10, size=2)
    c.learn(b"\1\1\1\1", b"a" * 6, 0)
    c.learn(b"\1\1\1\2", b"b" * 6, 1)
    c.learn(b"\1\1\1\3", b"c" * 6, 2)          # evicts the oldest
    assert c.lookup(b"\1\1\1\1", 3) is None and c.lookup(b"\1\1\1\3", 3) == b"c" * 6
    assert c.lookup(b"\1\1\1\3", 12.5) is None  # expired


# ---------------------------------------------------------------- ARP (RFC 826, 5227)

def test_arp_request_for_us_is_answered_to_the_source_mac(stack):
    out = feed(stack, eth(BCAST) / ARP(op=1, hwsrc=CLIENT_MAC, psrc=CLIENT_IP, pdst=SERVER_IP))
    assert len(out) == 1
    a = out[0]
    assert a.dst == CLIENT_MAC and a.src == SERVER_MAC and a[ARP].op == 2
    assert a[ARP].hwsrc == SERVER_MAC and a[ARP].psrc == SERVER_IP
    assert a[ARP].hwdst == CLIENT_MAC and a[ARP].pdst == CLIENT_IP
    assert stack.arp.lookup(ip_bytes(CLIENT_IP), 2.0) == bytes.fromhex(CLIENT_MAC.replace(":", ""))
    assert stack.counters["arp_replies"] == 1


def test_arp_for_another_host_is_dropped(stack):
    assert feed(stack, eth(BCAST) / ARP(op=1, hwsrc=CLIENT_MAC, psrc=CLIENT_IP, pdst="198.18.0.9")) == []
    assert stack.counters["drop_arp_not_for_us"] == 1


def test_arp_claiming_our_address_is_counted_as_conflict(stack):
    assert feed(stack, eth(BCAST) / ARP(op=2, hwsrc=CLIENT_MAC, psrc=SERVER_IP, pdst=SERVER_IP)) == []
    assert stack.counters["arp_address_conflict"] == 1


def test_start_sends_gratuitous_arp_and_resolves_gateway(store):
    from appliance.stack.iface import Stack, StackConfig
    from appliance.stack.rings.base import Offload
    st = Stack(store, bytes.fromhex("020000000001"), SERVER_IP, 24, "198.18.0.254", Offload(), StackConfig(),
               secret=b"s" * 32)
    st.start(0.0)
    out = [Ether(bytes(f[0])) for f in st.txq]
    st.txq.clear()
    ann, req = out
    assert ann.dst == BCAST and ann[ARP].op == 1 and ann[ARP].psrc == SERVER_IP and ann[ARP].pdst == SERVER_IP
    assert req[ARP].pdst == "198.18.0.254"
    st.poll(1.5)                                 # not answered: asked again
    assert [Ether(bytes(f[0]))[ARP].pdst for f in st.txq] == ["198.18.0.254"]
    st.txq.clear()
    st.receive(bytes(Ether(src="02:00:00:00:00:fe", dst=SERVER_MAC) /
                     ARP(op=2, hwsrc="02:00:00:00:00:fe", psrc="198.18.0.254", pdst=SERVER_IP,
                         hwdst=SERVER_MAC)), 1.6)
    assert st.gateway_mac == bytes.fromhex("0200000000fe")
    st.poll(5.0)
    assert st.txq == []
    with pytest.raises(ValueError, match="not in"):
        Stack(store, b"\2" * 6, SERVER_IP, 24, "10.0.0.1", Offload(), StackConfig(), secret=b"s" * 32)


# ---------------------------------------------------------------- ICMP echo (RFC 792)

def test_ping_is_answered_with_the_same_payload(stack):
    out = feed(stack, eth() / IP(src=CLIENT_IP, dst=SERVER_IP) / ICMP(type=8, id=7, seq=3) / (b"ping" * 20))
    (r,) = out
    assert r.dst == CLIENT_MAC and r[IP].src == SERVER_IP and r[IP].dst == CLIENT_IP
    assert r[ICMP].type == 0 and r[ICMP].id == 7 and r[ICMP].seq == 3 and bytes(r[ICMP].payload) == b"ping" * 20
    assert stack.counters["icmp_echo_replies"] == 1


def test_ping_with_bad_icmp_checksum_is_dropped(stack):
    assert feed(stack, eth() / IP(src=CLIENT_IP, dst=SERVER_IP) / ICMP(type=8, chksum=0x1234) / b"x") == []
    assert stack.counters["drop_icmp_bad_checksum"] == 1


def test_other_icmp_types_are_ignored(stack):
    assert feed(stack, eth() / IP(src=CLIENT_IP, dst=SERVER_IP) / ICMP(type=0)) == []
    assert stack.counters["icmp_ignored"] == 1


# ---------------------------------------------------------------- malformed frames, every layer

def _ip_raw(**kw):
    return bytes(IP(src=CLIENT_IP, dst=SERVER_IP, **kw) / ICMP(type=8))


def _patch(raw, off, val):
    b = bytearray(raw)
    b[off:off + len(val)] = val
    return bytes(b)


def _fix_ipsum(raw):
    b = bytearray(raw)
    b[10:12] = b"\0\0"
    s = sum(struct.unpack("!10H", b[:20]))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    b[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return bytes(b)


MALFORMED = [
    ("eth_short", b"\x02\x00\x00\x00\x00\x01\x02"),
    ("eth_not_for_us", bytes(Ether(src=CLIENT_MAC, dst="02:00:00:00:00:99") / IP(dst=SERVER_IP) / ICMP())),
    ("eth_unknown_type", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC, type=0x86DD) / (b"x" * 40))),
    ("arp_short", bytes(Ether(src=CLIENT_MAC, dst=BCAST, type=0x0806) / b"\x00\x01\x08\x00")),
    ("arp_unsupported", bytes(Ether(src=CLIENT_MAC, dst=BCAST) / ARP(ptype=0x86DD, pdst=SERVER_IP))),
    ("arp_bad_op", bytes(Ether(src=CLIENT_MAC, dst=BCAST) / ARP(op=9, pdst=SERVER_IP))),
    ("ip_short", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC, type=0x0800) / b"\x45\x00\x00")),
    ("ip_bad_version", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC, type=0x0800) / _patch(_ip_raw(), 0, b"\x65"))),
    ("ip_bad_ihl", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC, type=0x0800) / _patch(_ip_raw(), 0, b"\x44"))),
    ("ip_bad_length", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC, type=0x0800) /
                            _fix_ipsum(_patch(_ip_raw(), 2, b"\x01\x00")))),
    ("ip_bad_checksum", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP, chksum=1) /
                              ICMP())),
    ("ip_fragment", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP, flags="MF") /
                          ICMP())),
    ("ip_fragment", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP, frag=10) /
                          ICMP())),
    ("ip_options", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) /
                         IP(src=CLIENT_IP, dst=SERVER_IP, options=[b"\x94\x04\x00\x00"]) / ICMP())),
    ("ip_not_for_us", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst="198.18.0.3") / ICMP())),
    ("ip_bad_source", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src="224.0.0.1", dst=SERVER_IP) /
                            TCP(dport=80, flags="S"))),
    ("ip_bad_source", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src="198.18.0.255", dst=SERVER_IP) /
                            TCP(dport=80, flags="S"))),
    ("ip_unknown_protocol", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP, proto=47) /
                                  bytes(8))),
    ("icmp_short", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP, proto=1) /
                         b"\x08\x00")),
    ("tcp_short", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP, proto=6) /
                        b"\x00\x50\x00\x50")),
    ("tcp_bad_offset", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP) /
                             TCP(dport=80, flags="S", dataofs=15))),
    ("tcp_bad_offset", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP) /
                             TCP(dport=80, flags="S", dataofs=3))),
    ("tcp_bad_checksum", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP) /
                               TCP(dport=80, flags="S", chksum=0x1234))),
    ("tcp_bad_options", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP) /
                              TCP(dport=80, flags="S", options=[(2, b"\x05\xb4\x00\x00\x00\x00")], dataofs=6))),
    ("tcp_no_connection", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP) /
                                TCP(dport=80, flags="", seq=5))),
    ("tcp_syn_fin", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP) /
                          TCP(dport=80, flags="SF"))),
    ("tcp_rst_no_connection", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP) /
                                    TCP(dport=80, flags="R"))),
]


@pytest.mark.parametrize("reason,raw", MALFORMED, ids=[f"{r}{i}" for i, (r, _) in enumerate(MALFORMED)])
def test_malformed_frame_is_dropped_with_its_counter(stack, reason, raw):
    out = feed(stack, Raw(raw))
    assert stack.counters["drop_" + reason] == 1, stack.counters.as_dict()
    assert stack.counters["drop_internal_error"] == 0
    assert out == []
    assert sum(stack.counters.drops().values()) == 1


def test_tcp_bad_options_patch_is_really_bad():
    # the option above claims length 5 inside a 4-byte option area: run past the header
    with pytest.raises(Malformed):
        Options.parse(b"\x02\x05\xb4\x00")


def test_tcp_to_a_closed_port_gets_a_reset(stack):
    """RFC 9293 §3.10.7.1: no connection, no ACK: <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>."""
    out = feed(stack, eth() / IP(src=CLIENT_IP, dst=SERVER_IP) / TCP(sport=1234, dport=81, flags="S", seq=77))
    (r,) = out
    assert r[TCP].flags == "RA" and r[TCP].seq == 0 and r[TCP].ack == 78 and r[TCP].sport == 81
    assert stack.counters["drop_tcp_closed_port"] == 1


def test_ack_without_connection_gets_a_reset_with_its_ack_as_seq(stack):
    out = feed(stack, eth() / IP(src=CLIENT_IP, dst=SERVER_IP) / TCP(sport=1234, dport=80, flags="A", seq=5,
                                                                        ack=999))
    (r,) = out
    assert r[TCP].flags == "R" and r[TCP].seq == 999


def test_internal_error_is_counted_not_raised(stack):
    def boom(*a):
        raise RuntimeError("bug")
    stack._slow = boom
    stack.receive(b"\0" * 60, 1.0)
    assert stack.counters["drop_internal_error"] == 1 and "bug" in stack.last_error


def test_client_helper_sanity(stack):
    c = Client(stack)
    c.connect()
    assert stack.counters["tcp_established"] == 1


def test_csum_ok_frames_skip_tcp_checksum_verification(stack):
    """A device that vouches for the checksum (virtio NEEDS_CSUM from a local sender:
    the field holds only the pseudo-header sum) passes csum_ok=True."""
    raw = bytearray(bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP) /
                          TCP(sport=999, dport=80, flags="S", seq=1)))
    raw[50:52] = b"\x12\x34"            # not the checksum
    stack.receive(bytes(raw), 1.0)
    assert stack.counters["drop_tcp_bad_checksum"] == 1 and not stack.txq
    stack.receive(bytes(raw), 1.0, csum_ok=True)
    (sa,) = [check_frame(bytes(f[0])) for f in stack.txq]
    assert sa[TCP].flags == "SA"


def test_imf_fixdate_matches_the_http_layer():
    """RFC 9110 §5.6.7: the Date the stack patches in is the one the HTTP layer writes."""
    from appliance.http.dates import format_date
    from appliance.stack.iface import imf_fixdate
    for t in (0, 951782400, 1764150000, 2 ** 31 - 1):
        assert imf_fixdate(t) == format_date(t) and len(imf_fixdate(t)) == 29


def test_shutdown_resets_every_connection(stack):
    c1, c2 = Client(stack, port=1), Client(stack, port=2)
    c1.connect()
    c2.syn()
    stack.shutdown()
    out = c1.collect()
    assert [str(p[TCP].flags) for p in out] == ["RA"] and out[0][TCP].dport == 1
    assert not stack.conns and stack.counters["tcp_conns_open"] == 0
