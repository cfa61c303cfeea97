"""`python -m bench fuzz`: random and mutated frames and HTTP requests at scale.

Theory of operation. One `Stack` on a small compiled site, driven in memory
with a fake clock (no device, no kernel, no root). Two sources feed it, in
proportion, until both quotas are met:

- `Garbage`: frames of every layer, built directly from bytes (no scapy: it
  is 100x too slow for a million frames): random bytes, Ethernet with any
  type, ARP with random fields, IPv4 with options, fragments, bad lengths and
  checksums, ICMP, TCP cycling through every flag combination (NS included)
  with random option lists (any kind, any length, bad lengths), aimed at our
  port, other ports and live 4-tuples; and mutations (bit flips, truncation,
  extension, byte sets) of recent valid frames, half of them with their
  checksums fixed so that the mutation reaches TCP.
- `Peer`s: TCP clients with real sequence numbers. "clean" peers send a
  long pipeline of valid GETs and read slowly through a small receive
  buffer (their window closes and opens, they retransmit unacknowledged
  request bytes go-back-N with their newest ACK and window, as Linux does);
  what they receive is compared byte for byte with what the HTTP layer
  says the replies are. "hostile" peers send mutated requests (unique
  targets fill the reply cache, huge heads, bodies, chunked, splices),
  pipelined, cut at random, out of order and duplicated, with fast, slow
  or zero windows, and end with a FIN, a RST, or by going silent.

Every frame the stack emits is checked: IP and TCP checksums, lengths, and
the window rule of RFC 9293 §3.8.6: no data byte beyond the right edge
(SEG.ACK + SEG.WND) of the most recent acceptable segment the peer sent
(one byte at the edge into a zero window is a probe, allowed), nor beyond
the largest edge it ever advertised. Which peer segments are acceptable is
taken from the stack's own RCV.NXT (RFC 9293 §3.10.7.4). A peer whose frames
were mutated or spoofed is no longer checked (the stack may rightly have
taken a mutated window). At the end every peer goes silent and the clock
runs on until the stack has expired everything: the connection and
TIME-WAIT tables must be empty.

`run()` returns a dict of figures (also used by tests/test_stack_fuzz.py
and tests/test_stack_memory.py, with small quotas). `idle(n)` opens n idle
connections and lets the idle timeout close them, for RSS against live
objects; `costs()` measures what each table entry and a connection cost
(docs/internals.md, "Memory bounds"). The fuzzer runs in the stack's
process, so RSS includes its own peers; tracemalloc figures are given for
the stack's allocations (appliance/ code) apart.
"""
from __future__ import annotations

import bisect
import gc
import os
import random
import struct
import tempfile
import time
import tracemalloc as _tm

from appliance.content.compiler import Options, compile_site
from appliance.content.store import Store
from appliance.http import HTTPConnection, reply_bytes
from appliance.stack.iface import Stack, StackConfig
from appliance.stack.rings.base import Offload, frame_bytes
from appliance.stack.rings.memory import virtio_complete
from appliance.stack.wire import csum, sum_ok

MASK = 0xFFFFFFFF
HALF = 0x80000000
SERVER_MAC = bytes.fromhex("020000000001")
SERVER_IP = bytes([198, 18, 0, 1])
DATE_UNIX = 1764150000
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_TCP_IN = struct.Struct("!HHIIBBH")
_clock = time.perf_counter

SITE = {
    "index.html": b"<!doctype html><title>fuzz</title><p>hello\n",
    "big.bin": bytes((i * 7 + (i >> 8)) & 0xFF for i in range(24 * 1024)),
    "odd.txt": b"x" * 1460 * 3 + b"abc",
    "empty.txt": b"",
    "sub/index.html": b"<p>sub</p>\n" * 20,
    "sub/page.html": b"<p>page</p>\n" * 300,
}
# paths of the clean pipelines, small replies weighted up (long pipelines, quick to run)
CLEAN_PATHS = [b"/", b"/", b"/", b"/empty.txt", b"/empty.txt", b"/nope", b"/sub", b"/sub/"] * 6 + [
    b"/odd.txt", b"/sub/page.html", b"/big.bin"]
PATHS = list(dict.fromkeys(CLEAN_PATHS)) + [b"/index.html", b"/%7e", b"/a%00b", b"/../etc", b"//x", b"/sub/./page.html",
                       b"http://h/odd.txt", b"*", b"/%zz", b"/\xff"]


def make_site(workdir: str, mss: int = 1460) -> Store:
    root = os.path.join(workdir, "site")
    for rel, data in SITE.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    out = os.path.join(workdir, "fuzz.store")
    compile_site(root, out, Options(mss=mss, source_date_epoch=1700000000))
    return Store.open(out)


def client_addr(i: int) -> tuple[bytes, bytes]:
    """(IP, MAC) of client number i: 198.18.1.1 ... in our /16."""
    i %= 60000
    return bytes([198, 18, 1 + i // 250, 1 + i % 250]), bytes([2, 0, 0xC0]) + i.to_bytes(3, "big")


# ----------------------------------------------------------------- frames

def ip_packet(src, dst, proto, payload, ident=0, frag=0x4000, ttl=64, opts=b"", tos=0, tl=None) -> bytes:
    ihl = 5 + len(opts) // 4
    h = bytearray(_IP.pack(0x40 | ihl, tos, ihl * 4 + len(payload) if tl is None else tl, ident, frag, ttl,
                           proto, 0, src, dst))
    h += opts
    h[10:12] = csum(h).to_bytes(2, "big")
    return bytes(h) + payload


def tcp_bytes(src, dst, sport, dport, seq, ack, flags, win, payload=b"", opts=b"", off=None) -> bytes:
    thl = 20 + len(opts)
    offb = (thl << 2) if off is None else off
    t = bytearray(_TCP.pack(sport, dport, seq & MASK, ack & MASK, offb, flags & 0xFF, win & 0xFFFF, 0, 0))
    t += opts
    t += payload
    t[16:18] = csum(t, int.from_bytes(src + dst, "big") + 6 + len(t)).to_bytes(2, "big")
    return bytes(t)


def tcp_frame(mac, src, sport, seq, ack, flags, win, payload=b"", opts=b"", dport=80) -> bytes:
    return (SERVER_MAC + mac + b"\x08\x00" +
            ip_packet(src, SERVER_IP, 6, tcp_bytes(src, SERVER_IP, sport, dport, seq, ack, flags, win, payload, opts)))


def fix_checksums(b: bytearray) -> bytes:
    """Recompute the IP header and TCP/ICMP checksums of a (mutated) frame where its
    lengths allow, so that the mutation gets past the checksum checks."""
    if len(b) >= 34 and b[12] == 8 and b[13] == 0:
        ihl = (b[14] & 15) * 4
        if ihl >= 20 and 14 + ihl <= len(b):
            b[24:26] = b"\0\0"
            b[24:26] = csum(b[14:14 + ihl]).to_bytes(2, "big")
            tl = (b[16] << 8) | b[17]
            end = 14 + tl
            p = 14 + ihl
            if b[23] == 6 and p + 20 <= end <= len(b):
                b[p + 16:p + 18] = b"\0\0"
                b[p + 16:p + 18] = csum(b[p:end], int.from_bytes(b[26:34], "big") + 6 + end - p).to_bytes(2, "big")
            elif b[23] == 1 and p + 4 <= end <= len(b):
                b[p + 2:p + 4] = b"\0\0"
                b[p + 2:p + 4] = csum(b[p:end]).to_bytes(2, "big")
    return bytes(b)


def mutate(rng: random.Random, raw: bytes) -> bytearray:
    b = bytearray(raw)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        k = rng.random()
        if not b:
            b += rng.randbytes(rng.randrange(1, 80))
        elif k < 0.4:
            i = rng.randrange(len(b) * 8)
            b[i >> 3] ^= 1 << (i & 7)
        elif k < 0.6:
            b[rng.randrange(len(b))] = rng.choice((0, 0xFF, rng.randrange(256)))
        elif k < 0.75:
            del b[rng.randrange(len(b)):]
        elif k < 0.9:
            b += bytes([rng.randrange(256)]) * rng.randrange(1, 64)
        else:       # a header field anywhere in the first 60 bytes set to a random 16-bit value
            i = rng.randrange(min(len(b), 60))
            b[i:i + 2] = rng.randbytes(2)
    return b


def random_tcp_options(rng: random.Random) -> bytes:
    """0..40 bytes of options: real kinds with right and wrong lengths, unknown kinds,
    EOL/NOP runs, a length running past the end."""
    out = bytearray()
    for _ in range(rng.randrange(0, 8)):
        k = rng.choice((0, 1, 1, 2, 2, 3, 3, 4, 5, 8, 8, rng.randrange(9, 256)))
        if k in (0, 1):
            out.append(k)
            continue
        right = {2: 4, 3: 3, 4: 2, 8: 10}.get(k, rng.choice((2, 10, 18, 26, 34)))
        ln = right if rng.random() < 0.6 else rng.randrange(0, 42)
        out += bytes((k, ln)) + rng.randbytes(max(0, min(ln, 40) - 2))
    out = out[:40]
    while len(out) % 4:
        out.append(rng.choice((0, 1)))
    return bytes(out)


class Garbage:
    """Random and mutated frames of every layer (see the module docstring)."""

    def __init__(self, fz):
        self.fz = fz
        self.rng = fz.rng
        self.flags = 0          # cycles through every 9-bit TCP flag combination (NS CWR ECE URG ACK PSH RST SYN FIN)
        self.kinds = (self.raw, self.ether, self.arp, self.ipv4, self.icmp, self.tcp, self.tcp, self.tcp,
                      self.tcp_live, self.mutated, self.mutated, self.mutated)

    def frame(self) -> bytes:
        return self.rng.choice(self.kinds)()

    def _src(self):
        r = self.rng.random()
        if r < 0.8:
            return client_addr(self.rng.randrange(60000))
        ip = self.rng.choice((bytes(4), b"\xff\xff\xff\xff", b"\x7f\0\0\1", b"\xe0\0\0\1", SERVER_IP,
                              bytes([198, 18, 255, 255]), self.rng.randbytes(4)))
        return ip, self.rng.randbytes(6)

    def _dst_mac(self):
        return self.rng.choice((SERVER_MAC, SERVER_MAC, SERVER_MAC, b"\xff" * 6, self.rng.randbytes(6)))

    def raw(self):
        rng = self.rng
        b = rng.randbytes(rng.randrange(0, 120))
        return (SERVER_MAC + b) if rng.random() < 0.5 else b

    def ether(self):
        rng = self.rng
        et = rng.choice((b"\x08\x00", b"\x08\x06", b"\x86\xdd", b"\x81\x00", rng.randbytes(2)))
        return self._dst_mac() + rng.randbytes(6) + et + rng.randbytes(rng.randrange(0, 100))

    def arp(self):
        rng = self.rng
        ip, mac = self._src()
        tpa = SERVER_IP if rng.random() < 0.7 else rng.randbytes(4)
        body = struct.pack("!HHBBH6s4s6s4s", rng.choice((1, 1, 1, 6)), rng.choice((0x800, 0x800, 0x86DD)),
                           rng.choice((6, 6, 6, 8)), rng.choice((4, 4, 4, 16)), rng.choice((1, 2, 1, 2, 3, 0)),
                           mac, ip, rng.randbytes(6), tpa)
        if rng.random() < 0.1:
            body = body[:rng.randrange(len(body))]
        return self._dst_mac() + mac + b"\x08\x06" + body + bytes(rng.choice((0, 18)))

    def ipv4(self):
        rng = self.rng
        ip, mac = self._src()
        opts = rng.randbytes(4 * rng.randrange(0, 11)) if rng.random() < 0.4 else b""
        proto = rng.choice((6, 1, 17, 41, 58, rng.randrange(256)))
        frag = rng.choice((0x4000, 0x2000, 0x2000 | rng.randrange(1, 0x2000), rng.randrange(1, 0x2000), 0x8000,
                           rng.randrange(0x10000)))
        payload = (tcp_bytes(ip, SERVER_IP, rng.randrange(65536), 80, rng.randrange(1 << 32), 0, 2, 1000)
                   if proto == 6 else rng.randbytes(rng.randrange(0, 80)))
        tl = None if rng.random() < 0.6 else rng.randrange(0, 200)
        raw = ip_packet(ip, SERVER_IP, proto, payload, rng.randrange(65536), frag, rng.randrange(256), opts,
                        rng.randrange(256), tl)
        if rng.random() < 0.1:
            b = bytearray(raw)
            b[0] = rng.randrange(256)           # version / IHL
            raw = bytes(b)
        return self._dst_mac() + mac + b"\x08\x00" + raw

    def icmp(self):
        rng = self.rng
        ip, mac = self._src()
        body = bytes((rng.choice((8, 8, 0, 3, 11, 5, rng.randrange(256))), rng.choice((0, 0, rng.randrange(256))),
                      0, 0)) + rng.randbytes(rng.randrange(0, 1400 if rng.random() < 0.1 else 64))
        body = body[:2] + csum(body).to_bytes(2, "big") + body[4:]
        if rng.random() < 0.2:
            body = bytes(mutate(rng, body))
        return SERVER_MAC + mac + b"\x08\x00" + ip_packet(ip, SERVER_IP, 1, body)

    def tcp(self, key=None):
        rng = self.rng
        self.flags = (self.flags + 1) % 512
        fl = self.flags
        if key is None:
            ip, mac = self._src()
            sport = rng.randrange(65536)
            dport = rng.choice((80, 80, 80, 0, 443, rng.randrange(65536)))
        else:
            ip, mac, sport = key
            dport = 80
        opts = random_tcp_options(rng) if rng.random() < 0.5 else b""
        data = rng.randbytes(rng.randrange(0, 1500 if rng.random() < 0.1 else 40)) if rng.random() < 0.4 else b""
        off = None if rng.random() < 0.9 else (rng.randrange(16) << 4)
        t = tcp_bytes(ip, SERVER_IP, sport, dport, rng.randrange(1 << 32), rng.randrange(1 << 32), fl & 0xFF,
                      rng.choice((0, 1, 65535, rng.randrange(65536))), data, opts, off)
        if fl & 0x100:                          # NS: the low bit of the data offset byte
            t = t[:12] + bytes((t[12] | 1,)) + t[13:]
            t = fix_checksums(bytearray(SERVER_MAC + mac + b"\x08\x00" + ip_packet(ip, SERVER_IP, 6, t)))
            return t
        return SERVER_MAC + mac + b"\x08\x00" + ip_packet(ip, SERVER_IP, 6, t)

    def tcp_live(self):
        """A random segment on the 4-tuple of a live peer (which is then no longer checked)."""
        peers = self.fz.peer_list
        if not peers:
            return self.tcp()
        p = self.rng.choice(peers)
        if p.kind == "clean":
            return self.tcp()
        p.checked = False
        return self.tcp((p.ip, p.mac, p.port))

    def mutated(self):
        recent = self.fz.recent
        if not recent:
            return self.tcp()
        raw, p = recent[self.rng.randrange(len(recent))]
        p.checked = False
        b = mutate(self.rng, raw)
        return fix_checksums(b) if self.rng.random() < 0.5 else bytes(b)


# --------------------------------------------------------------- requests

def valid_request(rng: random.Random, path: bytes, uniq: int | None = None) -> bytes:
    method = rng.choice((b"GET",) * 10 + (b"HEAD", b"HEAD", b"POST", b"OPTIONS", b"BREW", b"get"))
    target = path + (b"?u=%d" % uniq if uniq is not None else b"")
    ver = rng.choice((b"HTTP/1.1",) * 8 + (b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/1"))
    h = [method + b" " + target + b" " + ver, b"Host: h"]
    body = b""
    for name, vals in ((b"Accept-Encoding", (b"gzip", b"br;q=1, gzip;q=0", b"*")),
                       (b"Range", (b"bytes=0-99", b"bytes=-10", b"bytes=5-", b"bytes=99999-", b"bytes=1-2,4-5")),
                       (b"If-None-Match", (b'"x"', b"*", b'W/"y"')),
                       (b"If-Modified-Since", (b"Sun, 06 Nov 1994 08:49:37 GMT", b"Thu, 01 Jan 2099 00:00:00 GMT")),
                       (b"Connection", (b"close", b"keep-alive", b"upgrade")),
                       (b"User-Agent", (b"fuzz/" + b"x" * rng.randrange(0, 300),))):
        if rng.random() < 0.15:
            h.append(name + b": " + rng.choice(vals))
    r = rng.random()
    if r < 0.05:
        body = rng.randbytes(rng.randrange(0, 300))
        h.append(b"Content-Length: %d" % len(body))
    elif r < 0.08:
        body = b"5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n"
        h.append(b"Transfer-Encoding: chunked")
    return b"\r\n".join(h) + b"\r\n\r\n" + body


_SPECIAL = (b"\0", b"\r", b"\n", b" ", b":", b"%00", b"\r\n", b"\r\n\r\n", b"\t", b"\x7f", b"\xff", b"%", b"?", b"#")


def mutate_request(rng: random.Random, req: bytes, other: bytes) -> bytes:
    b = bytearray(req)
    for _ in range(rng.choice((1, 1, 2, 3))):
        k = rng.random()
        n = len(b)
        i = rng.randrange(n + 1)
        if k < 0.2 and n:
            j = rng.randrange(n * 8)
            b[j >> 3] ^= 1 << (j & 7)
        elif k < 0.35:
            b[i:i] = rng.choice(_SPECIAL)
        elif k < 0.45:
            b[i:i] = rng.randbytes(rng.randrange(1, 20))
        elif k < 0.55:
            del b[i:i + rng.randrange(1, 20)]
        elif k < 0.62:
            j = rng.randrange(n + 1)
            b[i:i] = b[min(i, j):max(i, j)][:200]
        elif k < 0.7:
            del b[i:]
        elif k < 0.76:
            b = bytearray(bytes(b).replace(b"\r\n", b"\n"))
        elif k < 0.8:
            b[i:i] = b"X-Big: " + b"a" * rng.choice((100, 5000, 9000, 20000)) + b"\r\n"
        elif k < 0.84:
            b[4:4] = b"/" + b"p" * rng.choice((1000, 9000))
        elif k < 0.88:
            b[i:i] = b"\r\n folded"
        elif k < 0.92:
            b = bytearray(bytes(b).swapcase())
        elif k < 0.96:
            b = b[:i] + other[rng.randrange(len(other) + 1):]
        else:
            b[i:i] = b"Content-Length: " + rng.choice((b"5, 5", b"-1", b"99999999999", b"1\r\nContent-Length: 2"))
            b[i:i] += b"\r\n"
    return bytes(b)


# ------------------------------------------------------------------ peers

class Peer:
    """A TCP client of the fuzz run, with its own sequence numbers (see the module docstring)."""

    def __init__(self, fz, ip, mac, port, kind, requests, now):
        rng = fz.rng
        self.fz = fz
        self.ip, self.mac, self.port = ip, mac, port
        self.key = ip + SERVER_IP + port.to_bytes(2, "big") + b"\x00\x50"
        self.kind = kind
        self.checked = True
        self.iss = rng.randrange(1 << 32)
        self.out = b"".join(requests)
        self.ends = []
        e = 0
        for r in requests:
            e += len(r)
            self.ends.append(e)
        self.sent = 0               # bytes of `out` sent (go-back-N: reset to `acked` on timeout)
        self.max_sent = 0
        self.acked = 0              # bytes of `out` the server acknowledged
        self.fin_sent = False
        self.rcv_nxt = None         # the server's next sequence number (after its SYN-ACK)
        self.edge = None            # right edge (SEG.ACK + SEG.WND) of our latest acceptable segment
        self.max_edge = None
        self.got_fin = False
        self.state = "syn"
        self.created = self.progress = now
        self.stream = bytearray() if kind == "clean" else None
        self.received = 0
        self.ws = rng.choice((None, 0, 0, 2, 7)) if kind == "hostile" else rng.choice((None, 0))
        self.mss = rng.choice((None, 536, 1200, 1460, 1460, 9000, 64, 1)) if kind == "hostile" else 1460
        slow = kind == "clean" or rng.random() < 0.4
        self.buf = rng.choice((2048, 4096, 8192, 16384)) if slow else 1 << 20
        self.rate = rng.choice((16000, 32000, 64000)) if slow else 1 << 30    # bytes read per second
        self.unread = 0
        self.adv_space = self.buf
        self.zero_until = now + rng.random() * 2 if kind == "hostile" and rng.random() < 0.15 else 0.0
        self.ooo = kind == "hostile" and rng.random() < 0.3
        self.end = ("fin" if kind == "clean" else
                    rng.choice(("fin", "fin", "rst", "silent", "idle", "halfclose")))
        self.seg_max = 1460 if kind == "clean" else rng.choice((1, 7, 100, 536, 1460))
        self.parked = False         # out of the ticked pool (Fuzzer.step), still routed
        self.rto = 0.3
        self.ack_pending = 0        # in-order segments not yet acknowledged (delayed ACK)
        self.ack_due = 0.0
        self.last_rtx = now
        self.ack_t = now            # when the server last acknowledged new request bytes

    # -- sending
    def _window(self, now):
        space = max(0, self.buf - self.unread)
        if now < self.zero_until:
            space = 0
        ws = self.ws or 0
        return min(space >> ws, 65535), ws

    def _send(self, seq, flags, payload=b"", opts=b"", now=0.0, track=True):
        fz = self.fz
        if self.rcv_nxt is None:
            ack = 0
            win, ws = min(self.buf, 65535), 0
        else:
            ack = self.rcv_nxt
            win, ws = self._window(now)
            if flags & 0x04 == 0:
                flags |= 0x10
        if flags & 0x10:
            self.ack_pending = 0
        raw = tcp_frame(self.mac, self.ip, self.port, seq, ack, flags, win, payload, opts)
        if track and self.rcv_nxt is not None and not flags & 0x06 and self.state != "syn":
            # the window of an acceptable segment becomes the edge the stack must respect
            c = fz.st.conns.get(self.key)
            if c is not None:
                d = (seq - c.rcv_nxt) & MASK
                slen = len(payload) + (flags & 1)
                if d < c.rwnd or (slen and ((seq + slen - 1 - c.rcv_nxt) & MASK) < c.rwnd):
                    if ((ack - c.snd_una) & MASK) <= ((c.snd_max - c.snd_una) & MASK):
                        e = (ack + (win << ws)) & MASK
                        self.edge = e
                        if self.max_edge is None or ((e - self.max_edge) & MASK) < HALF:
                            self.max_edge = e
        if self.kind == "hostile":
            fz.remember(raw, self)
        self.adv_space = win << ws
        fz.push(raw)

    def start(self, now):
        opts = b""
        if self.mss is not None:
            opts += b"\x02\x04" + min(self.mss, 65535).to_bytes(2, "big")
        if self.ws is not None:
            opts += b"\x01\x03\x03" + bytes((self.ws,))
        while len(opts) % 4:
            opts += b"\x01"
        self._send(self.iss, 0x02, opts=opts, now=now)

    def tick(self, now):
        if self.state in ("done", "silent"):
            return
        if self.state == "syn":
            if now - self.created > 1.0:
                self.state = "done"             # no SYN-ACK (cookies, limits, a mutated SYN): give up
            return
        if self.state == "closing" and now - self.progress > 3.0:
            self.state = "done"                 # our FIN unanswered (e.g. a mutated copy reset the 4-tuple)
            return
        rng = self.fz.rng
        # the application reads
        if self.unread:
            n = min(self.unread, max(1, int(self.rate * self.fz.dt)))
            self.unread -= n
            win, ws = self._window(now)
            if (win << ws) >= self.adv_space + min(self.buf // 2, 1460) or (win and not self.adv_space):
                self._send(self._seq(), 0x10, now=now)      # window update
        if self.ack_pending and now >= self.ack_due:
            self._send(self._seq(), 0x10, now=now)          # our delayed ACK
        # request bytes: new ones at SND.NXT (max_sent); after a timeout, go back to the
        # first unacknowledged byte (`sent`), with our newest ACK and window, as Linux
        # does; our ACKs carry SND.NXT
        base = (self.iss + 1) & MASK
        if self.sent < self.acked:
            self.sent = self.acked
        if self.max_sent > self.acked and now - self.ack_t > self.rto and now - self.last_rtx > self.rto:
            self.sent = self.acked
            self.last_rtx = now
            self.rto = min(2 * self.rto, 4.0)               # RFC 6298 (5.5)
            self.fz.counts["peer_retransmits"] += 1
        budget = 4
        while self.sent < len(self.out) and budget:
            budget -= 1
            n = min(self.seg_max, len(self.out) - self.sent, 1460)
            if self.sent < self.max_sent:
                n = min(n, self.max_sent - self.sent)
            elif self.ooo and rng.random() < 0.3 and self.sent + n < len(self.out):
                # the next segment first, then this one (a reordering network)
                m = min(n, len(self.out) - self.sent - n)
                self._send((base + self.sent + n) & MASK, 0x18, self.out[self.sent + n:self.sent + n + m], now=now)
            payload = self.out[self.sent:self.sent + n]
            self._send((base + self.sent) & MASK, 0x18, payload, now=now)
            if self.ooo and rng.random() < 0.1:
                self._send((base + self.sent) & MASK, 0x18, payload, now=now)      # a duplicate
            self.sent += n
            self.max_sent = max(self.max_sent, self.sent)
        if self.max_sent == len(self.out) and self.state == "est":
            self._finish(now)

    def _seq(self):
        return (self.iss + 1 + self.max_sent + (1 if self.fin_sent else 0)) & MASK

    def _finish(self, now):
        """All requests sent: how this peer ends."""
        e = self.end
        if e in ("fin", "halfclose") and self.acked == len(self.out):
            self._send(self._seq(), 0x11, now=now)
            self.fin_sent = True
            self.state = "closing"
        elif e == "rst" and now - self.progress > 0.05:
            self._send(self._seq(), 0x04, now=now)
            self.state = "done"
        elif e == "silent" and now - self.progress > 0.2:
            self.state = "silent"
        elif e == "idle":
            pass                                            # keep-alive: the server's idle timeout ends it

    # -- receiving
    def on_segment(self, seq, ack, flags, win, payload, now):
        fz = self.fz
        if self.state in ("done", "silent"):
            return
        if self.parked:
            self._parked_segment(seq, ack, flags, win, payload, now)
            return
        if flags & 0x04:
            self.state = "done"
            return
        if self.state == "syn":
            if flags & 0x12 == 0x12 and ack == (self.iss + 1) & MASK:
                self.rcv_nxt = (seq + 1) & MASK
                self.state = "est"
                self.progress = now
                self._send((self.iss + 1) & MASK, 0x10, now=now)
            return
        if flags & 0x10:
            a = (ack - self.iss - 1) & MASK
            if a <= len(self.out) and a > self.acked:
                self.acked = a
                self.progress = self.ack_t = now
                self.rto = 0.3
        n = len(payload)
        if n:
            if self.checked:
                fz.check_window(self, seq, n)
            whole = False
            if seq == self.rcv_nxt:
                room = (self.edge - seq) & MASK if self.edge is not None else n
                take = 0 if room >= HALF else min(n, room)     # bytes beyond our window are dropped
                self.rcv_nxt = (seq + take) & MASK
                self.unread += take
                self.received += take
                if self.stream is not None:
                    self.stream += payload[:take]
                self.progress = now
                whole = take == n
            fz.counts["peer_acks"] += 1
            if whole and not self.ack_pending and not flags & 0x01:
                self.ack_pending += 1                       # delayed: every second segment, or 40 ms
                self.ack_due = now + 0.04
            else:
                self._send(self._seq(), 0x10, now=now)
        if flags & 0x01 and ((seq + n) & MASK) == self.rcv_nxt and not self.got_fin:
            self.got_fin = True
            self.rcv_nxt = (self.rcv_nxt + 1) & MASK
            if self.fin_sent:
                self._send(self._seq(), 0x10, now=now)
                self.state = "done"
            elif self.kind == "clean" or self.end in ("fin", "idle", "silent"):
                self.sent = self.max_sent = len(self.out)
                self._send(self._seq(), 0x11, now=now)
                self.fin_sent = True
                self.state = "closing"
            else:
                self._send(self._seq(), 0x10, now=now)
        elif self.fin_sent and flags & 0x10 and ack == ((self.iss + 2 + len(self.out)) & MASK) and self.got_fin:
            self.state = "done"

    def _parked_segment(self, seq, ack, flags, win, payload, now):
        self.parked = False
        try:
            self.on_segment(seq, ack, flags, win, payload, now)
        finally:
            self.parked = True
        if self.state in ("done", "silent"):
            self.fz.peers.pop(self.key, None)

    def requests_sent(self) -> int:
        return bisect.bisect_right(self.ends, self.max_sent)


# ------------------------------------------------------------------ the run

_APPLIANCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "appliance", "*")


def live_kb() -> dict | None:
    """Live Python memory (tracemalloc, after a collection), in kB: all of it, and
    what was allocated by appliance/ code (the stack's own objects, not the
    fuzzer's); None when not tracing."""
    if not _tm.is_tracing():
        return None
    gc.collect()
    snap = _tm.take_snapshot().filter_traces([_tm.Filter(True, _APPLIANCE)])
    stack = sum(s.size for s in snap.statistics("filename"))
    return {"all": _tm.get_traced_memory()[0] // 1024, "stack": stack // 1024}


def rss() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "VmHWM"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


class Fuzzer:
    def __init__(self, store, seed=0, offload=Offload(), config=StackConfig(), dt=0.002, check_bounds=False):
        self.rng = random.Random(seed)
        self.store = store
        self.st = Stack(store, SERVER_MAC, "198.18.0.1", 16, None, offload, config, secret=b"f" * 32)
        self.st.set_date(DATE_UNIX)
        self.date = self.st.date
        self.now = 1000.0
        self.dt = dt
        self.check_bounds = check_bounds
        self.peers = {}             # 4-tuple key -> Peer (live)
        self.peer_list = []
        self.recent = []            # (raw frame, peer) of hostile peers' recent frames
        self.garbage = Garbage(self)
        self.counts = dict(garbage_frames=0, peer_frames=0, frames_out=0, frames_out_unrouted=0,
                           bad_frames_out=0, window_violations=0, window_violations_max=0, window_excess_max=0,
                           zero_window_probes=0, wrong_bytes_peers=0, clean_peers_verified=0, requests=0,
                           peer_retransmits=0, peer_acks=0, peers=0, ack_storms=0, bound_exceeded=0)
        self.violations = []        # the first few, for the report
        self.stack_time = 0.0       # seconds spent inside Stack.receive and Stack.poll
        self.next_client = 0
        self.bad = []
        self.max_tables = {}

    # -- the wire
    def remember(self, raw, peer):
        r = self.recent
        if len(r) < 64:
            r.append((raw, peer))
        else:
            r[self.rng.randrange(64)] = (raw, peer)

    def push(self, raw, garbage=False):
        self.counts["garbage_frames" if garbage else "peer_frames"] += 1
        t = _clock()
        self.st.receive(raw, self.now)
        self.stack_time += _clock() - t
        self.drain()

    def drain(self):
        st = self.st
        for _ in range(10000):
            q = st.txq
            if not q:
                return
            st.txq = []
            for fr in q:
                self.frame_out(fr)
        self.counts["ack_storms"] += 1

    def frame_out(self, fr):
        c = self.counts
        raws = [frame_bytes(fr)] if fr[2] is None else virtio_complete(fr)
        for b in raws:
            c["frames_out"] += 1
            if len(b) < 34 or b[12:14] != b"\x08\x00":
                continue                                        # ARP
            tl = (b[16] << 8) | b[17]
            ok = b[14] == 0x45 and sum_ok(b[14:34]) and (tl == len(b) - 14 or (len(b) == 60 and tl < 46))
            if ok and b[23] == 6:
                ok = tl >= 40 and sum_ok(b[34:14 + tl], int.from_bytes(b[26:34], "big") + 6 + tl - 20)
            if not ok:
                c["bad_frames_out"] += 1
                if len(self.bad) < 5:
                    self.bad.append(b[:64].hex())
                continue
            if b[23] != 6:
                continue
            sport, dport, seq, ack, off, flags, win = _TCP_IN.unpack_from(b, 34)
            p = self.peers.get(b[30:34] + SERVER_IP + dport.to_bytes(2, "big") + b"\x00\x50")
            if p is None:
                c["frames_out_unrouted"] += 1
                continue
            p.on_segment(seq, ack, flags, win, b[34 + ((off >> 4) << 2):14 + tl], self.now)

    def check_window(self, p, seq, n):
        if p.edge is None:
            return
        end = (seq + n) & MASK
        over = (end - p.edge) & MASK
        if 0 < over < HALF:
            if n == 1 and seq == p.edge:
                self.counts["zero_window_probes"] += 1
                return
            c = self.counts
            c["window_violations"] += 1
            c["window_excess_max"] = max(c["window_excess_max"], over)
            if len(self.violations) < 5:
                self.violations.append(f"{p.kind} peer :{p.port} seq={seq} len={n} edge={p.edge} over={over}")
            if p.max_edge is not None and 0 < ((end - p.max_edge) & MASK) < HALF:
                c["window_violations_max"] += 1

    # -- peers
    def new_peer(self, kind, requests):
        i = self.next_client
        self.next_client += 1
        ip, mac = client_addr(i // 3)                           # a few connections per client address
        port = 1024 + (i * 7919) % 64000
        key = ip + SERVER_IP + port.to_bytes(2, "big") + b"\x00\x50"
        if key in self.peers:
            return None
        p = Peer(self, ip, mac, port, kind, requests, self.now)
        self.peers[key] = p
        self.peer_list.append(p)
        self.counts["peers"] += 1
        p.start(self.now)
        return p

    def retire(self, p):
        self.peers.pop(p.key, None)
        self.counts["requests"] += p.requests_sent()
        if p.kind == "clean":
            self.verify(p)

    def verify(self, p):
        """The bytes a clean peer received must be a prefix of the replies to its requests."""
        h = HTTPConnection(self.store.site, self.store.blob)
        h.now(self.date)
        exp = b"".join(reply_bytes(r, self.store.blob, self.date) for r in h.receive(p.out))
        if p.stream != exp[:len(p.stream)]:
            self.counts["wrong_bytes_peers"] += 1
            if len(self.violations) < 10:
                i = next(i for i in range(len(p.stream)) if p.stream[i] != exp[i]) if len(exp) >= len(p.stream) \
                    else len(exp)
                self.violations.append(f"clean peer :{p.port} wrong byte at {i} of {len(p.stream)}")
        elif len(p.stream) == len(exp):
            self.counts["clean_peers_verified"] += 1

    def hostile_requests(self, n):
        rng = self.rng
        out = []
        for _ in range(n):
            uniq = rng.randrange(1 << 30) if rng.random() < 0.5 else None
            r = valid_request(rng, rng.choice(PATHS), uniq)
            if rng.random() < 0.8:
                r = mutate_request(rng, r, valid_request(rng, rng.choice(PATHS)))
            out.append(r)
        return out

    def clean_requests(self, n):
        rng = self.rng
        return [b"GET " + rng.choice(CLEAN_PATHS) + b" HTTP/1.1\r\nHost: h\r\n" +
                (b"Range: bytes=3-40\r\n" if rng.random() < 0.05 else b"") + b"\r\n" for _ in range(n)]

    def step(self):
        self.now += self.dt
        t = _clock()
        self.st.poll(self.now)
        self.stack_time += _clock() - t
        self.drain()
        live = []
        for p in self.peer_list:
            p.tick(self.now)
            if p.state == "done" or (p.state == "silent" and p.kind != "clean"):
                self.retire(p)
            elif p.end == "idle" and p.state == "est" and p.acked == len(p.out) and not p.ack_pending:
                # a keep-alive peer waiting for the server's idle timeout: it leaves the pool
                # (not to hold a slot for a minute) but still answers the server's FIN
                self.counts["requests"] += p.requests_sent()
                p.parked = True
            elif self.now - p.created > (120.0 if p.kind == "clean" else 20.0):
                p.state = "silent"
                self.retire(p)
            if not p.parked and p.key in self.peers:
                live.append(p)
        self.peer_list = live
        if self.check_bounds:
            self.bounds()

    def bounds(self):
        for name, (n, bound) in self.st.tables().items():
            if n > self.max_tables.get(name, -1):
                self.max_tables[name] = n
            if bound is not None and n > bound:
                self.counts["bound_exceeded"] += 1
                if len(self.violations) < 10:
                    self.violations.append(f"table {name}: {n} > {bound}")

    def finish(self, horizon=1500.0):
        """Every peer goes silent; run the clock until the stack has expired everything."""
        for p in self.peer_list:
            if p.state != "done":
                p.state = "silent"
            self.retire(p)
        self.peer_list = []
        self.peers.clear()
        end = self.now + horizon
        while self.now < end:
            d = self.st.poll(self.now)
            self.drain()
            if self.check_bounds:
                self.bounds()
            if not self.st.conns and not self.st.tw:
                break
            self.now = min(max(d, self.now + 0.001), end)
        self.st.poll(self.now)
        self.drain()


def drive(fz, frames, requests, clean=4, hostile=48, pipeline=(100, 600), progress=None, patience=60.0) -> None:
    """Push `frames` garbage frames and `requests` HTTP requests (from up to `clean`
    slow pipelines and `hostile` peers at a time) through `fz`; garbage goes in
    proportion to the requests planned so far. At the end, pipelines still going
    get `patience` (fake) seconds from their start to finish."""
    rng = fz.rng
    g = fz.garbage
    c = fz.counts
    g0 = c["garbage_frames"]
    r0 = c["requests"]
    planned = 0                 # requests of the live peers + those sent by the retired ones
    last_report = time.perf_counter()
    while c["garbage_frames"] - g0 < frames or c["requests"] - r0 < requests or fz.peer_list:
        n_clean = sum(1 for p in fz.peer_list if p.kind == "clean")
        # the quota counts requests whose bytes were all sent (Peer.requests_sent)
        planned = c["requests"] - r0 + sum(len(p.ends) for p in fz.peer_list)
        while planned < requests and len(fz.peer_list) < clean + hostile:
            if n_clean < clean:
                k = min(rng.randrange(*pipeline), requests - planned)
                if fz.new_peer("clean", fz.clean_requests(k)):
                    planned += k
                    n_clean += 1
            elif rng.random() < 0.3:
                # one whole valid request with a unique target in one segment: fills the reply cache
                p = fz.new_peer("hostile", [valid_request(rng, rng.choice(CLEAN_PATHS), rng.randrange(1 << 30))])
                if p:
                    p.seg_max, p.ooo = 1460, False
                    planned += 1
            else:
                k = min(rng.choice((1, 1, 2, 3, 5, 10, 30)), requests - planned)
                if fz.new_peer("hostile", fz.hostile_requests(k)):
                    planned += k
        target = frames if planned >= requests else frames * planned // max(1, requests)
        for _ in range(min(200, target - (c["garbage_frames"] - g0))):
            fz.push(g.frame(), garbage=True)
        fz.step()
        if c["requests"] - r0 >= requests and c["garbage_frames"] - g0 >= frames and fz.peer_list:
            # let the long pipelines finish (not forever); the rest go silent (finish())
            if all(p.kind != "clean" or fz.now - p.created > patience for p in fz.peer_list):
                break
        if fz.now - 1000.0 > 1e6:
            raise RuntimeError("the fuzz run makes no progress (the stack takes no connections?)")
        if progress and time.perf_counter() - last_report > 5:
            last_report = time.perf_counter()
            progress(f"{c['garbage_frames'] - g0} garbage frames, {c['requests'] - r0} requests sent, "
                     f"{len(fz.st.conns)} connections, fake time {fz.now - 1000:.0f} s")


def run(frames=1_000_000, requests=100_000, seed=0, offload="sw", clean=4, hostile=48, pipeline=(100, 600),
        trace=False, check_bounds=False, progress=None, config=None) -> dict:
    """The fuzz run (see the module docstring); returns its figures."""
    off = {"sw": Offload(), "csum": Offload(True, False), "tso": Offload(True, True)}[offload]
    if trace:
        _tm.start()
    with tempfile.TemporaryDirectory(prefix="haboob-fuzz-") as tmp:
        store = make_site(tmp)
        fz = Fuzzer(store, seed, off, config or StackConfig(), check_bounds=check_bounds)
        gc.collect()
        mem0 = rss()
        traced0 = live_kb()
        c = fz.counts
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        drive(fz, frames, requests, clean, hostile, pipeline, progress)
        cpu = time.process_time() - cpu0
        busy = time.perf_counter() - t0
        gc.collect()
        mem_peak = rss()
        traced_peak = live_kb()
        peak = _tm.get_traced_memory()[1] // 1024 if trace else None
        tables_busy = {k: v[0] for k, v in fz.st.tables().items()}
        fz.finish()
        gc.collect()
        mem1 = rss()
        traced1 = live_kb()
        st = fz.st
        total = c["garbage_frames"] + c["peer_frames"]
        res = dict(seed=seed, offload=offload, seconds=round(busy, 1), cpu_seconds=round(cpu, 1),
                   frames_per_s=round(total / busy) if busy else 0,
                   frames_per_cpu_s=round(total / cpu) if cpu else 0, stack_seconds=round(fz.stack_time, 1),
                   stack_frames_per_s=round(total / fz.stack_time) if fz.stack_time else 0, **c,
                   frames_in=total, drop_internal_error=st.counters["drop_internal_error"],
                   last_error=st.last_error, drops={k: v for k, v in st.counters.drops().items()},
                   counters=st.counters.as_dict(), violations=fz.violations, bad_frame_heads=fz.bad,
                   conns_left=len(st.conns), time_wait_left=len(st.tw), tables_busy=tables_busy,
                   tables_end={k: v[0] for k, v in st.tables().items()},
                   bounds={k: v[1] for k, v in st.tables().items()}, max_tables=fz.max_tables,
                   fake_seconds=round(fz.now - 1000.0, 1),
                   memory={"start": mem0, "busy": mem_peak, "end": mem1})
        if trace:
            res["traced_kb"] = {"start": traced0, "busy": traced_peak, "peak_all": peak, "end": traced1}
            _tm.stop()
        store.close()
    return res


def failures(res: dict) -> list[str]:
    """What makes the run fail (the command exits non-zero)."""
    out = []
    for k in ("drop_internal_error", "bad_frames_out", "wrong_bytes_peers", "window_violations",
              "bound_exceeded", "conns_left", "time_wait_left"):
        if res.get(k):
            out.append(f"{k} = {res[k]}")
    return out


def idle(n=50_000, seed=0, trace=True) -> dict:
    """`n` idle keep-alive connections opened, held, then closed by the server's idle
    timeout (FIN, the client's FIN, TIME-WAIT expiry): live memory (tracemalloc)
    and RSS at each point. The difference between the two after the close is
    CPython's allocator keeping its arenas, not live objects."""
    if trace:
        _tm.start()
    with tempfile.TemporaryDirectory(prefix="haboob-idle-") as tmp:
        store = make_site(tmp)
        fz = Fuzzer(store, seed, Offload(), StackConfig(max_conns=max(n, 1024)))
        gc.collect()
        m = {"start": (rss(), live_kb())}
        for i in range(n):
            p = fz.new_peer("clean", [])
            p.end = "idle"                                  # it answers the server's FIN with its own
        m["open"] = (rss(), live_kb())
        opened = len(fz.st.conns)
        # the server's idle timeout: FIN; the peers answer with theirs (Peer.on_segment)
        fz.now += fz.st.cfg.idle_timeout + 1
        fz.st.poll(fz.now)
        fz.drain()
        fz.finish()
        fz.peer_list = []
        m["closed"] = (rss(), live_kb())
        left = len(fz.st.conns) + len(fz.st.tw)
        for k in ("_tmpl_cache", "_conn_tmpl", "_opts_cache", "_mss_cache", "_hdr_cache"):
            getattr(fz.st, k).clear()
        fz.st.isn._fcache.clear()
        m["caches_cleared"] = (rss(), live_kb())
        store.close()
    if trace:
        _tm.stop()
    return {"connections": opened, "left": left,
            "memory": {k: {"rss_kb": v[0].get("VmRSS"), "anon_kb": v[0].get("RssAnon"),
                           "live_kb": v[1]} for k, v in m.items()}}


def text_report(res: dict) -> str:
    """The figures of a run, for people."""
    m = res["memory"]
    lines = [
        f"fuzz (seed {res['seed']}, offload {res['offload']}): {res['frames_in']} frames in "
        f"({res['garbage_frames']} random/mutated, {res['peer_frames']} from {res['peers']} TCP peers), "
        f"{res['requests']} HTTP requests, {res['frames_out']} frames out, in {res['seconds']} s "
        f"({res['cpu_seconds']} s of CPU): {res['frames_per_s']} frames/s ({res['frames_per_cpu_s']} per CPU "
        f"second, the fuzzer's own work included); inside the stack {res['stack_seconds']} s = "
        f"{res['stack_frames_per_s']} frames/s; {res['fake_seconds']} s of fake time",
        f"drop_internal_error: {res['drop_internal_error']}" + (f" ({res['last_error']})" if res['last_error'] else ""),
        f"frames out with a bad checksum or length: {res['bad_frames_out']}",
        f"window violations (data beyond the peer's latest right edge): {res['window_violations']} "
        f"(beyond the largest ever: {res['window_violations_max']}; worst excess {res['window_excess_max']} bytes; "
        f"zero-window probes seen: {res['zero_window_probes']})",
        f"clean pipelines verified byte for byte: {res['clean_peers_verified']}, wrong bytes: "
        f"{res['wrong_bytes_peers']}",
        f"tables over their bound: {res['bound_exceeded']}; left after the clock ran out: "
        f"{res['conns_left']} connections, {res['time_wait_left']} TIME-WAIT",
        "memory (kB)  start -> busy -> end: RSS {} -> {} -> {}, anonymous {} -> {} -> {}".format(
            *(m[k].get("VmRSS") for k in ("start", "busy", "end")),
            *(m[k].get("RssAnon") for k in ("start", "busy", "end"))),
    ]
    if "traced_kb" in res:
        t = res["traced_kb"]
        lines.append(f"live Python memory (tracemalloc, kB; the stack's own / everything): start {t['start']['stack']}"
                     f" / {t['start']['all']} -> busy {t['busy']['stack']} / {t['busy']['all']} -> end "
                     f"{t['end']['stack']} / {t['end']['all']} (peak of everything {t['peak_all']})")
    lines.append("largest table sizes seen / bound: " + ", ".join(
        f"{k} {v}/{res['bounds'].get(k) or '-'}" for k, v in sorted(res["max_tables"].items())))
    lines.append("drops by reason: " + ", ".join(f"{k[5:]} {v}" for k, v in sorted(res["drops"].items())))
    for v in res["violations"]:
        lines.append("  " + v)
    if "idle" in res:
        i, t = res["idle"], res.get("idle_traced", {"memory": {}})
        lines.append(f"idle: {i['connections']} connections opened, {i['left']} left after the idle timeout "
                     "and TIME-WAIT; memory (kB): RSS, anonymous (without tracemalloc); live objects "
                     "(tracemalloc): the stack's, everything (the fuzzer's peers too)")
        for k, v in i["memory"].items():
            lv = t["memory"].get(k, {}).get("live_kb") or {}
            lines.append(f"  {k:15s} RSS {v['rss_kb']}, anonymous {v['anon_kb']}; live: the stack's "
                         f"{lv.get('stack')}, everything {lv.get('all')}")
    return "\n".join(lines)


def costs() -> dict:
    """Bytes of live memory (tracemalloc) that each
    table costs per entry when clients fill it with distinct keys, and what one
    connection costs idle and at its worst. The figures of docs/internals.md,
    "Memory bounds"."""
    from appliance.stack.iface import (CONN_TMPL_MAX, HDR_CACHE_MAX, MSS_CACHE_MAX, OPTS_CACHE_MAX,
                                       TMPL_CACHE_MAX)
    from appliance.stack import isn as isn_mod
    out = {}
    _tm.start()
    try:
        with tempfile.TemporaryDirectory(prefix="haboob-costs-") as tmp:
            store = make_site(tmp)
            cfg = StackConfig()

            def fresh():
                st = Stack(store, SERVER_MAC, "198.18.0.1", 16, None, Offload(), cfg, secret=b"c" * 32)
                st.set_date(DATE_UNIX)
                return st

            def per_entry(name, bound, fill, n=2000):
                st = fresh()
                fill(st, 0)                          # lazily made things out of the way
                fill(st, n + 1)
                a = live_kb_exact()
                for i in range(1, n + 1):
                    fill(st, i)
                b = live_kb_exact()
                per = (b - a) / n
                out[name] = {"bound": bound, "bytes_per_entry": round(per), "worst_kb": round(per * bound / 1024)}

            def syn_tables(st, i):
                ip, mac = client_addr(i)
                st.template(mac, ip, 1024 + i)
            per_entry("conn_tmpl (+ tmpl_cache)", CONN_TMPL_MAX, syn_tables)

            def opts(st, i):
                ip, mac = client_addr(i)
                t = st.template(mac, ip, 1024 + i)
                st.opts_template(t[0], t[1], st._synack_ws)
            per_entry("opts_cache (+ templates)", OPTS_CACHE_MAX, opts)
            per_entry("isn_cache", isn_mod._FCACHE_MAX, lambda st, i: st.isn.isn(client_addr(i)[0] + SERVER_IP +
                                                                                   (1024 + i).to_bytes(4, "big"), 1.0))
            per_entry("mss_cache", MSS_CACHE_MAX, lambda st, i: st.mss_params(100 + i), n=MSS_CACHE_MAX - 2)
            per_entry("arp", cfg.arp_cache_size, lambda st, i: st.arp.learn(client_addr(i)[0], client_addr(i)[1], 1.0),
                      n=cfg.arp_cache_size - 2)

            def tw(st, i):
                ip, mac = client_addr(i)
                st.tw[ip + SERVER_IP + (1024 + i).to_bytes(2, "big") + b"\0\x50"] = (1060.0 + i, 12345678 + i,
                                                                                         87654321 + i, mac)
            per_entry("time_wait", cfg.max_conns, tw)
            hdr_n = min(HDR_CACHE_MAX, 2 * len(store.site.responses))
            resps = store.site.responses
            per_entry("hdr_cache", hdr_n, lambda st, i: st.patched(resps[i % len(resps)], bool(i // len(resps) & 1)),
                      n=hdr_n - 1)
            lim = HTTPConnection(store.site, store.blob).limits
            cache = HTTPConnection.reply_cache(store.site)
            cache.clear()
            a = live_kb_exact()
            n = 0
            while cache.nbytes + 4000 <= lim.cache_bytes:
                HTTPConnection(store.site, store.blob).receive(b"GET /?%d HTTP/1.1\r\nHost: h\r\nX: %s\r\n\r\n"
                                                              % (n, b"a" * 3950))
                n += 1
            b = live_kb_exact()
            out["reply_cache, full in bytes (4 KB keys)"] = {"entries": n, "worst_kb": round((b - a) / 1024)}
            cache.clear()
            a = live_kb_exact()
            for n in range(lim.cache_entries):
                HTTPConnection(store.site, store.blob).receive(b"GET /?%d HTTP/1.1\r\nHost: h\r\nX: %s\r\n\r\n"
                                                              % (n, b"a" * (lim.cache_bytes // lim.cache_entries - 45)))
            b = live_kb_exact()
            out["reply_cache, full in entries (256 B keys)"] = {"entries": len(cache),
                                                                 "worst_kb": round((b - a) / 1024)}
            cache.clear()
            for k, v in conn_costs(fresh, store).items():
                out[k] = v
            store.close()
    finally:
        _tm.stop()
    return out


def live_kb_exact() -> int:
    """Live traced bytes after a collection (tracemalloc must be on). Everything, not
    only appliance/ allocations: table keys are often the client's bytes."""
    gc.collect()
    return _tm.get_traced_memory()[0]


def conn_costs(fresh, store) -> dict:
    """One connection's live bytes: idle after the handshake, keep-alive after a
    request, and at its worst: a request head just under Limits.max_head buffered;
    the out-of-order queue full (ooo_segments segments, ooo_limit bytes); the send
    queue full of dynamic (206) replies behind a zero window, at max_queued and
    with what the one delivery that crosses it can add (a hole filled, with all
    the queued out-of-order requests behind it)."""
    out = {}
    st = fresh()
    mac, ip = bytes([2, 0, 0, 0, 0, 9]), bytes([198, 18, 9, 9])
    lim = HTTPConnection(store.site, store.blob).limits
    cfg = st.cfg

    def handshake(port, win=0):
        st.receive(tcp_frame(mac, ip, port, 1000, 0, 0x02, 0, opts=b"\x02\x04\x05\xb4"), 1.0)
        sisn = struct.unpack_from("!I", st.txq[0][0], 38)[0]
        st.txq.clear()
        st.receive(tcp_frame(mac, ip, port, 1001, sisn + 1, 0x10, win), 1.0)   # window 0: nothing goes out
        st.txq.clear()
        return sisn + 1

    def send(port, seq, ack, data, win=0):
        st.receive(tcp_frame(mac, ip, port, seq, ack, 0x18, win, data), 2.0)
        st.txq.clear()
        return seq + len(data)

    handshake(30000)                                          # lazily made things out of the way
    n = 200
    a = live_kb_exact()
    for i in range(n):
        handshake(31000 + i)
    out["connection, idle after the handshake"] = {"bytes": round((live_kb_exact() - a) / n)}
    get = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    a = live_kb_exact()
    for i in range(n):
        ack = handshake(33000 + i, 65535)
        send(33000 + i, 1001, ack, get, 65535)
        rlen = len(reply_bytes(HTTPConnection(store.site, store.blob).receive(get)[0], store.blob))
        st.receive(tcp_frame(mac, ip, 33000 + i, 1001 + len(get), ack + rlen, 0x10, 65535), 2.0)
        st.txq.clear()
    out["connection, keep-alive after a request"] = {"bytes": round((live_kb_exact() - a) / n)}
    # a head just under max_head, buffered
    a = live_kb_exact()
    ack = handshake(32001)
    head = b"GET / HTTP/1.1\r\nX: " + b"h" * (lim.max_head - 40)
    seq = 1001
    for i in range(0, len(head), 1460):
        seq = send(32001, seq, ack, head[i:i + 1460])
    n = len(head)
    del head                                                  # (this copy is not the stack's)
    out["connection, request head buffered"] = {"bytes": live_kb_exact() - a, "head": n}
    # the out-of-order queue full: requests beyond a hole
    req = b"GET / HTTP/1.1\r\nHost:a\r\nRange:bytes=0-0\r\n\r\n"
    seg = req * (cfg.ooo_limit // cfg.ooo_segments // len(req))
    a = live_kb_exact()
    ack = handshake(32002)
    nxt = 1001 + len(seg)
    for i in range(cfg.ooo_segments):
        nxt = send(32002, nxt, ack, seg)
    c = st.conns[ip + SERVER_IP + (32002).to_bytes(2, "big") + b"\0\x50"]
    out["connection, out-of-order queue full"] = {"bytes": live_kb_exact() - a, "segments": len(c.ooo),
                                                  "queued_bytes": c.ooo_bytes}
    # the send queue: pipelined Range requests (each reply a dynamic header and a body view)
    a = live_kb_exact()
    ack = handshake(32000)
    c = st.conns[ip + SERVER_IP + (32000).to_bytes(2, "big") + b"\0\x50"]
    seq = 1001
    while len(c.q) < cfg.max_queued:
        seq = send(32000, seq, ack, req * (1460 // len(req)))
    out["connection, send queue at max_queued (206 replies)"] = {"bytes": live_kb_exact() - a, "items": len(c.q)}
    # then the worst: the queue one below the limit, the out-of-order queue full
    # behind a hole, and the hole filled: one delivery of all of it
    nxt = seq + len(seg)
    for i in range(cfg.ooo_segments):
        nxt = send(32000, nxt, ack, seg)
    del c.q[cfg.max_queued - 1:]
    c.data_end = c.q[-1][1]
    send(32000, seq, ack, seg)
    out["connection, worst (send queue after one delivery)"] = {"bytes": live_kb_exact() - a, "items": len(c.q)}
    return out


def costs_text(res: dict) -> str:
    lines = ["live bytes per table entry and per connection (tracemalloc):"]
    for k, v in res.items():
        lines.append(f"  {k}: " + ", ".join(f"{a} {b}" for a, b in v.items()))
    return "\n".join(lines)
