"""In-memory microbenchmark of HTTPS: the stack's work per request over TLS.

Theory of operation: like bench/micro.py (a Stack driven directly, no
device, kernel or other process; only the calls into the stack are timed:
`receive`, `poll`, draining `txq`), with a TLS client (Python's ssl over
memory BIOs, untimed) on port 443 and a P-256 certificate made with the
openssl CLI. Three modes:

    keepalive   one connection, N requests for the file, ACKed as they come
    full        a new connection per request (Connection: close), full handshake
    resumed     the same with TLS 1.3 session resumption (a ticket from the first)

The figure is microseconds of stack CPU per request (handshake, AEAD, TCP),
the number to compare with `micro` for plain HTTP. `run(..., family=6)`:
the same over IPv6 to the stack's link-local address (TlsConn6), as
`micro --family 6` does for plain HTTP. The server offers TSO and
checksum offload as on veth, so ciphertext is not summed in software.
"""
from __future__ import annotations

import os
import ssl
import struct
import subprocess
import tempfile
import time

from appliance.stack.tls import TlsServer

from .micro import SYN_OPTS, frame4, frame6, make_stack


def _cert(d: str):
    crt, key = os.path.join(d, "b.crt"), os.path.join(d, "b.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", crt, "-days", "30", "-subj", "/CN=bench.test",
                    "-addext", "subjectAltName=DNS:bench.test"], check=True, capture_output=True)
    return crt, key


class _Conn:
    """One client connection: TCP by hand, TLS by an SSLObject."""

    def __init__(self, bench, sport, ctx, session=None):
        self.b = bench
        self.sport = sport
        self.ci, self.co = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.ci, self.co, server_hostname="bench.test", session=session)
        self.seq = (sport * 2654435761) & 0xFFFFFFFF
        out = bench.deliver(bench.mk(sport, self.seq, 0, 0x02, opts=SYN_OPTS))
        self.ack = (struct.unpack_from("!I", out[0][0], 38 + bench.off)[0] + 1) & 0xFFFFFFFF
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        self.fin = False
        bench.deliver(bench.mk(sport, self.seq, self.ack, 0x10))

    def _take(self, out):
        got = False
        o = self.b.off                          # 20 for IPv6 (TCP at 54)
        for head, rest, _ in out:
            thl = (head[46 + o] >> 4) << 2
            data = bytes(head[34 + o + thl:]) + (bytes(rest) if rest is not None else b"")
            s = struct.unpack_from("!I", head, 38 + o)[0]
            if data and s == self.ack:
                self.ci.write(data)
                self.ack = (self.ack + len(data)) & 0xFFFFFFFF
                got = True
            if head[47 + o] & 0x01:
                self.ack = (self.ack + 1) & 0xFFFFFFFF
                self.fin = got = True
        return got

    def send(self, data: bytes):
        out = []
        for i in range(0, len(data), 1448):
            out += self.b.deliver(self.b.mk(self.sport, self.seq, self.ack, 0x18, data[i:i + 1448]))
            self.seq = (self.seq + len(data[i:i + 1448])) & 0xFFFFFFFF
        while self._take(out):
            out = self.b.deliver(self.b.mk(self.sport, self.seq, self.ack, 0x10))

    def handshake(self):
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.send(self.co.read())
        d = self.co.read()
        if d:
            self.send(d)

    def get(self, req: bytes) -> bytes:
        """Send a request; everything decrypted once the stack has nothing more to send."""
        self.tls.write(req)
        self.send(self.co.read())
        got = b""
        while True:
            try:
                d = self.tls.read(1 << 20)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not d:
                break
            got += d
        return got

    def close(self):
        if self.fin:
            self.b.deliver(self.b.mk(self.sport, self.seq, self.ack, 0x11))


class _Bench:
    def __init__(self, st, family: int = 4):
        self.st = st
        self.now = 1000.0
        self.spent = 0.0
        if family == 6:
            ll = next(iter(st.ip6.addrs))
            self.mk = lambda *a, **k: frame6(ll, *a, dport=443, **k)      # noqa: E731
            self.off = 20
        else:
            self.mk = lambda *a, **k: frame4(*a, dport=443, **k)        # noqa: E731
            self.off = 0

    def deliver(self, f):
        st = self.st
        t0 = time.perf_counter()
        st.receive(f, self.now, True)
        st.poll(self.now)
        out = list(st.txq)
        st.txq.clear()
        self.spent += time.perf_counter() - t0
        return out


def run(mode: str = "keepalive", size: int = 4096, requests: int = 2000, family: int = 4) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        crt, key = _cert(tmp)
        st, path = make_stack(size, tmp, family, tls=TlsServer(crt, key))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(crt)
        b = _Bench(st, family)
        req = f"GET {path} HTTP/1.1\r\nHost: bench.test\r\n".encode()
        if mode == "keepalive":
            c = _Conn(b, 40000, ctx)
            c.handshake()
            want = len(c.get(req + b"\r\n"))
            if want < size:
                raise RuntimeError("short reply")
            b.spent = 0.0
            for _ in range(requests):
                b.now += 0.0001
                if len(c.get(req + b"\r\n")) != want:
                    raise RuntimeError("short reply")
        else:
            sess = None
            if mode == "resumed":
                c = _Conn(b, 39999, ctx)
                c.handshake()
                c.get(req + b"Connection: close\r\n\r\n")
                sess = c.tls.session
                c.close()
            b.spent = 0.0
            for i in range(requests):
                b.now += 0.0001
                c = _Conn(b, 40000 + i % 20000, ctx, sess)
                c.handshake()
                if len(c.get(req + b"Connection: close\r\n\r\n")) < size:
                    raise RuntimeError("short reply")
                if mode == "resumed" and not c.tls.session_reused:
                    raise RuntimeError("the session was not resumed")
                c.close()
        cnt = st.counters
        if cnt.get("drop_internal_error", 0):
            raise RuntimeError(st.last_error)
        return {"mode": mode, "size": size, "requests": requests, "family": family,
                "us_per_req": b.spent * 1e6 / requests,
                "full": cnt["tls_handshakes_full"], "resumed": cnt["tls_handshakes_resumed"]}
