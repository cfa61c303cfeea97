"""Helpers for the TLS tests: certificates made with the openssl CLI, and a TLS
client (Python's ssl over memory BIOs) that talks to a Stack through the
in-memory wire of stack_support.Client (scapy-checked frames, fake clock)."""
import os
import ssl
import subprocess

from scapy.layers.inet import TCP

from appliance.stack.tls import TlsServer
from tests.stack_support import Client, make_stack

NAMES = ("www.test", "*.example.test")


def make_cert(d, name="srv", days=30, key="ec", cn="www.test", names=NAMES, ca=None):
    """A self-signed (or `ca`-signed: (cert, key)) certificate and key in `d`; returns (cert, key) paths."""
    crt, k = os.path.join(d, name + ".crt"), os.path.join(d, name + ".key")
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if key == "ec" else ["-newkey", "rsa:2048"]
    san = "subjectAltName=" + ",".join(("IP:" if n[0].isdigit() else "DNS:") + n for n in names)
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", *newkey, "-nodes", "-keyout", k, "-out", crt,
                        "-days", str(days), "-subj", "/CN=" + cn, "-addext", san],
                       check=True, capture_output=True)
    else:
        csr = os.path.join(d, name + ".csr")
        ext = os.path.join(d, name + ".ext")
        with open(ext, "w") as f:
            f.write(san + "\n")
        subprocess.run(["openssl", "req", "-new", *newkey, "-nodes", "-keyout", k, "-out", csr,
                        "-subj", "/CN=" + cn], check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1],
                        "-CAcreateserial", "-out", crt, "-days", str(days), "-extfile", ext],
                       check=True, capture_output=True)
    return crt, k


def make_ca(d, name="ca"):
    crt, k = os.path.join(d, name + ".crt"), os.path.join(d, name + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", k, "-out", crt, "-days", "60", "-subj", "/CN=Test CA " + name,
                    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign"],
                   check=True, capture_output=True)
    return crt, k


def tls_stack(store, cert, *, tls_kw=None, **cfg):
    srv = TlsServer(cert[0], cert[1], **(tls_kw or {}))
    return make_stack(store, tls=srv, **cfg)


def client_context(cafile, version=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


class TlsClient(Client):
    """A Client on port 443 with an SSLObject on top. `drop(p)` (set by a test)
    says which received data segments are lost on the way."""

    def __init__(self, stack, ctx, server_hostname="www.test", session=None, **kw):
        super().__init__(stack, **kw)
        self.ci, self.co = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.ci, self.co, server_hostname=server_hostname, session=session)
        self.rx = {}            # seq -> payload received, not yet in order
        self.fin = False
        self.drop = None
        self.plain = b""        # decrypted bytes received
        self.ciphertext = b""   # the in-order TCP stream received

    def seg(self, flags="A", dport=443, **kw):
        return super().seg(flags, dport=dport, **kw)

    def send_bytes(self, data: bytes):
        out = []
        for i in range(0, len(data), self.mss):
            out += self.send("PA", data=data[i:i + self.mss])
        return out

    def pump(self, frames, limit=500):
        """Take the data in `frames`, ACK it, and go on while the stack sends more;
        in-order ciphertext goes to the SSLObject."""
        for _ in range(limit):
            got = False
            for p in frames:
                if TCP not in p:
                    continue
                t = p[TCP]
                n = len(t.payload)
                if self.drop is not None and n and self.drop(p):
                    continue
                if n or "F" in t.flags:
                    self.rx[t.seq] = (bytes(t.payload), "F" in t.flags)
            progress = True
            while progress:
                progress = False
                for s, (b, fin) in list(self.rx.items()):
                    off = (self.ack - s) & 0xFFFFFFFF
                    if off <= len(b) and off < 0x80000000:
                        del self.rx[s]
                        if off < len(b):
                            self.ciphertext += b[off:]
                            self.ci.write(b[off:])
                            self.ack = (self.ack + len(b) - off) & 0xFFFFFFFF
                            progress = got = True
                        if fin and not self.fin:
                            self.fin = True
                            self.ack = (self.ack + 1) & 0xFFFFFFFF
                            progress = got = True
                    elif off >= 0x80000000 + 0:
                        pass                # beyond a hole: keep it
            if not got:
                return
            frames = self.send("A")

    def flush(self):
        """Send what the SSLObject wrote, and take the answer."""
        d = self.co.read()
        if d:
            self.pump(self.send_bytes(d))

    def handshake(self):
        for _ in range(20):
            try:
                self.tls.do_handshake()
                self.flush()
                return
            except ssl.SSLWantReadError:
                self.flush()
        raise AssertionError("handshake did not complete")

    def read_all(self):
        """Decrypt everything received so far into self.plain; True once close_notify came."""
        while True:
            try:
                d = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return False
            except ssl.SSLZeroReturnError:
                return True
            if not d:
                return True
            self.plain += d

    def request(self, raw: bytes):
        self.tls.write(raw)
        self.flush()
        self.read_all()
