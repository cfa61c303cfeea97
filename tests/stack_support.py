"""Helpers for the stack tests: a tiny compiled site, a scapy client, a fake clock.

`Client` plays the peer of a Stack over an in-memory wire: it builds frames
with scapy from template segments, feeds them to `stack.receive(frame, now)`,
and turns what the stack queued (`stack.txq`) into wire frames exactly as the
kernel would (rings.memory.virtio_complete). EVERY frame the stack emits is
checked with scapy: IP and TCP/ICMP checksums recomputed by scapy must equal
the ones sent, and GSO/NEEDS_CSUM frames must only appear with the matching
offload. Tests then assert on the scapy packets.
"""
import os

from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether

from appliance.content.compiler import Options, compile_site
from appliance.content.store import Store
from appliance.http import reply_bytes
from appliance.stack.iface import Stack, StackConfig
from appliance.stack.rings.base import Offload
from appliance.stack.rings.memory import virtio_complete

SERVER_MAC = "02:00:00:00:00:01"
CLIENT_MAC = "02:00:00:00:00:02"
SERVER_IP = "198.18.0.1"
CLIENT_IP = "198.18.0.2"
SECRET = b"k" * 32
SDE = 1700000000
NOW_UNIX = 1764150000

# a small site: an HTML page, a 24 KB file, a file whose length is odd and
# not a multiple of the MSS, an empty file
SITE = {
    "index.html": b"<!doctype html><title>t</title><p>hello\n",
    "big.bin": bytes((i * 7 + (i >> 8)) & 0xFF for i in range(24 * 1024)),
    "odd.txt": b"x" * 1460 * 3 + b"abc",
    "empty.txt": b"",
}


def make_store(tmp_path, mss=1460):
    root = tmp_path / "site"
    for rel, data in SITE.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    out = tmp_path / f"site-{mss}.store"
    compile_site(str(root), str(out), Options(mss=mss, source_date_epoch=SDE))
    return Store.open(str(out))


def make_stack(store, offload=Offload(), tls=None, http_factory=None, **cfg):
    st = Stack(store, bytes.fromhex(SERVER_MAC.replace(":", "")), SERVER_IP, 24, None, offload,
               StackConfig(**cfg), secret=SECRET, tls=tls, http_factory=http_factory)
    st.set_date(NOW_UNIX)
    return st


def check_frame(raw: bytes):
    """Parse a wire frame with scapy and verify every checksum by recomputing it with scapy."""
    p = Ether(raw)
    if IPv6 in p:
        assert p[IPv6].plen == len(raw) - 54, "IPv6 payload length"
        if TCP in p:
            q = Ether(raw)
            del q[TCP].chksum
            assert Ether(bytes(q))[TCP].chksum == p[TCP].chksum, f"bad TCP checksum in {p.summary()}"
        return p
    if IP in p:
        q = Ether(raw)
        del q[IP].chksum
        if TCP in q:
            del q[TCP].chksum
        if ICMP in q:
            del q[ICMP].chksum
        r = Ether(bytes(q))
        assert r[IP].chksum == p[IP].chksum, f"bad IP checksum in {p.summary()}"
        if TCP in p:
            assert r[TCP].chksum == p[TCP].chksum, f"bad TCP checksum in {p.summary()}"
        if ICMP in p:
            assert r[ICMP].chksum == p[ICMP].chksum, f"bad ICMP checksum in {p.summary()}"
        assert p[IP].len == len(raw) - 14 or len(raw) == 60, "IP total length"
    return p


class Client:
    """A TCP client speaking to `stack` through scapy-built frames, with a fake clock."""

    def __init__(self, stack, port=40000, ip=CLIENT_IP, mac=CLIENT_MAC, now=1000.0, mss=1460, wscale=7,
                 window=64240):
        self.st = stack
        self.port = port
        self.ip = ip
        self.mac = mac
        self.now = now
        self.mss = mss
        self.wscale = wscale
        self.window = window
        self.seq = 1000
        self.ack = 0
        self.sent = []          # every frame sent to the stack
        self.frames = []        # every frame received from the stack (scapy), all checked
        self.raw_frames = []    # the Frame tuples the stack queued

    # -- the wire
    def deliver(self, pkt):
        raw = bytes(pkt)
        self.sent.append(raw)
        self.st.receive(memoryview(raw), self.now)
        return self.collect()

    def collect(self):
        assert self.st.counters["drop_internal_error"] == 0, self.st.last_error
        out = []
        off = self.st.offload
        for fr in self.st.txq:
            self.raw_frames.append(fr)
            gso = fr[2]
            if gso is not None:
                assert off.csum, "NEEDS_CSUM frame without checksum offload"
                if gso.gso_size:
                    assert off.tso, "GSO frame without TSO"
            for raw in virtio_complete(fr):
                p = check_frame(raw)
                if gso is None or not gso.gso_size:
                    mtu_ok = len(raw) - 14 <= self.st.cfg.mtu
                    assert mtu_ok, f"frame of {len(raw)} bytes exceeds the MTU"
                out.append(p)
        self.st.txq.clear()
        self.frames.extend(out)
        return out

    def advance(self, dt):
        self.now += dt
        self.st.poll(self.now)
        return self.collect()

    def run_until(self, t):
        """Run the stack's timers up to time t (every deadline it reports)."""
        out = []
        while True:
            d = self.st.poll(self.now)
            out += self.collect()
            if d is None or d > t:
                break
            self.now = max(self.now, d)
        self.now = t
        self.st.poll(self.now)
        out += self.collect()
        return out

    # -- segments
    def seg(self, flags="A", seq=None, ack=None, data=b"", window=None, options=None, sport=None, dport=80):
        t = TCP(sport=sport or self.port, dport=dport, flags=flags,
                seq=self.seq if seq is None else seq, ack=self.ack if ack is None else ack,
                window=self.window if window is None else window, options=options or [])
        return Ether(src=self.mac, dst=SERVER_MAC) / IP(src=self.ip, dst=SERVER_IP) / t / data

    def send(self, flags="A", data=b"", advance=True, **kw):
        out = self.deliver(self.seg(flags, data=data, **kw))
        if advance and "seq" not in kw:
            self.seq += len(data) + (1 if "S" in flags else 0) + (1 if "F" in flags else 0)
        return out

    def syn(self, options=None):
        opts = options if options is not None else [("MSS", self.mss), ("WScale", self.wscale)]
        out = self.send("S", options=opts)
        return out

    def connect(self, options=None):
        out = self.syn(options)
        sa = [p for p in out if TCP in p and p[TCP].flags == "SA"]
        assert sa, f"no SYN-ACK: {[p.summary() for p in out]}"
        self.synack = sa[0]
        self.server_isn = sa[0][TCP].seq
        self.ack = (self.server_isn + 1) & 0xFFFFFFFF
        self.send("A")
        return sa[0]

    def request(self, path="/", headers=b"", method=b"GET"):
        return method + b" " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n"

    def data_segments(self, frames=None):
        return [p for p in (self.frames if frames is None else frames) if TCP in p and len(p[TCP].payload)]

    def ack_all(self, frames):
        """ACK everything the stack sent in `frames` (one cumulative ACK)."""
        end = self.ack
        for p in frames:
            if TCP in p:
                e = (p[TCP].seq + len(p[TCP].payload) + (1 if "F" in p[TCP].flags else 0)
                     + (1 if "S" in p[TCP].flags else 0)) & 0xFFFFFFFF
                if 0 < ((e - end) & 0xFFFFFFFF) < 0x80000000:
                    end = e
        self.ack = end
        return self.send("A")

    def fetch(self, frames_in, limit=200):
        """ACK every data segment as it arrives until the stack stops sending; returns
        the in-order byte stream received (by sequence number) and all frames."""
        stream = {}
        start = self.ack
        out = list(frames_in)
        pending = list(frames_in)
        for _ in range(limit):
            if not pending:
                break
            for p in pending:
                if TCP in p and len(p[TCP].payload):
                    stream[p[TCP].seq] = bytes(p[TCP].payload)
            pending = self.ack_all(pending)
            out += pending
        return assemble(stream, start), out

    def get(self, path="/", headers=b"", method=b"GET"):
        """Send one request and fetch the whole reply, ACKing as data arrives."""
        out = self.send("PA", data=self.request(path, headers, method))
        return self.fetch(out)


def assemble(stream: dict, start: int) -> bytes:
    """Concatenate {seq: bytes} from `start`, allowing overlaps (retransmissions)."""
    data = bytearray()
    seq = start
    progress = True
    while progress:
        progress = False
        for s, b in list(stream.items()):
            off = (seq - s) & 0xFFFFFFFF
            if off < len(b):
                data += b[off:]
                seq = (seq + len(b) - off) & 0xFFFFFFFF
                progress = True
    return bytes(data)


def expected(store, path, close=False, method="GET", date=None):
    """The exact bytes the appliance must send for a plain GET/HEAD of `path`."""
    from appliance.stack.iface import imf_fixdate
    from appliance.http import HTTPConnection
    h = HTTPConnection(store.site, store.blob)
    d = date or imf_fixdate(NOW_UNIX)
    h.now(d)
    req = f"{method} {path} HTTP/1.1\r\nHost: t\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
    (r,) = h.receive(req.encode())
    return reply_bytes(r, store.blob, d)


__all__ = ["make_store", "make_stack", "Client", "check_frame", "assemble", "expected", "SERVER_MAC",
           "CLIENT_MAC", "SERVER_IP", "CLIENT_IP", "SITE", "NOW_UNIX", "os", "ARP", "ICMP", "Offload"]
