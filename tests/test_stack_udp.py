"""UDP (RFC 768): parse/emit checked by scapy, the port registry, drops by reason."""
import pytest
from hypothesis import given, settings, strategies as st_
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from appliance.stack.counters import Counters
from appliance.stack.udp import UdpDatagram, UdpPorts
from appliance.stack.wire import Malformed, ip_bytes
from tests.stack_support import CLIENT_IP, CLIENT_MAC, SERVER_IP, SERVER_MAC, check_frame, make_stack, make_store

SRC, DST = ip_bytes(CLIENT_IP), ip_bytes(SERVER_IP)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("udp"))


@pytest.fixture
def stack(store):
    return make_stack(store)


@given(st_.binary(max_size=300), st_.integers(1, 65535), st_.integers(1, 65535))
@settings(max_examples=60, deadline=None)
def test_emit_matches_scapy_and_parses_back(payload, sport, dport):
    raw = UdpDatagram(sport, dport, payload).emit(SRC, DST)
    ref = bytes(UDP(sport=sport, dport=dport) / Raw(payload)) if payload else bytes(UDP(sport=sport, dport=dport))
    p = IP(src=CLIENT_IP, dst=SERVER_IP, proto=17) / Raw(raw)
    q = IP(bytes(p))
    assert raw[:6] == ref[:6] and raw[8:] == ref[8:]
    # scapy recomputes the same checksum over the pseudo header (a computed 0 goes out as 0xFFFF)
    chk = IP(bytes(IP(src=CLIENT_IP, dst=SERVER_IP) / UDP(raw)))
    del chk[UDP].chksum
    assert IP(bytes(chk))[UDP].chksum == int.from_bytes(raw[6:8], "big")
    assert UdpDatagram.parse(raw, SRC, DST) == (sport, dport, payload)
    assert q[UDP].len == len(raw)


def test_zero_checksum_means_none_and_ethernet_padding_is_cut():
    raw = bytes(UDP(sport=67, dport=68, chksum=0) / b"abc")
    assert UdpDatagram.parse(raw + b"\0\0\0", SRC, DST).payload == b"abc"


@pytest.mark.parametrize("reason,raw", [
    ("udp_short", b"\0\x44\0"),
    ("udp_bad_length", bytes(UDP(sport=67, dport=68, len=7))),
    ("udp_bad_length", bytes(UDP(sport=67, dport=68, len=200) / b"x")),
    ("udp_bad_checksum", bytes(UDP(sport=67, dport=68, chksum=0x1234) / b"x")),
])
def test_parse_errors_name_the_reason(reason, raw):
    with pytest.raises(Malformed) as e:
        UdpDatagram.parse(raw, SRC, DST)
    assert e.value.reason == reason


def test_registry_binds_once_and_refuses_bad_ports():
    r = UdpPorts(Counters())
    r.bind(68, lambda *a: None)
    with pytest.raises(ValueError, match="already bound"):
        r.bind(68, lambda *a: None)
    with pytest.raises(ValueError, match="1..65535"):
        r.bind(0, lambda *a: None)
    r.unbind(68)
    assert not r.bound(68)


def _dgram(dst=SERVER_IP, dport=5000, mac=SERVER_MAC, payload=b"hello", **kw):
    return bytes(Ether(src=CLIENT_MAC, dst=mac) / IP(src=CLIENT_IP, dst=dst) / UDP(sport=4000, dport=dport, **kw)
                 / payload)


def test_stack_delivers_to_the_bound_port_and_sends_checked_replies(stack):
    got = []

    def handler(src_mac, src_ip, dst_ip, sport, payload, now):
        got.append((src_mac, src_ip, dst_ip, sport, payload, now))
        stack.udp_send(src_mac, src_ip, 5000, sport, payload.upper())
    stack.udp.bind(5000, handler)
    stack.receive(memoryview(_dgram()), 3.0)
    assert got == [(bytes.fromhex("020000000002"), SRC, DST, 4000, b"hello", 3.0)]
    assert stack.counters["udp_in_datagrams"] == 1 and stack.counters["udp_out_datagrams"] == 1
    (f,) = stack.txq
    p = check_frame(bytes(f[0]))
    chk = p.copy()
    del chk[UDP].chksum
    assert Ether(bytes(chk))[UDP].chksum == p[UDP].chksum
    assert (p[IP].src, p[IP].dst, p[UDP].sport, p[UDP].dport, bytes(p[UDP].payload)) == \
        (SERVER_IP, CLIENT_IP, 5000, 4000, b"HELLO")
    assert p[Ether].dst == CLIENT_MAC


def test_broadcasts_reach_the_port_other_addresses_only_with_any_dst(stack):
    got = []
    stack.udp.bind(5000, lambda *a: got.append(a[2]))
    stack.udp.bind(68, lambda *a: got.append(a[2]), any_dst=True)
    stack.receive(_dgram(dst="255.255.255.255", mac="ff:ff:ff:ff:ff:ff"), 1.0)
    stack.receive(_dgram(dst="198.18.0.255"), 1.0)
    stack.receive(_dgram(dst="198.18.0.77"), 1.0)
    assert stack.counters["drop_ip_not_for_us"] == 1
    stack.receive(_dgram(dst="198.18.0.77", dport=68), 1.0)
    assert got == [b"\xff" * 4, ip_bytes("198.18.0.255"), ip_bytes("198.18.0.77")]


@pytest.mark.parametrize("reason,raw", [
    ("udp_closed_port", _dgram(dport=53)),
    ("udp_bad_checksum", _dgram(chksum=0x4321)),
    ("udp_bad_length", _dgram(len=100)),
    ("ip_bad_source", bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src="0.0.0.0", dst=SERVER_IP) /
                            UDP(dport=5000))),
])
def test_stack_drops_bad_datagrams_by_reason(stack, reason, raw):
    stack.udp.bind(5000, lambda *a: pytest.fail("delivered"))
    stack.receive(memoryview(raw), 1.0)
    assert stack.counters.drops() == {"drop_" + reason: 1}
    assert stack.txq == []
