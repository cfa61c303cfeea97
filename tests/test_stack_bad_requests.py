"""Invalid requests through the stack (issue 10 item 4), in memory with a fake clock:
bytes that cannot start a request are answered with 400 and a FIN in the same
instant, not at request_timeout, and a client's FIN after an incomplete request
gets a 400 before our FIN (RFC 9293 §3.6 half-close; nginx answers so too)."""
import pytest
from scapy.layers.inet import TCP

from appliance.http import HTTPConnection, reply_bytes
from appliance.stack.conn import ESTABLISHED, FIN_WAIT_1, LAST_ACK
from appliance.stack.iface import imf_fixdate
from tests.stack_support import NOW_UNIX, Client, expected, make_stack, make_store

from .content_support import httpclient_parse

M = 0xFFFFFFFF
TLS_CLIENT_HELLO = bytes.fromhex("16030100c4010000c00303") + bytes(range(32)) + b"\x00\x00\x02\x13\x01\x01\x00"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("badreq"))


@pytest.fixture
def client(store):
    c = Client(make_stack(store, request_timeout=30.0))
    c.connect()
    return c


def conn_of(c):
    (conn,) = [x for x in c.st.conns.values() if x.peer_port == c.port]
    return conn


def the_400(store, head=False):
    """The exact bytes of the 400 the appliance sends (Date and Connection patched)."""
    h = HTTPConnection(store.site, store.blob)
    (r,) = h.receive(b"HEAD \x00" if head else b"\x00")
    assert r.status == 400 and r.close
    return reply_bytes(r, store.blob, imf_fixdate(NOW_UNIX))


def data_and_fin(frames):
    segs = [p for p in frames if TCP in p]
    data = b"".join(bytes(p[TCP].payload) for p in segs)
    return data, any("F" in p[TCP].flags for p in segs)


@pytest.mark.parametrize("junk", [TLS_CLIENT_HELLO, b"\x00\xff\xfe", b"SSH-2.0-OpenSSH_9.2\r\n", b"GET  /"])
def test_garbage_gets_400_and_fin_at_once(client, store, junk):
    out = client.send("PA", data=junk)                  # no time passes
    data, fin = data_and_fin(out)
    assert data == the_400(store) and fin
    assert httpclient_parse(data)[0] == 400
    assert conn_of(client).state == FIN_WAIT_1
    seg = [p for p in out if TCP in p][0]
    assert seg[TCP].ack == client.seq                   # the bad bytes are acknowledged with it
    assert client.st.counters["tcp_request_timeout"] == 0


def test_garbage_byte_by_byte_is_answered_with_the_impossible_byte(client, store):
    for b in b"GET / HTTP/1.1":
        out = client.send("PA", data=bytes([b]))
        assert data_and_fin(out) == (b"", False)
    out = client.send("PA", data=b"\x01")               # HTTP/1.1 followed by neither CR nor LF
    assert data_and_fin(out) == (the_400(store), True)


def test_half_close_after_an_incomplete_request_gets_400(client, store):
    out = client.send("PA", data=b"GET /index.html HTTP/1.1\r\nHost: t\r\n")
    assert data_and_fin(out) == (b"", False) and conn_of(client).state == ESTABLISHED
    out = client.send("FA")
    segs = [p for p in out if TCP in p]
    data, fin = data_and_fin(out)
    assert data == the_400(store) and fin
    assert all(p[TCP].ack == client.seq for p in segs)    # our FIN acks theirs
    assert conn_of(client).state == LAST_ACK
    client.ack = (segs[-1][TCP].seq + len(segs[-1][TCP].payload) + 1) & M
    client.send("A")
    assert not client.st.conns and client.st.counters["tcp_request_timeout"] == 0


def test_half_close_with_the_partial_request_in_the_same_segment(client, store):
    out = client.send("FPA", data=b"HEAD /index.html HTTP/1.1\r\nHo")
    assert data_and_fin(out) == (the_400(store, head=True), True)


def test_half_close_after_whole_requests_is_answered_normally(client, store):
    """No 400 when nothing is pending: the reply, then our FIN (empty lines are not a request)."""
    out = client.send("PA", data=client.request("/index.html") + b"\r\n")
    out += client.send("FA")
    data, frames = client.fetch(out)
    assert data == expected(store, "/index.html")
    assert any("F" in p[TCP].flags for p in frames if TCP in p)
