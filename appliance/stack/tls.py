"""TLS termination on our TCP (HTTPS on `StackConfig.tls_port`), through the stdlib's `ssl`.

Theory of operation. `TlsServer` holds one `ssl.SSLContext` per Stack (per
worker): TLS 1.2 and 1.3 only, ECDHE + AEAD suites only for 1.2 (1.3's suites
are all AEAD), no compression, no renegotiation (OP_NO_RENEGOTIATION: a
renegotiating ClientHello is answered with a no_renegotiation alert), ALPN
`http/1.1`, no 0-RTT (OpenSSL accepts early data only when
SSL_CTX_set_max_early_data is called, which the stdlib never does). The
TLS behaviour of a connection is one mixin, `TlsMixin`, put in front of
either TCP: `TlsConn` (TlsMixin, Conn: IPv4) and `TlsConn6` (TlsMixin,
Conn6: IPv6, conn6.py), so both families share every line below and the
same TlsServer (certificate, tickets, handshake table, counters). The mixin
overrides four methods of the TCP connection (reaching the TCP ones through
super(), i.e. Conn's or Conn6's) and so costs the plain-HTTP path nothing:

- `_deliver(data)`: received TCP bytes go into the connection's `SSLObject`
  through a memory BIO (`SSLContext.wrap_bio`); handshake output is queued
  as ciphertext; decrypted plaintext goes to the same HTTPConnection as on
  port 80 (keep-alive, pipelining, conditional requests, ranges, gzip, error
  pages are that layer's). Its Replies are kept as references to the
  prebuilt responses in the store (`pending`), not copied. The access log
  (appliance/obs) notes them at once and follows each from when its last
  record is written (`Observer.tls_sent`: then its end in the ciphertext
  stream is known) until that is acknowledged.
- `_acked(ack)`: after the TCP queue frees what the peer acknowledged, more
  plaintext is encrypted (`_fill`).
- `close()`: deferred until every pending reply is encrypted; then a
  close_notify alert (RFC 8446 §6.1) precedes our FIN.

Send queue and retransmission. With `ssl` a record cannot be re-encrypted
under a chosen sequence number, so the ciphertext is kept: every chunk that
OpenSSL writes becomes a dynamic item of the TCP send queue (conn.py's
tuple with the ciphertext as its body, a memoryview, no stored sums: the TCP
checksum is computed in software, `tcp_tx_sw_csum`, or offloaded), resent
from there by RTO/fast retransmit and freed when acked. The queue is
bounded: plaintext is encrypted only while the unacknowledged+unsent
ciphertext is below min(`tls_queue_max`, the peer's window + one full
record); a client that stops reading holds at most that much per
connection, and the rest of its response stays in the store. Requests are
read from the TLS object only while fewer than `max_queued` replies wait;
beyond that the ciphertext waits in the receive BIO, bounded by
`TLS_RX_MAX` (exceeded: the connection is reset, `tls_rx_overflow`).

Record sizing (dynamic record sizing, as Cloudflare's nginx ssl_dyn_rec
patch and Google's servers do): the first `small_records` records of a
connection, and again the first ones after it was idle (nothing written
for more than `dyn_rec_timeout`, 1 s as ssl_dyn_rec_timeout), carry exactly
SMSS - overhead plaintext bytes, so that each record fills one TCP segment
and the browser can decrypt the first bytes without waiting for a 16 KB
record's last segment (the congestion window is small then: after the
handshake, and TCP restarts it after idle, RFC 5681 §4.1). On a busy
keep-alive connection the window is open and responses are cut in full
16 KB records (least overhead, fewest AEAD calls), as stock nginx does. The
count runs per connection, across responses. The overhead per record is
fixed by the negotiated version and AEAD (`RECORD_OVERHEAD`), so the cut
depends only on (SMSS, overhead) and is computed once per connection.
The ciphertext of one batch (small records and full ones alike) is one
send-queue item: a small record is exactly SMSS, TCP cuts an item into
SMSS segments from its start, so each still travels as one segment.

Handshakes. One in progress has a deadline (`tls_handshake_timeout`, the
connection is reset, `tls_handshake_timeout`), and at most `max_handshakes`
exist per Stack (more: reset, `tls_drop_handshake_limit`). A half-open TLS
connection holds an SSL object with OpenSSL's buffers (measured: about 40 KB
after a ClientHello; docs/internals.md) plus at most TLS_RX_MAX of unread
ciphertext. SNI is checked against the certificate's names in the
sni_callback: a mismatch is served all the same (there is one certificate)
and counted (`tls_sni_mismatch`, `tls_sni_missing`).

Resumption: TLS 1.3 tickets (`num_tickets` per full handshake, stateless,
encrypted under keys OpenSSL generates at random inside the SSLContext,
never written anywhere) and TLS 1.2 session IDs/tickets from OpenSSL's
in-memory cache. The stdlib gives no access to the ticket keys
(SSL_CTX_set_tlsext_ticket_key_cb is not exposed): they are rotated by
replacing the whole context every `ticket_rotate` seconds; tickets issued
under the old context then fall back to a full handshake.

Counters: tls_handshakes_full / _resumed, tls_handshake_failed_<reason>
(OpenSSL's reason, e.g. wrong_version_number, no_shared_cipher,
unsupported_protocol, or the alert the client sent), tls_version_<v>,
tls_cipher_<suite>, tls_bytes_encrypted (plaintext bytes written),
tls_bytes_ciphertext. The private key is only ever a file name here: no
counter, log line or error text contains key material.
"""
import os
import re
import ssl

from .conn import CLOSED, Conn, _EMPTY
from .conn6 import Conn6
from .seq import MASK

__all__ = ["TlsServer", "TlsMixin", "TlsConn", "TlsConn6", "TlsError", "check_chain", "record_plan",
           "RECORD_OVERHEAD", "TLS_RX_MAX"]

# TLS 1.2 suites: ECDHE key exchange and AEAD only (RFC 5246 + RFC 5289 / RFC 7905)
CIPHERS_12 = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1:!SHA256:!SHA384:!kRSA:!PSK:!SRP"
# bytes added to a record: 5 header + 16 tag (+1 inner content type in 1.3; +8 explicit nonce for GCM in 1.2)
RECORD_OVERHEAD = {"TLSv1.3": 22, ("TLSv1.2", "GCM"): 29, ("TLSv1.2", "CHACHA20"): 21}
MAX_RECORD = 16384              # TLS plaintext per record (RFC 8446 §5.1)
TLS_RX_MAX = 65536              # unread ciphertext kept per connection
_FILL_CHUNK = 4 * MAX_RECORD    # plaintext encrypted per SSLObject.write for full-size records


class TlsError(Exception):
    """Bad certificate or key material: the message names the file and the problem (never key bytes)."""


def _decode_cert(path, what):
    try:
        return ssl._ssl._test_decode_cert(path)
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"{what}: not a valid PEM certificate ({getattr(e, 'reason', None) or e})") from None


def _pem_blocks(text: str, path: str):
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S)
    if not blocks:
        raise TlsError(f"{path}: no PEM certificate in the file")
    return blocks


def check_chain(certfile: str, keyfile: str, tmpdir: str = None) -> dict:
    """Load and check a certificate chain and its key. Returns {"names", "not_after",
    "not_after_ts", "fingerprint_sha256", "chain"}. Raises TlsError naming the file:
    unreadable or bad PEM, a key that does not match, certificates out of order
    (each must be issued by the next), an expired leaf."""
    import hashlib
    import tempfile
    for what, p in (("certificate", certfile), ("key", keyfile)):
        if not os.path.isfile(p):
            raise TlsError(f"{what} file {p}: does not exist")
    try:
        with open(certfile, encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TlsError(f"certificate file {certfile}: cannot read ({e})") from None
    blocks = _pem_blocks(text, f"certificate file {certfile}")
    infos = []
    with tempfile.TemporaryDirectory(dir=tmpdir) as d:
        for i, b in enumerate(blocks):
            p = os.path.join(d, f"{i}.pem")
            with open(p, "w") as f:
                f.write(b + "\n")
            infos.append(_decode_cert(p, f"certificate file {certfile}, certificate {i + 1}"))
    try:
        der = ssl.PEM_cert_to_DER_cert(blocks[0] + "\n")
    except ValueError as e:
        raise TlsError(f"certificate file {certfile}: {e}") from None
    for i in range(len(infos) - 1):
        if infos[i].get("issuer") != infos[i + 1].get("subject"):
            raise TlsError(f"certificate file {certfile}: chain out of order: certificate {i + 1} is not "
                           f"issued by certificate {i + 2} (leaf first, then each issuer)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(certfile, keyfile, password=_no_password)
    except ssl.SSLError as e:
        reason = (e.reason or "").lower()
        if "mismatch" in reason:
            raise TlsError(f"key file {keyfile}: does not match the certificate in {certfile}") from None
        raise TlsError(f"key file {keyfile}: not a usable PEM private key (or one encrypted with a passphrase)"
                       + (f" ({e.reason.lower()})" if e.reason else "")) from None
    leaf = infos[0]
    names = [v for k, v in leaf.get("subjectAltName", ()) if k in ("DNS", "IP Address")]
    if not names:
        names = [v for rdn in leaf.get("subject", ()) for k, v in rdn if k == "commonName"]
    ts = cert_time(leaf["notAfter"], certfile)
    return {"names": names, "not_after": leaf["notAfter"], "not_after_ts": ts,
            "fingerprint_sha256": hashlib.sha256(der).hexdigest(), "chain": len(infos)}


_MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}


def cert_time(text: str, what: str = "certificate") -> int:
    """Unix seconds of OpenSSL's "Mmm DD HH:MM:SS YYYY GMT" (as ssl.cert_time_to_seconds,
    which needs the _strptime module, absent from the image)."""
    try:
        mon, day, hms, year, tz = text.split()
        h, mi, sec = (int(x) for x in hms.split(":"))
        y, m, d = int(year), _MONTHS[mon], int(day)
        if tz != "GMT":
            raise ValueError(tz)
    except (ValueError, KeyError):
        raise TlsError(f"{what}: cannot read the expiry date {text!r}") from None
    # days from 1970-01-01 to y-m-d (the civil-from-days inverse, proleptic Gregorian)
    yy = y - (m <= 2)
    era = yy // 400
    yoe = yy - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    days = era * 146097 + doe - 719468
    return days * 86400 + h * 3600 + mi * 60 + sec


def record_plan(total: int, small: int, nsmall: int = 8) -> list:
    """Plaintext bytes of each record of a `total`-byte response, as TlsConn._fill cuts
    it: `nsmall` records of `small` bytes (SMSS - overhead), then 16 KB records.
    `nsmall` is what the connection has left: `small_records` on a new (or idle) one,
    0 on a busy keep-alive one."""
    out = []
    o = 0
    while o < total:
        n = small if len(out) < nsmall else MAX_RECORD
        n = n if n < total - o else total - o
        out.append(n)
        o += n
    return out


def _no_password():
    """An encrypted key is refused, never prompted for (OpenSSL's default reads the terminal)."""
    return b""


def name_matches(name: str, pattern: str) -> bool:
    """RFC 6125 §6.4.3: exact, or a wildcard as the whole left-most label."""
    name = name.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return name == pattern


class TlsServer:
    """The TLS side of one Stack: the context, the certificate's names, the
    handshake table and counters. `bind(counters)` is called by the Stack."""

    def __init__(self, certfile: str, keyfile: str, *, num_tickets: int = 2, ticket_rotate: float = 43200.0,
                 max_handshakes: int = 1024, handshake_timeout: float = 10.0, queue_max: int = 262144,
                 small_records: int = 8, dyn_rec_timeout: float = 1.0, hsts: int = 0, now: float = 0.0):
        self.certfile = certfile
        self.keyfile = keyfile
        self.num_tickets = num_tickets
        self.ticket_rotate = ticket_rotate
        self.max_handshakes = max_handshakes
        self.handshake_timeout = handshake_timeout
        self.queue_max = queue_max
        self.small_records = small_records
        self.dyn_rec_timeout = dyn_rec_timeout
        self.hsts = (b"Strict-Transport-Security: max-age=%d\r\n\r\n" % hsts) if hsts else b""
        self._hsts_cache = {}
        self.info = check_chain(certfile, keyfile)
        self.names = self.info["names"]
        self.counters = {}
        self.http_factory = None
        self.handshaking = {}       # TlsConn -> None: handshakes in progress
        self.ctx = self._context()
        self.rotated_at = now

    def bind(self, counters, http_factory) -> None:
        """Called by the Stack: its counters and the site's HTTPConnection factory."""
        self.counters = counters
        self.http_factory = http_factory

    def _context(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
                        | ssl.OP_SINGLE_ECDH_USE)
        ctx.set_ciphers(CIPHERS_12)
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.num_tickets = self.num_tickets
        ctx.load_cert_chain(self.certfile, self.keyfile, password=_no_password)   # checked in check_chain
        ctx.sni_callback = self._sni
        return ctx

    def _sni(self, obj, name, ctx):
        c = self.counters
        if name is None:
            c["tls_sni_missing"] += 1
        elif not any(name_matches(name, p) for p in self.names):
            c["tls_sni_mismatch"] += 1                      # served all the same (one certificate)
        return None

    def maybe_rotate(self, now: float) -> None:
        """New ticket keys (a new context) every `ticket_rotate` seconds."""
        if now - self.rotated_at >= self.ticket_rotate:
            self.ctx = self._context()
            self.rotated_at = now
            self.counters["tls_ticket_key_rotations"] += 1

    def hsts_header(self, hdr: bytes) -> bytes:
        """`hdr` with Strict-Transport-Security added before the blank line (RFC 6797 §6.1)."""
        v = self._hsts_cache.get(hdr)
        if v is None:
            if len(self._hsts_cache) >= 8192:
                self._hsts_cache.clear()
            v = self._hsts_cache[hdr] = hdr[:-2] + self.hsts
        return v

    def can_start(self) -> bool:
        hs = self.handshaking
        if len(hs) >= self.max_handshakes:
            for c in [c for c in hs if c.state == CLOSED]:
                del hs[c]                                   # connections gone meanwhile
        return len(hs) < self.max_handshakes


class _Session:
    """Per-connection TLS state: the SSLObject and its BIOs, the HTTP connection,
    the replies waiting to be encrypted and where in the first one we are."""
    __slots__ = ("obj", "rx", "tx", "http", "done", "pending", "off", "nrec", "small", "shut", "failed",
                 "now", "last_wr")

    def __init__(self, srv: TlsServer, http):
        self.rx = ssl.MemoryBIO()
        self.tx = ssl.MemoryBIO()
        self.obj = srv.ctx.wrap_bio(self.rx, self.tx, server_side=True)
        self.http = http
        self.done = False           # handshake complete
        self.pending = []           # (header bytes, body view, close) of replies not fully encrypted
        self.off = 0                # plaintext bytes of pending[0] already encrypted
        self.nrec = 0               # small records written since the start or the last idle period
        self.small = 0              # plaintext bytes of a small record (SMSS - overhead)
        self.shut = False           # close_notify written
        self.failed = False
        self.now = 0.0              # the clock at the last segment received (_fill has none of its own)
        self.last_wr = 0.0          # when plaintext was last encrypted (idle: dyn_rec_timeout)


class TlsMixin:
    """TLS on a TCP connection of the TLS port (see the theory of operation). Put in
    front of Conn or Conn6; the class made from it declares the slots `tls` and
    `tls_close` (slots of two bases would conflict)."""
    __slots__ = ()

    def __init__(self, st, key, peer_mac, peer_ip, peer_port, *a, **kw):
        # the header templates with our TLS port as the source port
        super().__init__(st, key, peer_mac, peer_ip, peer_port, *a, lport=st.cfg.tls_port, **kw)
        self.tls = None
        self.tls_close = False

    # ------------------------------------------------------------ receive

    def _deliver(self, data, now: float) -> bool:
        st = self.st
        srv = st.tls
        cnt = st.counters
        s = self.tls
        if s is None:
            if not srv.can_start():
                self.abort("tls_drop_handshake_limit")
                return True                                 # (nothing more to send: no ACK after the RST)
            srv.maybe_rotate(now)
            s = self.tls = _Session(srv, srv.http_factory())
            srv.handshaking[self] = None
            cnt["tls_handshakes_started"] += 1
            t = self.t_req = now + srv.handshake_timeout
            st.arm(self, t)
        s.now = now
        if s.failed or s.shut:
            cnt["tls_rx_data_ignored"] += 1
            return False
        if s.rx.pending + len(data) > TLS_RX_MAX:
            self.abort("tls_rx_overflow")
            return True
        s.rx.write(data)                                    # (the BIO copies: no bytes() first)
        queued = self.data_end
        if not s.done:
            try:
                s.obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                self._failed(s, e)
                return self.data_end != queued
            else:
                self._established(s, now)
            self._push(s.tx.read())
            if not s.done:
                return self.data_end != queued
        self._read(s, now)
        self._fill()
        return self.data_end != queued

    def _established(self, s: _Session, now: float) -> None:
        st = self.st
        cnt = st.counters
        obj = s.obj
        s.done = True
        st.tls.handshaking.pop(self, None)
        cnt["tls_handshakes_resumed" if obj.session_reused else "tls_handshakes_full"] += 1
        v = obj.version()
        ciph = obj.cipher()[0]
        cnt["tls_version_" + v] += 1
        cnt["tls_cipher_" + ciph] += 1
        if v == "TLSv1.3":
            ov = RECORD_OVERHEAD[v]
        else:
            ov = RECORD_OVERHEAD.get((v, "CHACHA20" if "CHACHA20" in ciph else "GCM"), 29)
        s.small = max(self.mss - ov, 64)
        self.t_req = 0.0

    def _failed(self, s: _Session, e: ssl.SSLError) -> None:
        """A handshake or record error: OpenSSL has written its alert (if any) to the
        BIO; send it, count the reason, close."""
        cnt = self.st.counters
        s.failed = True
        self.st.tls.handshaking.pop(self, None)
        reason = (getattr(e, "reason", None) or type(e).__name__).lower()
        cnt[("tls_handshake_failed_" if not s.done else "tls_record_failed_") + reason] += 1
        self._push(s.tx.read())
        s.pending.clear()
        self.t_req = 0.0
        super().close()

    def _read(self, s: _Session, now: float) -> None:
        """Decrypted request bytes to the HTTP layer while few replies wait."""
        st = self.st
        http = s.http
        obj = s.obj
        rx = s.rx
        while len(s.pending) < st.cfg.max_queued and not http.closed:
            if not rx.pending and not obj.pending():
                break                                       # (a read would only raise SSLWantReadError)
            try:
                plain = obj.read(MAX_RECORD)
                if not plain:
                    raise ssl.SSLZeroReturnError            # (how _ssl reports a received close_notify)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:                  # the client's close_notify
                st.counters["tls_close_notify_received"] += 1
                self.close()
                break
            except ssl.SSLError as e:                       # bad record, renegotiation, ...
                self._failed(s, e)
                return
            if self.date_gen != st.date_gen and st.date is not None:
                http.now(st.date)
                self.date_gen = st.date_gen
            replies = http.receive(plain)
            if not replies:
                if not self.t_req:                          # a request has started
                    t = self.t_req = now + st.cfg.request_timeout
                    st.arm(self, t)
                continue
            self.t_req = 0.0
            st.counters["http_replies"] += len(replies)
            if st.obs is not None:
                st.obs.replies(self, plain, replies, now, True)     # logged once encrypted (_fill)
            srv = st.tls
            for r in replies:
                resp = r.response
                if resp is not None:
                    hdr, _, body = st.patched(resp, r.close)
                else:
                    hdr = r.header
                    body = r.body if r.body is not None else _EMPTY
                if srv.hsts:
                    hdr = srv.hsts_header(bytes(hdr))
                s.pending.append((hdr, body, r.close))
        if s.tx.pending:                                    # e.g. a KeyUpdate answer
            self._push(s.tx.read())

    # --------------------------------------------------------------- send

    def _push(self, ct: bytes) -> None:
        """Queue ciphertext as one dynamic send-queue item (conn.py's tuple)."""
        if not ct:
            return
        n = len(ct)
        start = self.data_end
        e = (start + n) & MASK
        # as the body (a memoryview: segments are zero-copy slices), not as the header
        # block, which _xmit copies into every segment's frame
        self.q.append((start, e, n, b"", 0, memoryview(ct), None, 0))
        self.data_end = e
        self.st.counters["tls_bytes_ciphertext"] += n

    def _fill(self) -> None:
        """Encrypt pending replies while the ciphertext queue has room: per batch one
        SSLObject.write per small record (one record each), one for the rest (OpenSSL
        cuts it in 16 KB records), and one send-queue item."""
        s = self.tls
        if s is None or not s.done or s.failed:
            return
        st = self.st
        srv = st.tls
        wnd = self.snd_wnd + MAX_RECORD + 64
        limit = srv.queue_max if srv.queue_max < wnd else wnd
        pending = s.pending
        if not pending or ((self.data_end - self.snd_una) & MASK) >= limit:
            if not pending and self.tls_close:
                self._shutdown(s)
            return
        obj = s.obj
        tx = s.tx
        nsmall = srv.small_records
        now = s.now
        if now - s.last_wr > srv.dyn_rec_timeout:
            s.nrec = 0                                      # idle: small records again (ssl_dyn_rec)
        s.last_wr = now
        written = 0
        while pending and ((self.data_end - self.snd_una) & MASK) < limit:
            hdr, body, close = pending[0]
            hl = len(hdr)
            total = hl + len(body)
            o = s.off
            w0 = written
            while o < total and written - w0 < _FILL_CHUNK:
                if s.nrec < nsmall:
                    n = s.small                             # one record that fills one segment
                    s.nrec += 1
                else:                                       # whole 16 KB records (OpenSSL cuts them)
                    n = _FILL_CHUNK - (written - w0)
                    n -= n % MAX_RECORD
                    if n < MAX_RECORD:
                        n = MAX_RECORD
                if n > total - o:
                    n = total - o
                if o < hl:
                    e = o + n
                    obj.write(hdr[o:e] if e <= hl else b"".join((hdr[o:], body[:e - hl])))   # one copy
                else:
                    obj.write(body[o - hl:o - hl + n])
                o += n
                written += n
            if o >= total:
                pending.pop(0)
                s.off = 0
                self._push(tx.read())                       # its end in the ciphertext is known
                if st.obs is not None:
                    st.obs.tls_sent(self, self.data_end, total, hl)
                if close:
                    pending.clear()
                    self.tls_close = True
                    break
            else:
                s.off = o
                self._push(tx.read())
        st.counters["tls_bytes_encrypted"] += written
        if not pending and self.tls_close:
            self._shutdown(s)

    def _shutdown(self, s: _Session) -> None:
        """close_notify (RFC 8446 §6.1), then our FIN."""
        if not s.shut and s.done and not s.failed:
            s.shut = True
            try:
                s.obj.unwrap()
            except ssl.SSLError:
                pass                                        # want-read: the peer's close_notify is optional
            self._push(s.tx.read())
        self.tls_close = False
        super().close()

    def _acked(self, ack: int, now: float) -> None:
        Conn._acked(self, ack, now)         # Conn6 inherits it; per ACK, so no super() lookup
        s = self.tls
        if s is not None and s.pending:
            s.now = now
            self._fill()

    def close(self) -> None:
        """Deferred until the pending replies are encrypted (see _fill)."""
        if self.fin_pending:
            return
        s = self.tls
        if s is None or s.failed or not s.done:
            super().close()
            return
        self.tls_close = True
        if not s.pending:
            self._shutdown(s)
        else:
            self._fill()

    def on_timer(self, now: float) -> None:
        s = self.tls
        if s is not None and not s.done and not s.failed and self.t_req and self.t_req <= now:
            self.t_req = 0.0
            self.st.tls.handshaking.pop(self, None)
            s.failed = True
            self.abort("tls_handshake_timeout")
            return
        super().on_timer(now)


class TlsConn(TlsMixin, Conn):
    """HTTPS over IPv4."""
    __slots__ = ("tls", "tls_close")


class TlsConn6(TlsMixin, Conn6):
    """HTTPS over IPv6."""
    __slots__ = ("tls", "tls_close")

    def set_mss(self, mss: int) -> bool:
        """Conn6's (a Packet Too Big), and small records shrink with SMSS: one record
        still fills one segment (the queued ciphertext is resegmented by TCP)."""
        old = self.mss
        if not Conn6.set_mss(self, mss):
            return False
        s = self.tls
        if s is not None and s.small:
            s.small = max(s.small - (old - self.mss), 64)
        return True
