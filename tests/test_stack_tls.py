"""HTTPS in the stack (appliance/stack/tls.py), in memory: Python's ssl client over
memory BIOs talks to a Stack through scapy-checked frames with a fake clock."""
import json
import ssl
import struct

import pytest
from scapy.layers.inet import TCP

from appliance.http import HTTPConnection, reply_bytes
from appliance.stack.iface import imf_fixdate
from appliance.stack.tls import MAX_RECORD, RECORD_OVERHEAD, TlsServer, _FILL_CHUNK, record_plan
from tests.stack_support import NOW_UNIX, Client, expected, make_store
from tests.tls_support import TlsClient, client_context, make_ca, make_cert, tls_stack


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("tls-site"))


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(str(tmp_path_factory.mktemp("tls-cert")))


def reference(store, raw: bytes) -> bytes:
    """What the plain-HTTP layer answers to `raw` (the bytes inside the tunnel must be these)."""
    d = imf_fixdate(NOW_UNIX)
    h = HTTPConnection(store.site, store.blob)
    h.now(d)
    return b"".join(reply_bytes(r, store.blob, d) for r in h.receive(raw))


def connect(st, cert, version=None, session=None, port=40000, **kw):
    c = TlsClient(st, client_context(cert[0], version), session=session, port=port, **kw)
    c.connect()
    c.handshake()
    return c


def records(stream: bytes):
    """(content type, length) of every TLS record in a ciphertext stream."""
    out = []
    i = 0
    while i + 5 <= len(stream):
        t, _, n = struct.unpack_from("!BHH", stream, i)
        out.append((t, n))
        i += 5 + n
    assert i == len(stream), "the stream ends inside a record"
    return out


@pytest.mark.parametrize("version,name", [(ssl.TLSVersion.TLSv1_3, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")])
def test_full_handshake_and_get(store, cert, version, name):
    st = tls_stack(store, cert)
    c = connect(st, cert, version)
    assert c.tls.version() == name
    assert c.tls.selected_alpn_protocol() == "http/1.1"
    ciph = c.tls.cipher()[0]
    if name == "TLSv1.2":
        assert ciph.startswith("ECDHE-") and ("GCM" in ciph or "CHACHA20" in ciph)
    c.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.plain == expected(store, "/")
    cnt = st.counters
    assert cnt["tls_handshakes_full"] == 1 and cnt["tls_handshakes_resumed"] == 0
    assert cnt["tls_version_" + name] == 1 and cnt["tls_cipher_" + ciph] == 1
    assert cnt["tls_bytes_encrypted"] == len(c.plain)
    assert cnt["tls_sni_mismatch"] == 0 and cnt["tls_sni_missing"] == 0
    assert not st.tls.handshaking
    # the key never appears in the counters
    key_body = "".join(open(cert[1]).read().splitlines()[1:-1])
    assert key_body[:40] not in json.dumps(cnt.as_dict())


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_resumption(store, cert, version):
    st = tls_stack(store, cert)
    ctx = client_context(cert[0], version)
    c = TlsClient(st, ctx, port=40001)
    c.connect()
    c.handshake()
    c.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")       # (TLS 1.3 tickets come after the handshake)
    assert c.plain == expected(store, "/")
    sess = c.tls.session
    assert sess is not None and (sess.has_ticket or version == ssl.TLSVersion.TLSv1_2)
    assert not c.tls.session_reused
    c2 = TlsClient(st, ctx, session=sess, port=40002)
    c2.connect()
    c2.handshake()
    assert c2.tls.session_reused
    c2.request(b"GET /odd.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c2.plain == expected(store, "/odd.txt")
    assert st.counters["tls_handshakes_full"] == 1
    assert st.counters["tls_handshakes_resumed"] == 1


def test_ticket_rotation_falls_back_to_full_handshake(store, cert):
    st = tls_stack(store, cert, tls_kw={"ticket_rotate": 100.0, "now": 1000.0})
    ctx = client_context(cert[0])
    c = TlsClient(st, ctx, port=40003)
    c.connect()
    c.handshake()
    c.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    sess = c.tls.session
    c2 = TlsClient(st, ctx, session=sess, port=40004, now=1200.0)   # past the rotation
    c2.connect()
    c2.handshake()
    assert not c2.tls.session_reused
    assert st.counters["tls_ticket_key_rotations"] == 1
    assert st.counters["tls_handshakes_full"] == 2


def test_pipelined_keepalive_conditional_range_gzip(store, cert):
    st = tls_stack(store, cert)
    c = connect(st, cert)
    etag = store.site.resources["/big.bin"].etag.decode()
    raw = (b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n"
           b"GET /odd.txt HTTP/1.1\r\nHost: t\r\nRange: bytes=10-99\r\n\r\n"
           + f"GET /big.bin HTTP/1.1\r\nHost: t\r\nIf-None-Match: {etag}\r\n\r\n".encode()
           + b"GET /index.html HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n"
           b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"
           b"HEAD /odd.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    c.request(raw)
    ref = reference(store, raw)
    assert b" 206 " in ref and b" 304 " in ref and b" 404 " in ref
    assert c.plain == ref
    c.plain = b""
    c.request(b"GET /empty.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert c.plain == expected(store, "/empty.txt", close=True)
    assert c.read_all() or c.fin
    assert c.fin                                    # close_notify, then our FIN
    assert records(c.ciphertext)[-1][0] == 23       # (1.3: the alert is an encrypted record)


def test_dynamic_record_sizing(store, cert):
    """The first records of a response fill one segment each; then full-size records."""
    st = tls_stack(store, cert, tls_kw={"small_records": 4})
    c = connect(st, cert)
    start = len(c.ciphertext)
    c.request(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.plain == expected(store, "/big.bin")
    recs = [n for t, n in records(c.ciphertext[start:]) if t == 23]
    ov = RECORD_OVERHEAD["TLSv1.3"]
    small = st.tls.small_records
    conn = next(iter(st.conns.values()))
    assert recs[:small] == [conn.mss - 5] * small            # record = one MSS segment
    assert max(recs[small:]) == MAX_RECORD + ov - 5
    total_plain = sum(n - (ov - 5) for n in recs)
    assert total_plain == len(c.plain)
    assert [n - (ov - 5) for n in recs] == record_plan(len(c.plain), conn.mss - ov, small)
    # and on the wire: the first segments of the response are full and each holds one record
    segs = [p for p in c.frames if TCP in p and len(p[TCP].payload)][-len(recs):]
    assert any(len(p[TCP].payload) == conn.mss for p in segs)


def test_small_records_only_at_start_and_after_idle(store, cert):
    """Dynamic record sizing per connection (as ssl_dyn_rec): small records at the start
    of a connection; a keep-alive response right after the previous one is cut in 16 KB
    records; after more than dyn_rec_timeout (1 s) of idle, small records again. The
    count runs across responses: a short response uses up only its own records."""
    st = tls_stack(store, cert, tls_kw={"small_records": 4})
    c = connect(st, cert)
    conn = next(iter(st.conns.values()))
    small = conn.mss - RECORD_OVERHEAD["TLSv1.3"]
    big = expected(store, "/big.bin")
    assert len(big) > 4 * small + MAX_RECORD

    def get(path):
        start = len(c.ciphertext)
        n0 = len(c.frames)
        c.plain = b""
        c.request(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert c.plain == expected(store, path)
        segs = [len(p[TCP].payload) for p in c.frames[n0:] if TCP in p and len(p[TCP].payload)]
        return [n - 17 for t, n in records(c.ciphertext[start:]) if t == 23], segs

    recs, segs = get("/big.bin")                             # a fresh connection: small first
    assert recs == record_plan(len(big), small, 4) and recs[:4] == [small] * 4
    assert segs[:4] == [conn.mss] * 4                        # each small record is one segment
    c.advance(0.05)
    recs, _ = get("/big.bin")                                # busy keep-alive: 16 KB records
    assert recs == record_plan(len(big), small, 0) and recs[0] == MAX_RECORD
    c.advance(1.5)                                           # idle > 1 s
    page = expected(store, "/")
    assert len(page) < small
    recs, _ = get("/")                                       # uses one small record of the four
    assert recs == [len(page)]
    c.advance(0.05)
    recs, segs = get("/big.bin")                             # three small ones left, then 16 KB
    assert recs == record_plan(len(big), small, 3) and recs[:3] == [small] * 3
    assert segs[:3] == [conn.mss] * 3
    c.advance(0.05)
    recs, _ = get("/big.bin")
    assert recs == record_plan(len(big), small, 0)
    assert st.counters["drop_internal_error"] == 0


def test_loss_retransmission_byte_exact(store, cert):
    st = tls_stack(store, cert)
    c = connect(st, cert)
    seen = set()

    def drop(p):
        s = p[TCP].seq
        if s in seen:
            return False                            # the retransmission arrives
        seen.add(s)
        return len(seen) % 3 == 0                   # every third new segment is lost
    c.drop = drop
    raw = b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\nGET /odd.txt HTTP/1.1\r\nHost: t\r\n\r\n"
    c.tls.write(raw)
    c.pump(c.send_bytes(c.co.read()))
    for _ in range(60):
        c.read_all()
        if len(c.plain) >= len(reference(store, raw)):
            break
        c.pump(c.advance(1.0))                      # RTOs resend from the ciphertext queue
    assert c.plain == reference(store, raw)
    assert st.counters["tcp_retransmits"] > 0


def test_garbage_on_443_and_port_80_unaffected(store, cert):
    st = tls_stack(store, cert)
    h = Client(st, port=41000)
    h.connect()
    g = TlsClient(st, client_context(cert[0]), port=41001)
    g.connect()
    g.pump(g.send("PA", data=b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"))   # plain HTTP to the TLS port
    assert g.fin                                    # answered (alert) and closed
    assert any(k.startswith("tls_handshake_failed_") for k in st.counters.as_dict())
    g2 = TlsClient(st, client_context(cert[0]), port=41002)
    g2.connect()
    g2.pump(g2.send("PA", data=bytes(range(256)) * 4))
    assert g2.fin
    body, _ = h.get("/odd.txt")
    assert body == expected(store, "/odd.txt")
    assert st.counters["drop_internal_error"] == 0
    assert not st.tls.handshaking


def test_handshake_failures_counted_by_alert(store, cert, tmp_path):
    st = tls_stack(store, cert)
    other_ca = make_ca(str(tmp_path))
    c = TlsClient(st, client_context(other_ca[0]), port=41010)    # does not trust our certificate
    c.connect()
    with pytest.raises(ssl.SSLCertVerificationError):
        c.handshake()
    c.pump(c.send_bytes(c.co.read()))                # its alert
    assert st.counters["tls_handshake_failed_tlsv1_alert_unknown_ca"] == 1
    # a downgrade: a client that offers TLS 1.1 at most
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    try:
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ssl.SSLError, ValueError):
        pytest.skip("this OpenSSL cannot build a TLS 1.1 ClientHello")
    d = TlsClient(st, old, port=41011)
    d.connect()
    with pytest.raises(ssl.SSLError):
        d.handshake()
    assert st.counters["tls_handshake_failed_unsupported_protocol"] == 1
    assert d.fin
    assert not st.tls.handshaking


def test_sni_mismatch_is_served_and_counted(store, cert):
    st = tls_stack(store, cert)
    ctx = client_context(cert[0])
    ctx.check_hostname = False
    c = connect_ctx = TlsClient(st, ctx, server_hostname="other.invalid", port=41020)
    c.connect()
    c.handshake()
    c.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.plain == expected(store, "/")
    c2 = TlsClient(st, client_context(cert[0]), server_hostname="a.example.test", port=41021)
    c2.connect()
    c2.handshake()                                   # the wildcard name matches
    assert st.counters["tls_sni_mismatch"] == 1
    del connect_ctx


def test_clienthello_flood_bounded_with_deadline(store, cert):
    st = tls_stack(store, cert, tls_kw={"max_handshakes": 5, "handshake_timeout": 5.0})
    ok = connect(st, cert, port=42999)               # an established client
    hello = TlsClient(st, client_context(cert[0]), port=43000)
    try:
        hello.tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    ch = hello.co.read()
    flood = []
    for i in range(8):
        f = TlsClient(st, client_context(cert[0]), port=43001 + i)
        f.connect()
        f.pump(f.send_bytes(ch))                     # a ClientHello, never completed
        flood.append(f)
    assert len(st.tls.handshaking) == 5
    assert st.counters["tls_drop_handshake_limit"] == 3
    ok.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")   # still served
    assert ok.plain == expected(store, "/")
    ok.advance(6.0)
    assert st.counters["tls_handshake_timeout"] == 5
    assert not st.tls.handshaking
    assert len(st.conns) == 1                        # only the established client is left
    late = connect(st, cert, port=44000, now=ok.now)
    late.request(b"GET /odd.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    assert late.plain == expected(store, "/odd.txt")


def test_client_that_stops_reading_holds_bounded_ciphertext(store, cert):
    st = tls_stack(store, cert, tls_kw={"queue_max": 65536})
    c = connect(st, cert)
    raw = b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n" * 40        # ~1 MB of replies
    c.tls.write(raw)
    c.send_bytes(c.co.read())                        # ... and never ACK what comes back
    conn = next(iter(st.conns.values()))
    for _ in range(5):
        c.advance(2.0)                               # RTOs: retransmissions, no progress
    queued = (conn.data_end - conn.snd_una) & 0xFFFFFFFF
    assert queued <= 65536 + _FILL_CHUNK + 8 * 64
    assert len(conn.tls.pending) > 30                # the rest waits as references into the store
    # the client reads again: everything arrives, byte-exact
    c.rx.clear()
    c.pump(c.advance(2.0))
    for _ in range(50):
        c.read_all()
        if len(c.plain) >= 40 * len(expected(store, "/big.bin")):
            break
        c.pump(c.advance(1.0))
    assert c.plain == reference(store, raw)


def test_bad_key_and_chain_errors(tmp_path, cert):
    from appliance.stack.tls import TlsError
    d = str(tmp_path)
    other = make_cert(d, "other")
    with pytest.raises(TlsError, match=r"key file .*other.key: does not match"):
        TlsServer(cert[0], other[1])
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(TlsError, match="bad.pem"):
        TlsServer(str(bad), cert[1])
    with pytest.raises(TlsError, match="no PEM certificate"):
        TlsServer(cert[1], cert[1])
    ca = make_ca(d)
    leaf = make_cert(d, "leaf", ca=ca)
    chain = tmp_path / "chain.pem"
    chain.write_text(open(leaf[0]).read() + open(ca[0]).read())
    TlsServer(str(chain), leaf[1])                   # leaf first, then its issuer: fine
    rev = tmp_path / "rev.pem"
    rev.write_text(open(ca[0]).read() + open(leaf[0]).read())
    with pytest.raises(TlsError, match="out of order"):
        TlsServer(str(rev), leaf[1])


def test_hsts_header_on_https_only(store, cert):
    st = tls_stack(store, cert, tls_kw={"hsts": 31536000})
    c = connect(st, cert)
    c.request(b"GET /odd.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    plain = expected(store, "/odd.txt")
    head, body = plain.split(b"\r\n\r\n", 1)
    assert c.plain == head + b"\r\nStrict-Transport-Security: max-age=31536000\r\n\r\n" + body
    h = Client(st, port=45000)
    h.connect()
    assert h.get("/odd.txt")[0] == plain                 # port 80 (--http serve): unchanged


def test_http_redirect_mode_308(store, cert):
    from appliance.http.redirect import redirect_factory
    srv = TlsServer(cert[0], cert[1])
    from tests.stack_support import make_stack
    st = make_stack(store, tls=srv, http_factory=redirect_factory(store.site, store.blob, "www.test"))
    h = Client(st, port=45001)
    h.connect()
    body, _ = h.get("/docs/a%20b?q=1")                  # Host: t
    assert body.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n")
    assert b"\r\nLocation: https://t/docs/a%20b?q=1\r\n" in body
    assert body.endswith(b"Content-Length: 0\r\n\r\n")
    h2 = Client(st, port=45002)
    h2.connect()
    out = h2.send("PA", data=b"GET /x HTTP/1.1\r\nHost: bad_host!\r\n\r\n")
    body2, _ = h2.fetch(out)
    assert b"\r\nLocation: https://www.test/x\r\n" in body2
    c = connect(st, cert, port=45003)                    # HTTPS still serves the site
    c.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.plain == expected(store, "/")


def test_http_off_resets_port_80(store, cert):
    from tests.stack_support import make_stack
    st = make_stack(store, tls=TlsServer(cert[0], cert[1]), port=0)
    h = Client(st, port=45004)
    out = h.syn()
    assert [p[TCP].flags for p in out if TCP in p] == ["RA"]
    assert st.counters["drop_tcp_closed_port"] == 1
    c = connect(st, cert, port=45005)
    c.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.plain == expected(store, "/")


def _serve_cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "appliance", "serve", "--store", "none.store", "--iface", "nope0",
                           "--ip", "198.18.9.1/24", *args], capture_output=True, text=True, timeout=60)


def test_cli_refuses_bad_tls_material_naming_the_file(tmp_path, cert):
    d = str(tmp_path)
    other = make_cert(d, "other")
    key_body = "".join(open(other[1]).read().splitlines()[1:-1])
    r = _serve_cli("--tls-cert", cert[0], "--tls-key", other[1])
    assert r.returncode == 2
    assert f"key file {other[1]}: does not match the certificate in {cert[0]}" in r.stderr
    assert key_body[:32] not in r.stderr + r.stdout
    junk = tmp_path / "junk.key"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    r = _serve_cli("--tls-cert", cert[0], "--tls-key", str(junk))
    assert r.returncode == 2 and f"key file {junk}: not a usable PEM private key" in r.stderr
    r = _serve_cli("--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", cert[1])
    assert r.returncode == 2 and "missing.pem: does not exist" in r.stderr
    r = _serve_cli("--tls-cert", cert[0])
    assert r.returncode == 2 and "both --tls-cert and --tls-key" in r.stderr
    r = _serve_cli("--hsts", "10")
    assert r.returncode == 2 and "need HTTPS" in r.stderr


def test_cli_expiry_warning_and_expired(tmp_path):
    import time
    from appliance.stack.cli import load_tls
    from appliance.stack.tls import TlsError
    soon = make_cert(str(tmp_path), "soon", days=5)
    r = _serve_cli("--tls-cert", soon[0], "--tls-key", soon[1])
    assert f"warning: certificate file {soon[0]} expires within 30 days" in r.stderr
    assert "(4 days)" in r.stderr or "(5 days)" in r.stderr
    assert "interface 'nope0' does not exist" in r.stderr          # checked first, then the interface
    with pytest.raises(TlsError, match="expired on"):
        load_tls(soon[0], soon[1], 0, now_unix=time.time() + 10 * 86400)


def test_cli_self_signed_warns_not_for_production():
    r = _serve_cli("--tls-self-signed", "www.test,198.18.9.1")
    assert "self-signed certificate for www.test, 198.18.9.1" in r.stderr
    assert "not for production" in r.stderr
    assert "HTTPS certificate for www.test, 198.18.9.1" in r.stderr


def test_syn_cookies_on_the_tls_port(store, cert):
    st = tls_stack(store, cert, syncookies="always")
    c = connect(st, cert, port=45010)
    assert st.counters["tcp_syncookies_accepted"] == 1
    c.request(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.plain == expected(store, "/big.bin")
    sa = c.synack
    assert sa[TCP].sport == 443


def test_encrypted_key_is_refused_not_prompted(tmp_path, cert):
    import subprocess
    from appliance.stack.tls import TlsError
    enc = str(tmp_path / "enc.key")
    subprocess.run(["openssl", "pkey", "-in", cert[1], "-aes256", "-passout", "pass:secret", "-out", enc],
                   check=True, capture_output=True)
    with pytest.raises(TlsError, match="enc.key: not a usable PEM private key"):
        TlsServer(cert[0], enc)


def test_large_response_records_are_whole_16k(tmp_path, cert):
    """Across 64 KB encryption batches every record but the last of a response is full;
    the second (pipelined) response has no small records (the connection is busy)."""
    from appliance.content.compiler import Options, compile_site
    from appliance.content.store import Store
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "large.bin").write_bytes(bytes((i * 13) & 0xFF for i in range(200_000)))
    compile_site(str(tmp_path / "s"), str(tmp_path / "l.store"), Options(mss=1460, source_date_epoch=1700000000))
    big = Store.open(str(tmp_path / "l.store"))
    st = tls_stack(big, cert, tls_kw={"small_records": 3})
    c = connect(st, cert)
    start = len(c.ciphertext)
    raw = b"GET /large.bin HTTP/1.1\r\nHost: t\r\n\r\n" * 2
    c.request(raw)
    assert c.plain == reference(big, raw)
    recs = [n - 17 for t, n in records(c.ciphertext[start:]) if t == 23]
    one = len(reference(big, raw)) // 2
    conn = next(iter(st.conns.values()))
    assert recs == record_plan(one, conn.mss - 22, 3) + record_plan(one, conn.mss - 22, 0)
    assert recs.count(MAX_RECORD) >= 20


def test_respond_tls_shows_the_tunnel_and_records(tmp_path, store):
    import subprocess
    import sys
    from tests.stack_support import SITE
    root = tmp_path / "site"
    for rel, data in SITE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    from appliance.content.compiler import Options, compile_site
    path = str(tmp_path / "r.store")
    compile_site(str(root), path, Options(source_date_epoch=1700000000))
    date = "Sun, 06 Nov 1994 08:49:37 GMT"
    req = b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n"
    plain = subprocess.run([sys.executable, "-m", "appliance", "respond", path, "--date", date], input=req,
                           capture_output=True, check=True).stdout
    r = subprocess.run([sys.executable, "-m", "appliance", "respond", path, "--date", date, "--tls", "--hsts", "9",
                        "--mss", "1448"], input=req, capture_output=True, check=True)
    head, body = plain.split(b"\r\n\r\n", 1)
    assert r.stdout == head + b"\r\nStrict-Transport-Security: max-age=9\r\n\r\n" + body
    plan = record_plan(len(r.stdout), 1448 - 22)
    assert r.stderr.decode().strip() == (f"HTTP/1.1 200 OK: {len(r.stdout)} bytes in {len(plan)} TLS 1.3 records: "
                                         + " ".join(map(str, plan)))
    assert plan[:8] == [1426] * 8 and plan[8] == len(r.stdout) - 8 * 1426


def test_oversized_and_bad_records_are_refused_and_counted(store, cert):
    st = tls_stack(store, cert)
    # an oversized application-data record after the handshake (RFC 8446 §5.2: > 2^14 + 256)
    c = connect(st, cert, port=46000)
    c.pump(c.send_bytes(b"\x17\x03\x03\x48\x00" + bytes(1400)))
    assert c.fin
    failed = {k: v for k, v in st.counters.as_dict().items() if k.startswith("tls_record_failed_")}
    assert sum(failed.values()) == 1, failed
    # an oversized record in place of a ClientHello
    d = TlsClient(st, client_context(cert[0]), port=46001)
    d.connect()
    d.pump(d.send_bytes(b"\x16\x03\x01\xff\xff" + bytes(2000)))
    assert d.fin
    # a corrupted record (AEAD tag check fails: bad_record_mac)
    e = connect(st, cert, port=46002)
    e.tls.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    rec = bytearray(e.co.read())
    rec[-1] ^= 1
    e.pump(e.send_bytes(bytes(rec)))
    assert e.fin and e.plain == b""
    assert any("bad_record_mac" in k or "decryption_failed" in k for k in st.counters.as_dict())
    # the client's close_notify: answered by ours, then FIN
    f = connect(st, cert, port=46003)
    f.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert f.plain == expected(store, "/")
    try:
        f.tls.unwrap()
    except ssl.SSLWantReadError:
        pass
    f.pump(f.send_bytes(f.co.read()))
    assert st.counters["tls_close_notify_received"] == 1
    assert f.fin and f.read_all()                       # our close_notify came before the FIN
    assert st.counters["drop_internal_error"] == 0
    g = connect(st, cert, port=46004)                    # and the server goes on
    g.request(b"GET /odd.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    assert g.plain == expected(store, "/odd.txt")
