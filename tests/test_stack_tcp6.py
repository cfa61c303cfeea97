"""TCP over IPv6 (RFC 8200 §8.1, RFC 9293), dual stack on the same port, in-memory
with a fake clock. The client is tests.stack_support.Client with IPv6 frames;
every frame the stack sends is checked by scapy (IPv6 payload length, TCP
checksum over the IPv6 pseudo header recomputed by scapy). The stack's
addresses come from its own control plane (link-local, then SLAAC from a
router advertisement, each after DAD)."""
import ipaddress
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st_
from scapy.layers.inet import TCP
from scapy.layers.inet6 import ICMPv6NDOptPrefixInfo, ICMPv6ND_RA, ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

from appliance.stack.conn import FIN_WAIT_2, Conn6
from appliance.stack.ipv6 import Ip6Config
from appliance.stack.rings.base import Offload
from tests.test_stack_fuzz import consistent
from tests.stack_support import SERVER_MAC, Client, assemble, expected, make_stack, make_store

M = 0xFFFFFFFF
MODES = {"sw": Offload(), "csum": Offload(True, False), "tso": Offload(True, True)}
PEER = "2001:2:0:7::2"
PEER_MAC = "02:00:00:00:00:22"
RLL = "fe80::1"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # cut at 1440 = 1500 - 60: the stored per-segment sums serve IPv6 segments as they are
    return make_store(tmp_path_factory.mktemp("tcp6"), mss=1440)


@pytest.fixture(scope="module")
def store1460(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("tcp6v4"))


def _drain(st):
    st.txq.clear()


def v6stack(store, offload=Offload(), **cfg):
    """A Stack with a preferred link-local and a SLAAC address in 2001:2:0:7::/64."""
    st = make_stack(store, offload, **cfg)
    st.enable_ipv6(b"rfc7217-test-secret", Ip6Config(), random.Random(5))
    st.start(0.0)
    now = 0.0
    while now < 3.0:
        now = min(st.poll(now), 3.0) if st.poll(now) > now else now + 0.01
        _drain(st)
    ra = (Ether(src="02:00:00:00:00:fe", dst="33:33:00:00:00:01") / IPv6(src=RLL, dst="ff02::1", hlim=255)
          / ICMPv6ND_RA(routerlifetime=1800) / ICMPv6NDOptPrefixInfo(prefix="2001:2:0:7::", prefixlen=64,
                                                                        validlifetime=3600, preferredlifetime=1800))
    st.receive(memoryview(bytes(ra)), 3.0)
    now = 3.0
    while now < 7.0:
        d = st.poll(now)
        now = d if d > now else now + 0.01
        _drain(st)
    st.events.clear()
    assert any(a.how == "slaac" and a.state == "preferred" for a in st.ip6.addrs.values())
    return st


def global_addr(st):
    return str(ipaddress.IPv6Address(next(a for a, x in st.ip6.addrs.items() if x.how == "slaac")))


class Client6(Client):
    """Client with Ether/IPv6/TCP frames to the stack's SLAAC address."""

    def __init__(self, stack, port=40000, ip=PEER, mac=PEER_MAC, now=1000.0, mss=1440, **kw):
        super().__init__(stack, port=port, ip=ip, mac=mac, now=now, mss=mss, **kw)
        self.server = global_addr(stack)

    def seg(self, flags="A", seq=None, ack=None, data=b"", window=None, options=None, sport=None, dport=80):
        t = TCP(sport=sport or self.port, dport=dport, flags=flags,
                seq=self.seq if seq is None else seq, ack=self.ack if ack is None else ack,
                window=self.window if window is None else window, options=options or [])
        return Ether(src=self.mac, dst=SERVER_MAC) / IPv6(src=self.ip, dst=self.server) / t / data


def tcp(frames, flags=None):
    return [p for p in frames if TCP in p and (flags is None or str(p[TCP].flags) == flags)]


def conn_of(c):
    (conn,) = [x for x in c.st.conns.values() if x.peer_port == c.port]
    return conn


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("path", ["/", "/big.bin", "/odd.txt"])
def test_handshake_and_get_over_ipv6_exact_bytes(store, mode, path):
    """SYN-ACK with MSS = MTU - 60 from the address the SYN went to; a multi-segment GET
    byte-exact; mode 0 from the stored sums (no software checksum), modes 1/2 with
    NEEDS_CSUM / GSO TCPV6 descriptors (TCP at 54, 74-byte headers)."""
    st = v6stack(store, MODES[mode])
    c = Client6(st)
    sa = c.connect()
    assert sa[IPv6].src == c.server and sa[IPv6].dst == PEER and sa[Ether].dst == PEER_MAC
    assert dict(sa[TCP].options) == {"MSS": 1440, "NOP": None, "WScale": 0}
    conn = conn_of(c)
    assert isinstance(conn, Conn6) and conn.mss == 1440 and len(conn.key) == 36
    assert conn.peer_ip == ipaddress.IPv6Address(PEER).packed
    data, frames = c.get(path)
    assert data == expected(store, path)
    assert st.counters["tcp_tx_sw_csum"] == 0 and st.counters["drop_tcp_bad_checksum"] == 0
    assert all(IPv6 in p for p in frames)
    for p in tcp(frames):
        assert len(p[TCP].payload) <= 1440
    gsos = [f[2] for f in c.raw_frames if f[2] is not None]
    if mode == "sw":
        assert not gsos
    else:
        assert gsos and all(g.csum_start == 54 and g.csum_offset == 16 for g in gsos)
        if mode == "tso" and path == "/big.bin":
            assert any(g.gso_size == 1440 and g.hdr_len == 74 and g.gso_type == 4 for g in gsos)


def test_no_mss_option_means_1220_and_store_cut_mismatch_sums_in_software(store1460):
    """RFC 9293 §3.7.1: without the option the IPv6 default is 1220; a store cut at 1460
    does not fit IPv6 segments of 1440: the payload is summed in software, still right."""
    st = v6stack(store1460)
    c = Client6(st)
    c.connect(options=[])
    assert conn_of(c).mss == 1220
    data, frames = c.get("/big.bin")
    assert data == expected(store1460, "/big.bin")
    assert max(len(p[TCP].payload) for p in tcp(frames)) == 1220
    assert st.counters["tcp_tx_sw_csum"] > 0


def test_keep_alive_and_pipelining_over_ipv6(store):
    st = v6stack(store)
    c = Client6(st)
    c.connect()
    for path in ("/", "/odd.txt"):
        data, _ = c.get(path)
        assert data == expected(store, path)
    out = c.send("PA", data=c.request("/") + c.request("/big.bin") + c.request("/odd.txt"))
    data, _ = c.fetch(out)
    assert data == expected(store, "/") + expected(store, "/big.bin") + expected(store, "/odd.txt")


def test_dual_stack_same_port_ipv4_and_ipv6_side_by_side(store):
    """One Stack serves the same site on port 80 over IPv4 and IPv6 at once."""
    st = v6stack(store)
    c4 = Client(st, port=40001)
    c6 = Client6(st, port=40001)
    c4.connect()
    c6.connect()
    assert len(st.conns) == 2
    d6, _ = c6.get("/big.bin")
    d4, f4 = c4.get("/big.bin")
    assert d4 == d6 == expected(store, "/big.bin")
    assert all(IPv6 not in p for p in f4)
    # both sources completed a handshake: the SYN gates trust them (an IPv4 address, an IPv6 /64), the newest last
    assert list(st.syn_trusted) == [ipaddress.IPv4Address(c4.ip).packed, ipaddress.IPv6Address(PEER).packed[:8]]


def test_fin_wait_time_wait_over_ipv6(store):
    """RFC 9293 §3.6 with the 36-byte key: FIN-WAIT-2, TIME-WAIT, the retransmitted FIN
    acknowledged again (from our IPv6 address), RST ignored (RFC 1337), 2*MSL expiry."""
    st = v6stack(store)
    c = Client6(st)
    c.connect()
    out = c.send("PA", data=c.request("/", b"Connection: close\r\n"))
    assert "F" in tcp(out)[-1][TCP].flags
    data, _ = c.fetch(out)
    assert data == expected(store, "/", close=True)
    assert conn_of(c).state == FIN_WAIT_2
    c.send("FA")
    assert not st.conns and [len(k) for k in st.tw] == [36]
    (a,) = c.send("FA", seq=c.seq - 1, advance=False)
    assert a[TCP].flags == "A" and a[TCP].ack == c.seq and a[IPv6].src == c.server
    assert c.send("R", seq=c.seq, advance=False) == []
    c.run_until(c.now + 61)
    assert not st.tw


def test_rst_for_a_closed_port_and_a_stray_ack_over_ipv6(store):
    """RFC 9293 §3.10.7.1: a SYN to a closed port gets RST|ACK, a stray ACK gets RST."""
    st = v6stack(store)
    c = Client6(st)
    (r,) = c.send("S", dport=81, advance=False)
    assert r[TCP].flags == "RA" and r[TCP].ack == c.seq + 1 and r[TCP].sport == 81 and r[IPv6].src == c.server
    (r,) = c.send("A", ack=12345, advance=False)
    assert r[TCP].flags == "R" and r[TCP].seq == 12345
    assert st.counters["drop_tcp_closed_port"] == 1 and st.counters["drop_tcp_ack_no_connection"] == 1


def test_syn_cookies_over_ipv6(store):
    """RFC 4987 §3.6 keyed by the 36-byte key: no state until the ACK, then the GET is served;
    a forged cookie gets a RST."""
    st = v6stack(store, syncookies="always")
    c = Client6(st)
    (sa,) = c.syn()
    assert not st.conns and sa[TCP].options == [("MSS", 1440)] and sa[IPv6].src == c.server
    c.ack = (sa[TCP].seq + 1) & M
    out = c.send("PA", data=c.request("/big.bin"))
    assert st.counters["tcp_syncookies_accepted"] == 1
    assert isinstance(conn_of(c), Conn6)
    data, _ = c.fetch(out)
    assert data == expected(store, "/big.bin")
    bad = Client6(st, port=40002)
    bad.syn()
    bad.ack = 777
    (r,) = bad.send("A")
    assert r[TCP].flags == "R" and st.counters["tcp_syncookies_accepted"] == 1


def test_rfc5961_checks_over_ipv6(store):
    st = v6stack(store)
    c = Client6(st)
    c.connect()
    (a,) = c.send("R", seq=c.seq + 10, advance=False)
    assert a[TCP].flags == "A" and st.counters["tcp_challenge_acks"] == 1
    (a,) = c.send("S", seq=c.seq + 5, advance=False)
    assert a[TCP].flags == "A" and st.counters["tcp_challenge_acks"] == 2
    assert c.send("R", advance=False) == [] and not st.conns


def _ptb(c, mtu, quoted, sport=None):
    """An ICMPv6 Packet Too Big from a router, quoting the start of `quoted` (one of our frames)."""
    inner = bytearray(bytes(quoted[IPv6])[:1232])
    if sport is not None:
        inner[40:42] = sport.to_bytes(2, "big")
    inner = bytes(inner)
    return (Ether(src="02:00:00:00:00:fe", dst=SERVER_MAC) / IPv6(src="2001:2:0:7::1", dst=c.server)
            / ICMPv6PacketTooBig(mtu=mtu) / inner)


def test_packet_too_big_lowers_smss_and_resends_smaller(store):
    """RFC 8201 §4 / RFC 4443 §3.2: a Packet Too Big quoting a segment in flight lowers the
    connection's SMSS to MTU - 60 and what is in flight is sent again in that size; one that
    quotes nothing in flight, or an MTU below 1280, does not go lower than 1220."""
    st = v6stack(store)
    c = Client6(st)
    c.connect()
    out = c.send("PA", data=c.request("/big.bin"))
    segs = [p for p in tcp(out) if len(p[TCP].payload)]
    assert len(segs[0][TCP].payload) == 1440
    assert c.deliver(_ptb(c, 1300, segs[0], sport=81)) == []         # not our connection: ignored
    assert conn_of(c).mss == 1440 and st.counters["drop_icmp6_too_big_no_connection"] == 1
    back = c.deliver(_ptb(c, 1400, segs[0]))
    assert st.counters["tcp_pmtu_lowered"] == 1 and conn_of(c).mss == 1340
    resent = [p for p in tcp(back) if len(p[TCP].payload)]
    assert resent and resent[0][TCP].seq == segs[0][TCP].seq
    assert all(len(p[IPv6]) <= 1400 for p in back)
    back = c.deliver(_ptb(c, 1000, resent[0]))           # below the IPv6 minimum: 1280
    assert conn_of(c).mss == 1220
    _, late = c.fetch(tcp(back))
    late = [p for p in tcp(late) if len(p[TCP].payload)]
    assert late and max(len(p[TCP].payload) for p in late) == 1220
    stream = {}
    for p in tcp(c.frames):
        if len(p[TCP].payload):
            stream[p[TCP].seq] = bytes(p[TCP].payload)
    assert assemble(stream, segs[0][TCP].seq) == expected(store, "/big.bin")


def test_malformed_ipv6_tcp_is_counted_not_served(store):
    st = v6stack(store)
    c = Client6(st)
    raw = bytearray(bytes(c.seg("S", options=[("MSS", 1440)])))
    raw[-1] ^= 0xFF                                      # bad checksum
    assert c.deliver(bytes(raw)) == [] and st.counters["drop_tcp_bad_checksum"] == 1
    raw = bytearray(bytes(c.seg("S")))
    raw[18:20] = (2000).to_bytes(2, "big")               # payload length beyond the frame
    assert c.deliver(bytes(raw)) == [] and st.counters["drop_ip6_bad_length"] == 1
    c.ip = "ff02::1"                                     # multicast source
    assert c.deliver(c.seg("S")) == [] and st.counters["drop_ip6_bad_source"] == 1
    assert not st.conns


@pytest.fixture(scope="module")
def fuzz_stack(store):
    return v6stack(store)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=st_.lists(st_.tuples(st_.integers(0, 200), st_.integers(0, 255)), min_size=1, max_size=6),
       kind=st_.sampled_from(["syn", "ack", "data", "fin", "rst"]), cut=st_.integers(0, 30))
def test_fuzz_mutated_ipv6_tcp_frames(fuzz_stack, muts, kind, cut):
    """Bit-mutated and truncated IPv6/TCP segments of a live connection: no exception, every
    emitted frame valid (scapy), the table consistent; a new connection is then served."""
    st = fuzz_stack
    c = Client6(st, port=41000)
    c.connect()
    frame = {"syn": c.seg("S", options=[("MSS", 1440), ("WScale", 7)]), "ack": c.seg("A"),
             "data": c.seg("PA", data=c.request("/")), "fin": c.seg("FA"), "rst": c.seg("R")}[kind]
    raw = bytearray(bytes(frame))
    for i, v in muts:
        raw[i % len(raw)] = v
    c.deliver(bytes(raw[:len(raw) - cut]))
    consistent(st)
    st.shutdown()                                       # RST everything; the next example starts clean
    c.collect()
    st.tw.clear()
    assert not st.conns
    d = Client6(st, port=42000)
    d.connect()
    data, _ = d.get("/odd.txt")
    assert data == expected(st.store, "/odd.txt")
    st.shutdown()
    d.collect()
    st.tw.clear()
    consistent(st)
