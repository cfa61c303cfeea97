"""The metrics port, /healthz, --metrics-allow and the drain's refusal over IPv6
(appliance/obs), in memory: test_stack_tcp6's IPv6 client beside an IPv4 one on
the same Stack; every frame checked by scapy."""
import pytest
from scapy.layers.inet import TCP
from scapy.layers.inet6 import IPv6

from appliance.obs import Drain, Observer, parse_allow
from appliance.stack.conn6 import Conn6
from appliance.stack.tls import TlsServer
from tests.stack_support import Client, make_store
from tests.test_stack_obs import MetricsClient, Stopper
from tests.test_stack_tcp6 import PEER, Client6, v6stack
from tests.tls_support import make_cert


class MetricsClient6(Client6):
    def seg(self, *a, **kw):
        kw.setdefault("dport", 9100)
        return super().seg(*a, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("obs6"), mss=1440)


def test_metrics_and_healthz_over_ipv6(store):
    st = v6stack(store)
    Observer(st, metrics_port=9100, build={"store_sha256": "ab"}).install()
    m = MetricsClient6(st, port=42001)
    sa = m.connect()
    assert sa[TCP].sport == 9100 and sa[IPv6].src == m.server and sa[IPv6].dst == PEER
    (conn,) = [c for c in st.conns.values() if c.peer_port == 42001]
    assert isinstance(conn, Conn6)
    data, frames = m.get("/metrics")
    assert all(IPv6 in p and p[TCP].sport == 9100 for p in frames if TCP in p)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b'haboob_build_info{store_sha256="ab"} 1' in body
    h = MetricsClient6(st, port=42002)
    h.connect()
    data, _ = h.get("/healthz")
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"ok\n")
    assert st.counters["metrics_connections"] == 2 and st.counters["drop_tcp_closed_port"] == 0


def test_metrics_allow_takes_ipv6_prefixes(store):
    assert parse_allow("198.18.0.0/15,2001:2:0:7::/64") == [
        (4, 0xC6120000, 0xFFFE0000), (16, 0x20010002000000070000000000000000, ((1 << 64) - 1) << 64)]
    with pytest.raises(ValueError, match="metrics allow prefix '2001:2::/129'"):
        parse_allow("2001:2::/129")
    st = v6stack(store)
    Observer(st, metrics_port=9100, metrics_allow=parse_allow("2001:2:0:7::/64,198.18.0.0/15")).install()
    ok = MetricsClient6(st, port=42010)
    ok.connect()
    assert ok.get("/healthz")[0].endswith(b"ok\n")
    bad = MetricsClient6(st, port=42011, ip="2001:2:0:8::2")
    assert [str(p[TCP].flags) for p in bad.syn()] == ["RA"]
    v4 = MetricsClient(st, port=42012)                  # 198.18.0.2: in the IPv4 prefix
    v4.connect()
    assert v4.get("/healthz")[0].endswith(b"ok\n")
    st2 = v6stack(store)
    Observer(st2, metrics_port=9100, metrics_allow=parse_allow("198.18.0.0/15")).install()
    only4 = MetricsClient6(st2, port=42013)             # an IPv4-only list admits no IPv6 source
    assert [str(p[TCP].flags) for p in only4.syn()] == ["RA"]
    assert st.counters["metrics_denied"] == 1 and st2.counters["metrics_denied"] == 1


def test_drain_refuses_new_connections_over_ipv6_on_80_and_443(store, tmp_path):
    cert = make_cert(str(tmp_path))
    st = v6stack(store, tls=TlsServer(cert[0], cert[1]))
    obs = Observer(st, metrics_port=9100).install()
    stop = Stopper()
    now = [1000.0]
    d = Drain(st, stop, 5.0, obs, mono=lambda: now[0])
    stop.asked = True
    assert d() is True                                   # nothing outstanding
    for port in (80, 443):
        c = Client6(st, port=42020 + port)
        out = c.deliver(c.seg("S", dport=port, options=[("MSS", 1440)]))
        assert [(str(p[TCP].flags), p[TCP].sport, p[IPv6].src) for p in out] == [("RA", port, c.server)]
    v4 = Client(st, port=42030)
    assert [str(p[TCP].flags) for p in v4.deliver(v4.seg("S", dport=443))] == ["RA"]
    h = MetricsClient6(st, port=42031)
    h.connect()
    data, _ = h.get("/healthz")
    assert data.startswith(b"HTTP/1.1 503 ") and data.endswith(b"draining\n")
    assert st.counters["tcp_drain_refused"] == 3
