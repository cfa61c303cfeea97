"""appliance/obs on an in-memory Stack: the metrics port's frames, drain, log records, sinks.

Every frame the stack emits is checked by scapy (tests/stack_support.Client);
the syslog frames are parsed by scapy as an independent checker too.
"""
import json
import os
import re

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from appliance.obs import Drain, Observer
from appliance.obs.accesslog import AccessLog, ConsoleSink, SyslogSink

import pytest

from .stack_support import CLIENT_IP, SERVER_IP, SITE, Client, make_stack, make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("obs"))


class MetricsClient(Client):
    def seg(self, *a, **kw):
        kw.setdefault("dport", 9100)
        return super().seg(*a, **kw)


class Stopper:
    """serve.py's _Stopper as Drain sees it: flag (stop now) and a drain request."""

    def __init__(self):
        self.flag = False
        self.asked = False

    def __call__(self):
        return self.asked


def test_metrics_port_frames_carry_its_port_and_valid_checksums(store):
    st = make_stack(store)
    Observer(st, metrics_port=9100, build={"store_sha256": "ab"}).install()
    c = MetricsClient(st, port=40001)
    sa = c.connect()
    assert sa[TCP].sport == 9100
    data, frames = c.get("/metrics")
    assert all(p[TCP].sport == 9100 for p in frames if TCP in p)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in head
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
    assert b'haboob_build_info{store_sha256="ab"} 1' in body
    assert any("F" in p[TCP].flags for p in frames)
    assert st.counters["metrics_scrapes"] == 1
    # the site's port is unchanged beside it
    site = Client(st, port=40002)
    assert site.connect()[TCP].sport == 80
    got, frames = site.get("/index.html")
    assert got.endswith(SITE["index.html"]) and all(p[TCP].sport == 80 for p in frames if TCP in p)


def test_a_scrape_is_not_an_access_log_entry_and_site_replies_are(store):
    st = make_stack(store)
    lines = []

    class Sink:
        def write(self, batch, now, wall):
            lines.extend(batch)
    obs = Observer(st, metrics_port=9100, log=AccessLog(Sink(), "combined", 1, st.counters)).install()
    m = MetricsClient(st, port=40001)
    m.connect()
    m.get("/metrics")
    c = Client(st, port=40002)
    c.connect()
    # two pipelined requests in one segment: two lines, each with its own request line
    out = c.send("PA", data=c.request("/index.html") + c.request("/odd.txt", b"Referer: http://r/\r\n"))
    c.fetch(out)
    obs.flush(c.now)
    assert len(lines) == 2, lines
    assert '"GET /index.html HTTP/1.1" 200 %d "-" "-"' % len(SITE["index.html"]) in lines[0]
    assert '"GET /odd.txt HTTP/1.1" 200 %d "http://r/" "-"' % len(SITE["odd.txt"]) in lines[1]
    assert st.counters["http_responses_2xx"] == 2        # the scrape is not counted as the site's


def test_drain_fins_idle_connections_and_refuses_new_ones(store):
    st = make_stack(store)
    obs = Observer(st, metrics_port=9100).install()
    c = Client(st, port=40001)
    c.connect()
    c.get("/")                                           # keep-alive, idle now
    stop = Stopper()
    now = [c.now]
    d = Drain(st, stop, 5.0, obs, mono=lambda: now[0])
    assert d() is False
    stop.asked = True
    assert d() is False                                  # our FIN is out, not acknowledged yet
    fin = c.collect()
    assert any("F" in p[TCP].flags for p in fin) and obs.draining
    new = Client(st, port=40002).syn()
    assert [p[TCP].flags for p in new] == ["RA"]         # a new connection: RST
    h = MetricsClient(st, port=40003)
    h.connect()
    assert d() is False                                  # (our FIN to c is still unacknowledged)
    data, _ = h.get("/healthz")                          # connected before its request: not closed
    assert data.startswith(b"HTTP/1.1 503 ") and data.endswith(b"draining\n")
    c.ack_all(fin)                                       # the client ACKs our FIN: nothing outstanding
    assert d() is True
    assert st.counters["tcp_drain_refused"] == 1 and st.counters["drain_closed_idle"] == 1


def test_drain_gives_up_after_its_timeout(store):
    st = make_stack(store)
    c = Client(st, port=40001)
    c.connect()
    c.send("PA", data=c.request("/big.bin"))             # a reply in flight, never acknowledged
    stop = Stopper()
    stop.asked = True
    now = [c.now]
    d = Drain(st, stop, 2.0, None, mono=lambda: now[0])
    assert d() is False
    now[0] += 2.5
    assert d() is True and st.counters["drain_timeouts"] == 1


def test_console_sink_drops_and_counts_when_the_pipe_is_full():
    r, w = os.pipe()
    counters = {"log_lines_dropped": 0, "log_lines": 0}
    sink = ConsoleSink(counters, fd=w)
    line = "x" * 1000
    for _ in range(200):                                 # 200 KB into a 64 KB pipe nobody reads: never blocks
        sink.write([line], 0.0, 0.0)
    assert counters["log_lines_dropped"] > 0
    sink.close()
    os.close(w)
    data = b""
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        data += b
    os.close(r)
    assert data.count(b"\n") >= 200 - counters["log_lines_dropped"]


def test_syslog_frames_wait_for_arp_then_parse_as_udp(store):
    st = make_stack(store)
    sink = SyslogSink(st, CLIENT_IP, 5514, hostname="web1")
    sink.write(["hello \\x07"], 1000.0, 1764150000.25)
    arp = st.txq[:]
    st.txq.clear()
    assert len(arp) == 1 and arp[0][0][12:14] == b"\x08\x06" and st.counters["log_syslog_datagrams"] == 0
    st.arp.learn(bytes(map(int, CLIENT_IP.split("."))), bytes.fromhex("020000000002"), 1000.0)
    sink.send(1000.5)
    p = Ether(st.txq[0][0])
    assert p[IP].src == SERVER_IP and p[IP].dst == CLIENT_IP and p[UDP].dport == 5514
    chk_ip, chk_udp = p[IP].chksum, p[UDP].chksum
    del p[IP].chksum, p[UDP].chksum
    q = Ether(bytes(p))
    assert (q[IP].chksum, q[UDP].chksum) == (chk_ip, chk_udp)
    assert bytes(q[UDP].payload).decode().startswith("<134>1 2025-11-26T09:40:00.250000Z web1 haboob ")
    assert bytes(q[UDP].payload).endswith(b" access - hello \\x07")


class ListSink:
    def __init__(self):
        self.lines = []
        self.writes = 0

    def write(self, lines, now, wall):
        self.lines += lines
        self.writes += 1


def _entry(i):
    return (10.0, "198.18.0.2", 40000 + i, b"GET", b"/%d" % i, b"HTTP/1.1", 200, 5, 100, 0.001, "identity",
            False, False, None, b"ua")


def test_sampling_keeps_one_in_n_across_batches_and_writes_once_per_batch():
    sink = ListSink()
    log = AccessLog(sink, "json", 3, {"log_lines": 0})
    log.write([_entry(i) for i in range(4)], 10.0, 1764150000.0)
    log.write([_entry(i) for i in range(4, 9)], 10.0, 1764150000.0)
    assert [json.loads(x)["target"] for x in sink.lines] == ["/2", "/5", "/8"]
    assert sink.writes == 2


def test_rfc3164_framing(store):
    st = make_stack(store)
    st.arp.learn(bytes(map(int, CLIENT_IP.split("."))), bytes.fromhex("020000000002"), 1000.0)
    sink = SyslogSink(st, CLIENT_IP, 514, hostname="web 1", bsd=True)
    sink.write(["a line"], 1000.0, 1764150000.0)        # 2025-11-26 09:40:00 UTC
    p = Ether(st.txq[0][0])
    msg = bytes(p[UDP].payload).decode()
    assert re.fullmatch(r"<134>Nov 26 09:40:00 web1 haboob\[\d+\]: a line", msg), msg
