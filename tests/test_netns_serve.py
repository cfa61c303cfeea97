"""`python -m appliance serve` on a veth pair, checked with real clients.

The server is the real CLI process in its own namespace (interface without
an IPv4 address), the clients are curl, wget, wrk, ping and Python's
http.client / raw sockets in the peer namespace. Every namespace and
process is removed at the end of its fixture or test, also on failure
(vm.netns context managers; server processes are stopped by pid).
"""
import contextlib
import hashlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from vm import netns

pytestmark = pytest.mark.netns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.join(ROOT, "examples", "www")


def read_tree(root: str) -> dict:
    """relative path -> bytes of every file below `root`."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def site_files() -> dict:
    """relative path -> bytes of every file of the example site."""
    return read_tree(SITE)


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    from appliance.content.compiler import compile_site
    path = str(tmp_path_factory.mktemp("store") / "www.store")
    compile_site(SITE, path)
    return path


class Server:
    """A running `python -m appliance serve` inside `ns`; stop() returns its counters."""

    def __init__(self, proc, ready: dict):
        self.proc = proc
        self.ready = ready
        self.counters = None
        self.stderr = ""

    def stop(self, timeout: float = 15, sig=signal.SIGTERM) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        self.stderr = err
        for line in out.splitlines():
            if line.startswith("HABOOB-COUNTERS "):
                self.counters = json.loads(line.split(" ", 1)[1])
        return self.counters


@contextlib.contextmanager
def running_server(ns, iface, ip, store, *extra, timeout: float = 30):
    """Start the server CLI in `ns` and wait for its HABOOB-READY line; always stop it."""
    argv = [sys.executable, "-m", "appliance", "serve", "--store", store, "--iface", iface,
            "--ip", f"{ip}/24", *extra]
    proc = ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    srv = Server(proc, {})
    try:
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 0.5)
            if r:
                line = proc.stdout.readline()
                if line.startswith("HABOOB-READY ") or not line:
                    break
            if proc.poll() is not None:
                break
        if not line.startswith("HABOOB-READY "):
            srv.stop(5)
            raise AssertionError(f"server did not start: {srv.stderr}")
        srv.ready = json.loads(line.split(" ", 1)[1])
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def served(store):
    """One server for the read-only client tests of this module."""
    with netns.pair(subnet=100) as link:
        with running_server(link.server, link.server_if, link.server_ip, store) as srv:
            yield link, srv
        assert srv.counters is not None, srv.stderr
        assert srv.counters.get("drop_internal_error", 0) == 0, srv.counters
        assert srv.counters.get("loop_stack_errors", 0) == 0, srv.counters


def mirror(link, dest, files=None, host=None):
    """wget --mirror of the site into `dest`, plus every file the links do not
    reach; returns {relpath: bytes} of what was downloaded. `host`: the URL's
    host part (default the server's IPv4 address; "[addr]" for IPv6)."""
    files = files or site_files()
    host = host or link.server_ip
    link.client.run(["wget", "-q", "--mirror", "-nH", "-e", "robots=off", "--tries=3", "--timeout=20",
                     "-P", dest, f"http://{host}/"], timeout=180, check=False)
    got = read_tree(dest)
    rest = [k for k in files if k not in got and not k.endswith("404.html")]
    if rest:
        urls = "\n".join(f"http://{host}/{k}" for k in rest)
        lst = os.path.join(dest, "..", "rest.txt")
        with open(lst, "w") as fh:
            fh.write(urls + "\n")
        link.client.run(["wget", "-q", "-x", "-nH", "--tries=3", "--timeout=20", "-P", dest, "-i", lst],
                        timeout=180)
        for k in rest:
            with open(os.path.join(dest, k), "rb") as fh:
                got[k] = fh.read()
    return got


def assert_mirror_exact(got: dict):
    files = site_files()
    for k, data in got.items():
        assert k in files, f"wget saved {k}, which is not a site file"
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(files[k]).hexdigest(), \
            f"{k}: {len(data)} bytes differ from the site's {len(files[k])}"
    missing = set(files) - set(got) - {"404.html"}
    assert not missing, f"not fetched: {missing}"


# -- tests ---------------------------------------------------------------------

def test_ready_line_names_address_and_offloads(served):
    link, srv = served
    assert srv.ready["ip"] == link.server_ip
    assert srv.ready["urls"] > 10
    assert srv.ready["offload"] == {"csum": True, "tso": True}
    assert srv.ready["syn_gate"] == "kernel"            # the SYN ring sheds floods in the kernel


def test_curl_gets_index_and_404(served):
    link, _ = served
    r = link.client.run(["curl", "-sS", "--max-time", "10", "-D", "-", f"http://{link.server_ip}/"],
                        text=False)
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == site_files()["index.html"]
    r = link.client.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                         f"http://{link.server_ip}/no/such/page"])
    assert r.stdout == "404"


def test_ping(served):
    link, _ = served
    r = link.client.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", link.server_ip], check=False)
    assert " 0% packet loss" in r.stdout, r.stdout


def test_wget_mirror_byte_exact(served, tmp_path):
    link, _ = served
    assert_mirror_exact(mirror(link, str(tmp_path / "m")))


CLIENT_KEEPALIVE = r"""
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=10)
out = []
for path in sys.argv[2:]:
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    out.append([path, r.status, len(body), __import__("hashlib").sha256(body).hexdigest()])
# the same TCP connection served all of them
out.append(["sock", c.sock.getsockname()[1]])
print(json.dumps(out))
"""


def test_http_client_keepalive(served):
    link, _ = served
    files = site_files()
    paths = ["/index.html", "/css/site.css", "/img/logo.png", "/downloads/data.txt", "/about.html"]
    r = link.client.run([sys.executable, "-c", CLIENT_KEEPALIVE, link.server_ip, *paths], timeout=60)
    out = json.loads(r.stdout)
    for (path, status, n, digest) in out[:-1]:
        assert status == 200
        assert digest == hashlib.sha256(files[path[1:]]).hexdigest(), path


CLIENT_PIPELINE = r"""
import socket, sys, json
s = socket.create_connection((sys.argv[1], 80), timeout=10)
paths = sys.argv[2:]
reqs = b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p.encode() for p in paths[:-1])
reqs += b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % paths[-1].encode()
s.sendall(reqs)                       # all requests in one write: one segment
data = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    data += b
sys.stdout.buffer.write(data)
"""


def _split_responses(data: bytes) -> list:
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response: {data[:200]!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
        n = int(fields.get(b"content-length", b"0"))
        out.append((status, fields, rest[:n]))
        data = rest[n:]
    return out


def test_pipelined_requests_in_one_segment(served):
    link, _ = served
    files = site_files()
    paths = ["/css/site.css", "/robots.txt", "/nope", "/index.html", "/img/haboob.svg"]
    r = link.client.run([sys.executable, "-c", CLIENT_PIPELINE, link.server_ip, *paths],
                        timeout=30, text=False)
    resps = _split_responses(r.stdout)
    assert [s for s, _, _ in resps] == [200, 200, 404, 200, 200]
    for path, (status, fields, body) in zip(paths, resps):
        if status == 200:
            assert body == files[path[1:]], path
    assert resps[-1][1][b"connection"] == b"close"
    assert resps[0][1][b"connection"] == b"keep-alive"


CLIENT_BAD = r"""
import socket, sys, json
out = []
for mode in ("tls", "half-close"):
    s = socket.create_connection((sys.argv[1], 80), timeout=10)   # well below the 30 s request timeout
    if mode == "tls":       # a TLS ClientHello's first bytes on port 80
        s.sendall(bytes.fromhex("16030100c4010000c00303") + bytes(32))
    else:                   # an incomplete request, then FIN
        s.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\n")
        s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        b = s.recv(65536)   # until the server's FIN; socket.timeout fails the test
        if not b:
            break
        data += b
    out.append(data.decode("latin-1"))
print(json.dumps(out))
"""


def test_bad_bytes_and_half_close_get_400_without_waiting(served):
    """Issue 10 item 4: garbage is answered at once and a half-close after an incomplete
    request gets 400 (both followed by the server's FIN), not left to request_timeout."""
    link, _ = served
    r = link.client.run([sys.executable, "-c", CLIENT_BAD, link.server_ip], timeout=30)
    for data in json.loads(r.stdout):
        (status, fields, _), = _split_responses(data.encode("latin-1"))
        assert status == 400 and fields[b"connection"] == b"close", data[:200]


def test_wrk_short_run_has_no_errors(served):
    link, _ = served
    r = link.client.run(["wrk", "-t1", "-c8", "-d2s", "--timeout", "5s", f"http://{link.server_ip}/index.html"],
                        timeout=60)
    out = r.stdout
    assert "Non-2xx" not in out, out
    assert "Socket errors" not in out, out
    reqs = int(out.split(" requests in ")[0].split()[-1])
    assert reqs > 0, out


def test_wget_mirror_with_server_tx_offloads_off(store, tmp_path):
    """Software checksums from the stored sums, end to end (no NEEDS_CSUM, no GSO)."""
    with netns.pair(subnet=101) as link:
        netns.set_offloads(link.server, link.server_if, tx=False, tso=False, gso=False)
        with running_server(link.server, link.server_if, link.server_ip, store) as srv:
            assert srv.ready["offload"] == {"csum": False, "tso": False}
            got = mirror(link, str(tmp_path / "m"))
        assert_mirror_exact(got)
        c = srv.counters
        assert c["ring_tx_frames"] > 0 and c.get("drop_internal_error", 0) == 0


def test_two_workers_serve_the_site(store, tmp_path):
    with netns.pair(subnet=102) as link:
        with running_server(link.server, link.server_if, link.server_ip, store, "--workers", "2",
                            "--pin") as srv:
            assert srv.ready["workers"] == 2
            pid = srv.proc.pid
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                kids = fh.read().split()
            pinned = []
            for k in kids:
                with open(f"/proc/{k}/status") as fh:
                    pinned += [ln.split()[1] for ln in fh if ln.startswith("Cpus_allowed_list")]
            cpus = sorted(os.sched_getaffinity(0))
            assert sorted(pinned) == sorted(str(cpus[i % len(cpus)]) for i in range(2))
            got = mirror(link, str(tmp_path / "m"))
            r = link.client.run(["wrk", "-t1", "-c16", "-d1s", f"http://{link.server_ip}/robots.txt"],
                                timeout=60)
            assert "Non-2xx" not in r.stdout and "Socket errors" not in r.stdout, r.stdout
        assert_mirror_exact(got)
        c = srv.counters
        assert c["workers"] == 2
        assert c["workers_serving"] == 2          # the flow hash spread the connections
        assert c["http_replies"] >= len(got)
        # every SYN came through the workers' SYN rings (their own fanout group) and
        # still met its ACK on the same worker: no socket error above
        assert c["ring_kernel_syn_packets"] >= 16 and c.get("drop_tcp_ack_no_connection", 0) == 0, c


def test_capture_records_the_http_exchange(store, tmp_path):
    from scapy.all import IP, TCP, Raw, rdpcap
    pcap = str(tmp_path / "cap.pcap")
    with netns.pair(subnet=103) as link:
        with running_server(link.server, link.server_if, link.server_ip, store, "--capture", pcap) as srv:
            link.client.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null",
                             f"http://{link.server_ip}/css/site.css"])
            srv.stop(sig=signal.SIGINT)           # SIGINT stops it like SIGTERM: counters printed
        assert srv.proc.returncode == 0 and srv.counters["http_replies"] == 1, srv.stderr
    pkts = rdpcap(pcap)
    tcp = [p for p in pkts if TCP in p]
    assert any(p[TCP].flags.S and not p[TCP].flags.A for p in tcp), "no SYN recorded"
    assert any(p[TCP].flags.S and p[TCP].flags.A and p[IP].src == link.server_ip for p in tcp)
    req = b"".join(bytes(p[Raw].load) for p in tcp if Raw in p and p[IP].dst == link.server_ip)
    assert req.startswith(b"GET /css/site.css HTTP/1.1\r\n")
    resp = b"".join(bytes(p[Raw].load) for p in sorted(
        (p for p in tcp if Raw in p and p[IP].src == link.server_ip), key=lambda p: p[TCP].seq))
    with open(os.path.join(SITE, "css", "site.css"), "rb") as fh:
        css = fh.read()
    assert resp.startswith(b"HTTP/1.1 200 OK\r\n") and resp.endswith(css)
    # every frame we sent has valid checksums as recorded (GSO frames were segmented)
    for p in tcp:
        if p[IP].src == link.server_ip:
            assert len(p) <= 1514
            ip_sum, tcp_sum = p[IP].chksum, p[TCP].chksum
            q = p[IP].copy()
            del q.chksum
            del q[TCP].chksum
            q = IP(bytes(q))
            assert (q.chksum, q[TCP].chksum) == (ip_sum, tcp_sum)


CLIENT_GSO_FRAME = r"""
import socket, struct, sys
# One 20 KB TCP super-frame (virtio GSO header) sent raw on the client's veth:
# it reaches the server's packet socket as one frame, larger than an RX slot.
iface, dmac, src, dst = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.setsockopt(263, 15, 1)                     # PACKET_VNET_HDR
s.bind((iface, 0))
n = 20000
smac = open(f"/sys/class/net/{iface}/address").read().strip()
eth = dmac + bytes.fromhex(smac.replace(":", "")) + b"\x08\x00"
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + n, 1, 0x4000, 64, 6, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x50, 0x18, 65535, 0, 0)
vnet = struct.pack("=BBHHHH", 1, 1, 54, 1448, 34, 16)
print(s.sendmsg([vnet, eth + ip + tcp, b"x" * n]))
"""


def test_frames_larger_than_a_ring_slot_are_counted_and_dropped(store):
    """A frame larger than an RX slot (a 20 KB GSO aggregate; tp_snaplen <
    tp_len) is counted as ring_rx_truncated and never reaches the stack."""
    with netns.pair(subnet=104) as link:
        with running_server(link.server, link.server_if, link.server_ip, store) as srv:
            r = link.client.run([sys.executable, "-c", CLIENT_GSO_FRAME, link.client_if, srv.ready["mac"],
                                 link.client_ip, link.server_ip], timeout=30)
            assert int(r.stdout) > 20000
            time.sleep(0.3)
            ok = link.client.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
                                  f"http://{link.server_ip}/robots.txt"])
            assert ok.stdout == "200"
        c = srv.counters
        assert c["ring_rx_truncated"] == 1, c
        assert c.get("tcp_rst_sent", 0) == 0 and c["tcp_in_segments"] >= 3, c


def test_jumbo_mtu_without_offloads(store):
    """MTU 9000 and no TX offloads: MTU-sized frames must fit the TX slots."""
    files = site_files()
    with netns.pair(subnet=105, mtu=9000) as link:
        netns.set_offloads(link.server, link.server_if, tx=False, tso=False, gso=False)
        with running_server(link.server, link.server_if, link.server_ip, store) as srv:
            r = link.client.run(["curl", "-sS", "--max-time", "20", f"http://{link.server_ip}/img/logo.png"],
                                text=False)
            assert r.stdout == files["img/logo.png"]
            # an 8 KB echo reply is one 8 KB frame: it must fit a TX slot
            p = link.client.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "-s", "8000", link.server_ip],
                                check=False)
            assert " 0% packet loss" in p.stdout, p.stdout
        c = srv.counters
        assert c.get("ring_tx_oversize", 0) == 0, c
        assert c.get("drop_internal_error", 0) == 0, c


def _ip_in_receives(ns) -> int:
    """IP datagrams the namespace's kernel took into its IP layer (/proc/net/snmp Ip: InReceives)."""
    lines = [l.split() for l in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines() if l.startswith("Ip:")]
    return int(lines[1][lines[0].index("InReceives")])


def test_own_mac_keeps_the_frames_out_of_the_kernel_ip_layer(store):
    """With --mac (another MAC than the interface's) the appliance's frames are
    PACKET_OTHERHOST to the kernel under it: ip_rcv drops them at its first
    check instead of routing each one. Without it, every frame reaches the IP
    layer (InReceives), which finds no local address and drops it there."""
    files = site_files()
    mac = "02:48:42:00:00:07"
    with netns.pair(subnet=106) as link:
        seen = {}
        for extra in ((), ("--mac", mac)):
            before = _ip_in_receives(link.server)
            with running_server(link.server, link.server_if, link.server_ip, store, *extra) as srv:
                assert srv.ready["mac"] == (mac if extra else srv.ready["mac"])
                for name in ("index.html", "robots.txt", "img/logo.png"):
                    r = link.client.run(["curl", "-sS", "--max-time", "10", f"http://{link.server_ip}/{name}"],
                                        text=False)
                    assert r.stdout == files[name]
                neigh = link.client.run(["ip", "neigh", "show", link.server_ip]).stdout
            seen[bool(extra)] = (_ip_in_receives(link.server) - before, neigh, srv.counters)
            link.client.run(["ip", "neigh", "flush", "dev", link.client_if])
        kernel_plain, _, c_plain = seen[False]
        kernel_own, neigh_own, c_own = seen[True]
        assert c_plain["tcp_in_segments"] >= 9 and c_own["tcp_in_segments"] >= 9
        assert kernel_plain >= c_plain["tcp_in_segments"], seen   # every frame went up to ip_rcv
        assert kernel_own == 0, seen                              # none did
        assert mac in neigh_own                                   # the client talks to our MAC


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_prints_the_live_counters_and_serving_goes_on(store, workers):
    """SIGUSR1: the counters so far on stdout (several workers: the sum of their
    once-a-second reports), and the server keeps serving."""
    files = site_files()
    with netns.pair(subnet=107 + workers) as link:
        with running_server(link.server, link.server_if, link.server_ip, store, "--workers", str(workers)) as srv:
            n = 6
            for _ in range(n):
                r = link.client.run(["curl", "-sS", "--max-time", "10", f"http://{link.server_ip}/robots.txt"],
                                    text=False)
                assert r.stdout == files["robots.txt"]
            time.sleep(1.3)                      # every worker has reported since
            srv.proc.send_signal(signal.SIGUSR1)
            line = ""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not line.startswith("HABOOB-COUNTERS "):
                if select.select([srv.proc.stdout], [], [], 0.5)[0]:
                    line = srv.proc.stdout.readline()
            assert line.startswith("HABOOB-COUNTERS "), srv.stop(5)
            live = json.loads(line.split(" ", 1)[1])
            assert live["http_replies"] == n, live
            assert live["tcp_established"] == n and live["ring_rx_frames"] >= 4 * n, live
            if workers > 1:
                assert live["workers"] == workers
            r = link.client.run(["curl", "-sS", "--max-time", "10", f"http://{link.server_ip}/robots.txt"],
                                text=False)
            assert r.stdout == files["robots.txt"]       # still serving
        assert srv.counters["http_replies"] == n + 1, srv.counters
