"""HTTPS over IPv6, dual stack (appliance/stack/tls.py's TlsConn6), in memory: Python's
ssl client over memory BIOs in IPv6 frames (test_stack_tcp6.Client6; every frame
checked by scapy, TCP checksum over the IPv6 pseudo header) to a Stack whose
addresses come from its own SLAAC, beside IPv4 clients of the same TlsServer:
one certificate, one ticket key, one set of counters for both families."""
import ipaddress
import ssl

import pytest
from scapy.layers.inet import TCP
from scapy.layers.inet6 import IPv6

from appliance.stack.conn6 import Conn6
from appliance.stack.rings.base import Offload
from appliance.stack.tls import RECORD_OVERHEAD, TlsConn, TlsConn6, TlsServer
from tests.stack_support import SITE, expected, make_store
from tests.test_stack_tcp6 import PEER, Client6, v6stack
from tests.test_stack_tls import records
from tests.tls_support import TlsClient, client_context, make_cert


class TlsClient6(TlsClient, Client6):
    """TlsClient's TLS and pumping over Client6's IPv6 frames (port 443)."""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("tls6-site"), mss=1440)   # 1500 - 60


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(str(tmp_path_factory.mktemp("tls6-cert")))


def stack(store, cert, offload=Offload(), tls_kw=None, **cfg):
    return v6stack(store, offload, tls=TlsServer(cert[0], cert[1], **(tls_kw or {})), **cfg)


def conn_of(st, port):
    (c,) = [x for x in st.conns.values() if x.peer_port == port]
    return c


def connect6(st, cert, version=None, session=None, port=41000, ctx=None, **kw):
    c = TlsClient6(st, ctx or client_context(cert[0], version), session=session, port=port, **kw)
    c.connect()
    c.handshake()
    return c


@pytest.mark.parametrize("mode", ["sw", "tso"])
@pytest.mark.parametrize("version,name", [(ssl.TLSVersion.TLSv1_3, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")])
def test_https_over_ipv6_full_handshake_and_get(store, cert, version, name, mode):
    """Before TlsConn6 a SYN to 443 over IPv6 got a RST (tcp_closed_port)."""
    st = stack(store, cert, Offload(True, True) if mode == "tso" else Offload())
    c = TlsClient6(st, client_context(cert[0], version), port=41001)
    sa = c.connect()
    assert str(sa[TCP].flags) == "SA" and sa[TCP].sport == 443
    assert sa[IPv6].src == c.server and sa[IPv6].dst == PEER
    assert dict(sa[TCP].options)["MSS"] == 1440
    conn = conn_of(st, 41001)
    assert isinstance(conn, TlsConn6) and isinstance(conn, Conn6) and len(conn.key) == 36
    c.handshake()
    assert c.tls.version() == name and c.tls.selected_alpn_protocol() == "http/1.1"
    c.request(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.plain == expected(store, "/big.bin")
    frames = [p for p in c.frames if TCP in p]
    assert all(IPv6 in p and p[TCP].sport == 443 for p in frames)
    gsos = [f[2] for f in c.raw_frames if f[2] is not None]
    if mode == "tso":                                   # ciphertext in TCPV6 super-frames, TCP at 54
        assert gsos and all(g.csum_start == 54 and g.csum_offset == 16 for g in gsos)
        assert any(g.gso_size == 1440 and g.hdr_len == 74 and g.gso_type == 4 for g in gsos)
    else:
        assert not gsos and st.counters["tcp_tx_sw_csum"] > 0      # ciphertext: summed in software
    assert max(len(p[TCP].payload) for p in frames) == 1440
    cnt = st.counters
    assert cnt["tls_handshakes_full"] == 1 and cnt["tls_version_" + name] == 1
    assert cnt["tls_bytes_encrypted"] == len(c.plain)
    assert cnt["drop_tcp_closed_port"] == 0 and cnt["drop_tcp_bad_checksum"] == 0
    assert cnt["tls_sni_mismatch"] == 0 and not st.tls.handshaking


def test_dual_stack_shares_tickets_and_counters(store, cert):
    """A TLS 1.3 ticket issued over IPv4 resumes over IPv6 and back: one TlsServer."""
    st = stack(store, cert)
    ctx = client_context(cert[0])
    c4 = TlsClient(st, ctx, port=41010)
    c4.connect()
    assert isinstance(conn_of(st, 41010), TlsConn) and not isinstance(conn_of(st, 41010), Conn6)
    c4.handshake()
    c4.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c4.plain == expected(store, "/")
    c6 = connect6(st, cert, session=c4.tls.session, port=41011, ctx=ctx)
    assert c6.tls.session_reused
    c6.request(b"GET /odd.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c6.plain == expected(store, "/odd.txt")
    c6b = connect6(st, cert, port=41012, ctx=ctx)                 # a full one over IPv6, resumed over IPv4
    c6b.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    c4b = TlsClient(st, ctx, session=c6b.tls.session, port=41013)
    c4b.connect()
    c4b.handshake()
    assert c4b.tls.session_reused
    cnt = st.counters
    assert cnt["tls_handshakes_full"] == 2 and cnt["tls_handshakes_resumed"] == 2
    # and port 80 over IPv6 beside it
    h = Client6(st, port=41014)
    h.connect()
    body, _ = h.get("/")
    assert body == expected(store, "/")


def test_sni_mismatch_and_missing_counted_over_ipv6(store, cert):
    st = stack(store, cert)
    ctx = client_context(cert[0])
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c = TlsClient6(st, ctx, server_hostname="other.invalid", port=41020)
    c.connect()
    c.handshake()
    c.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.plain == expected(store, "/")               # served all the same
    c2 = TlsClient6(st, ctx, server_hostname=None, port=41021)
    c2.connect()
    c2.handshake()
    assert st.counters["tls_sni_mismatch"] == 1 and st.counters["tls_sni_missing"] == 1


def test_small_records_fill_one_ipv6_segment(store, cert):
    """Dynamic record sizing on the IPv6 SMSS: each small record is SMSS - 22 bytes of
    plaintext (TLS 1.3), i.e. exactly one 1440-byte segment; then 16 KB records."""
    st = stack(store, cert, tls_kw={"small_records": 4})
    c = connect6(st, cert, port=41030)
    start = len(c.ciphertext)
    n0 = len(c.frames)
    c.request(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.plain == expected(store, "/big.bin")
    recs = records(c.ciphertext[start:])
    assert [n for _, n in recs[:4]] == [1440 - 5] * 4     # 1440 - 22 plaintext + 17 (tag, type)
    assert conn_of(st, 41030).tls.small == 1440 - RECORD_OVERHEAD["TLSv1.3"]
    segs = [len(p[TCP].payload) for p in c.frames[n0:] if TCP in p and len(p[TCP].payload)]
    assert segs[:4] == [1440] * 4


def test_loss_over_ipv6_retransmits_from_the_ciphertext_queue(store, cert):
    st = stack(store, cert)
    c = connect6(st, cert, port=41040)
    seen = set()

    def drop(p):                                         # every 3rd data segment, the first time
        s = p[TCP].seq
        if s in seen:
            return False
        seen.add(s)
        return len(seen) % 3 == 0
    c.drop = drop
    c.request(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    for _ in range(40):
        if c.plain == expected(store, "/big.bin"):
            break
        c.pump(c.run_until(c.now + 1.0))
        c.read_all()
    assert c.plain == expected(store, "/big.bin")
    assert st.counters["tcp_retransmits"] > 0


def test_close_notify_then_fin_over_ipv6(store, cert):
    st = stack(store, cert)
    c = connect6(st, cert, port=41050)
    c.request(b"GET /empty.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert c.plain == expected(store, "/empty.txt", close=True)
    assert c.read_all() or c.fin
    assert c.fin and records(c.ciphertext)[-1][0] == 23


def test_syn_cookie_on_443_over_ipv6(store, cert):
    """The cookie SYN-ACK comes from port 443 (not the site's) and its ACK opens a TlsConn6."""
    st = stack(store, cert, syncookies="always")
    c = connect6(st, cert, port=41060)
    assert c.synack[TCP].sport == 443 and st.counters["tcp_syncookies_accepted"] == 1
    assert isinstance(conn_of(st, 41060), TlsConn6)
    c.request(b"GET /odd.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.plain == expected(store, "/odd.txt")


def test_redirect_over_ipv6_points_to_https_over_ipv6_which_answers(store, cert):
    from appliance.http.redirect import redirect_factory
    st = v6stack(store, tls=TlsServer(cert[0], cert[1]),
                 http_factory=redirect_factory(store.site, store.blob, "www.test"))
    h = Client6(st, port=41070)
    h.connect()
    host = f"[{h.server}]"
    out = h.send("PA", data=f"GET /odd.txt?x=1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    body, _ = h.fetch(out)
    assert body.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n")
    loc = body.split(b"\r\nLocation: ", 1)[1].split(b"\r\n", 1)[0].decode()
    assert loc == f"https://{host}/odd.txt?x=1"
    assert ipaddress.IPv6Address(loc[9:].split("]")[0]).packed in st.ip6.addrs
    c = connect6(st, cert, port=41071)                  # following it: HTTPS to the same address
    c.request(f"GET /odd.txt?x=1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert c.plain.startswith(b"HTTP/1.1 200 ") and c.plain.endswith(expected(store, "/odd.txt").split(
        b"\r\n\r\n", 1)[1])


def _logged(st):
    """An Observer on `st` whose combined access log lines collect in a list: (observer, lines)."""
    from appliance.obs import Observer
    from appliance.obs.accesslog import AccessLog
    lines = []

    class Sink:
        def write(self, batch, now, wall):
            lines.extend(batch)
    return Observer(st, log=AccessLog(Sink(), "combined", 1, st.counters)).install(), lines


def test_access_log_https_lines_over_both_families(store, cert):
    """One line per HTTPS response, written once its last record is acknowledged, with
    the client's address of either family, tls=1 and the plaintext bytes (HSTS included);
    plain HTTP over IPv6 beside it has tls=0."""
    st = stack(store, cert, tls_kw={"hsts": 600})
    obs, lines = _logged(st)
    c6 = connect6(st, cert, port=41080)
    c6.request(b"GET /big.bin HTTP/1.1\r\nHost: t\r\nUser-Agent: six\r\n\r\n"
               b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
    obs.flush(c6.now)
    c4 = TlsClient(st, client_context(cert[0]), port=41081)
    c4.connect()
    c4.handshake()
    c4.request(b"GET /odd.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    h = Client6(st, port=41082)
    h.connect()
    h.get("/")
    obs.flush(h.now)
    assert len(lines) == 4, lines
    (l1, l2, l3, l4) = sorted(lines, key=lambda ln: ln.split("port=")[1])
    assert l1.startswith(PEER + " ") and '"GET /big.bin HTTP/1.1" 200 %d "-" "six"' % (24 * 1024) in l1
    assert l1.endswith("tls=1") and l2.startswith(PEER + " ") and '"GET /nope HTTP/1.1" 404' in l2
    assert l2.endswith("tls=1")
    assert l3.startswith("198.18.0.2 ") and '"GET /odd.txt HTTP/1.1" 200 4383' in l3 and l3.endswith("tls=1")
    assert l4.startswith(PEER + " ") and '"GET / HTTP/1.1" 200' in l4 and l4.endswith("tls=0")
    # bytes= is the plaintext of the response as encrypted: the header with HSTS + body
    sent = int(l1.split(" bytes=")[1].split()[0])
    assert sent == c6.plain.index(b"HTTP/1.1 404")
    assert b"Strict-Transport-Security: max-age=600" in c6.plain[:sent]
    assert c6.plain[:sent].endswith(b"\r\n\r\n" + SITE["big.bin"])
    assert st.counters["http_responses_2xx"] == 3 and st.counters["http_responses_4xx"] == 1


def test_access_log_https_reply_never_encrypted_is_logged_when_reset(store, cert):
    """A reply still waiting to be encrypted (the ciphertext queue is full) when the
    client resets: logged at the next tick with the bytes acknowledged (none)."""
    st = stack(store, cert, tls_kw={"queue_max": 4096})
    obs, lines = _logged(st)
    c = connect6(st, cert, port=41090)
    c.tls.write(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n" * 2)
    c.send_bytes(c.co.read())                            # not ACKed: the second waits in the store
    conn = conn_of(st, 41090)
    assert len(conn.tls.pending) == 1 and obs.n_tls_wait == 1 and len(obs.pending) == 1
    c.send("R")
    assert conn.state == 9                               # CLOSED
    obs.tick(c.now)
    obs.flush(c.now)
    assert obs.n_tls_wait == 0 and not obs.tls_wait
    assert len(lines) == 2
    for line in lines:
        assert '"GET /big.bin HTTP/1.1" 200 - ' in line and " bytes=0 " in line and line.endswith("tls=1")


def test_packet_too_big_shrinks_small_records_with_smss(store, cert):
    """RFC 8201 §4 on an HTTPS connection: SMSS 1440 -> 1340; the ciphertext in flight
    is resent in 1340-byte segments (byte-exact), and the next response's small
    records (after an idle second) are 1340 - 22 bytes of plaintext: still one
    record per segment."""
    from tests.test_stack_tcp6 import _ptb
    st = stack(store, cert, tls_kw={"small_records": 4})
    c = connect6(st, cert, port=41100)
    c.tls.write(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    out = c.send_bytes(c.co.read())
    segs = [p for p in out if TCP in p and len(p[TCP].payload)]
    assert len(segs[0][TCP].payload) == 1440
    back = c.deliver(_ptb(c, 1400, segs[0]))
    conn = conn_of(st, 41100)
    assert st.counters["tcp_pmtu_lowered"] == 1 and conn.mss == 1340
    assert conn.tls.small == 1340 - RECORD_OVERHEAD["TLSv1.3"]
    assert all(len(p[TCP].payload) <= 1340 for p in back if TCP in p)
    c.pump(out + back)
    c.read_all()
    assert c.plain == expected(store, "/big.bin")
    c.plain = b""
    c.advance(1.5)                                  # idle: small records again (dyn_rec_timeout)
    start = len(c.ciphertext)
    n0 = len(c.frames)
    c.request(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.plain == expected(store, "/big.bin")
    assert [n for _, n in records(c.ciphertext[start:])[:4]] == [1340 - 5] * 4
    assert [len(p[TCP].payload) for p in c.frames[n0:] if TCP in p and len(p[TCP].payload)][:4] == [1340] * 4
