"""Observability: access log, Prometheus metrics, health check and drain, beside the hot path.

Theory of operation. `Observer.install(stack)` sets three hooks that are None
on a stack without observability, so that serving without it does exactly
what it always did:

- `stack.obs` (Conn._deliver, once per batch of replies queued): `replies()`
  notes, per reply, the connection, the sequence number of its last byte,
  the time of arrival, status, variant, and the request line, Referer and
  User-Agent picked out of the request bytes (kept per connection until its
  head is complete). Nothing is formatted here. An HTTPS connection
  (tls.py, either family) notes its replies as they are decrypted, but its
  ciphertext is written later: they wait in `tls_wait` until `tls_sent`
  gives the sequence number where the reply's last record ends (and the
  plaintext length as encrypted, HSTS included); replies of a connection
  that is gone before that are logged at the next `tick` with no bytes.
- `flush(now)` (the serve loop, once per iteration): finds the noted
  responses whose last byte is acknowledged (SND.UNA passed it) or whose
  connection is gone (then the bytes sent are what was acknowledged), counts
  them by status class, bytes and time to last byte (histogram), and hands
  them to the access log as one batch. Above `SCAN_ALL` pending responses the
  scan is spaced out (its cost stays below ~10% of a loop), which coarsens
  the measured time to last byte under that load.
- `stack.side` (Stack._tcp_in, only for segments without a connection that
  are not for the site's port, or all of them while draining), over IPv4
  and IPv6 alike: SYNs to the metrics port from allowed sources open a
  connection (Conn or Conn6) served by metrics.MetricsHTTP; disallowed
  sources get a RST (`metrics_denied`). While draining, segments for the
  site's port or the HTTPS port that would open a connection get a RST
  (`tcp_drain_refused`). A connection's key ends with our port in both
  families (4+4 or 16+16 address bytes, then the ports), so `key[-2:]`
  tells a scrape or an HTTPS connection from the site's.

Drain (`Drain`, the serve loop's stop condition): on SIGTERM /healthz turns
503, new connections are refused, every idle connection gets a FIN (and
ignores later requests: a keep-alive client retries elsewhere), busy ones get
theirs once their queued responses are acknowledged; the loop ends when no
connection has anything outstanding, or after `timeout` seconds, when what
is left is reset.
"""
from __future__ import annotations

import ipaddress
import os
import time

from .metrics import CACHE_S, Histogram, MetricsHTTP, render

__all__ = ["Observer", "Drain", "parse_allow"]

MAX_PENDING = 65536         # responses followed at once; beyond, new ones are not logged (counted)
SCAN_ALL = 512              # pending responses scanned every iteration up to this many
_MASK = 0xFFFFFFFF
_HALF = 0x80000000


def _addr(ipb: bytes) -> str:
    """A peer's address as text: dotted IPv4, or IPv6 (RFC 5952) for a Conn6."""
    return ".".join(map(str, ipb)) if len(ipb) == 4 else str(ipaddress.IPv6Address(bytes(ipb)))


def parse_allow(spec) -> list:
    """'198.18.0.0/15,10.0.0.1,2001:2::/48' -> [(address length, net, mask)] (4 or 16
    bytes: IPv4 or IPv6); ValueError naming the bad prefix."""
    out = []
    for p in ([] if not spec else [s.strip() for s in spec.split(",") if s.strip()]):
        try:
            n = ipaddress.ip_network(p, strict=False)
        except ValueError as e:
            raise ValueError(f"metrics allow prefix {p!r}: {e}") from None
        out.append((4 if n.version == 4 else 16, int(n.network_address), int(n.netmask)))
    return out


def _variants(site) -> dict:
    v = {}
    for r in site.resources.values():
        for attr, name in (("get", "identity"), ("head", "identity"), ("not_modified", "304"),
                           ("gzip_get", "gzip"), ("gzip_head", "gzip"), ("gzip_not_modified", "304")):
            resp = getattr(r, attr, None)
            if resp is not None:
                v[id(resp)] = name
    for d in (site.redirects, site.redirects_head):
        for resp in d.values():
            v[id(resp)] = "redirect"
    for pair in site.errors.values():
        for resp in pair:
            v[id(resp)] = "error"
    return v


def _fields(head: bytes):
    """(method, target, protocol, referer, user-agent) of a request head (bytes or None)."""
    head = head.lstrip(b"\r\n")
    first, _, rest = head.partition(b"\n")
    parts = first.rstrip(b"\r").split(b" ")
    if len(parts) == 3:
        method, target, proto = parts
    else:
        method, target, proto = first.rstrip(b"\r")[:512], b"", b""
    ref = ua = None
    for line in rest.split(b"\n"):
        k, sep, v = line.partition(b":")
        if not sep:
            continue
        k = k.strip().lower()
        if k == b"referer":
            ref = v.strip()[:1024]
        elif k == b"user-agent":
            ua = v.strip()[:1024]
    return method, target[:4096], proto[:32], ref, ua


class Observer:
    """Access log + metrics + health for one Stack (one worker)."""

    def __init__(self, stack, collect=None, *, log=None, metrics_port: int = 0, metrics_allow=(),
                 build: dict | None = None, worker=None):
        self.stack = stack
        self.counters = stack.counters
        self.collect = collect or (lambda: stack.counters)
        self.log = log                              # AccessLog or None
        self.metrics_port = metrics_port
        self.allow = list(metrics_allow)
        self.build = dict(build or {})
        self.worker = worker
        self.skip_port = metrics_port.to_bytes(2, "big") if metrics_port else None
        self.draining = False
        self.pending = []           # [conn, end seq, length, header length, t, status, variant, cached, fields]
        self.heads = {}             # conn -> request bytes of a head not complete yet
        self.tls_wait = {}          # HTTPS conn -> [entries as in pending] of replies not yet encrypted
        self.n_tls_wait = 0
        self.hist = Histogram()
        self.now = 0.0
        self._scan_at = 0.0
        self._text = b""
        self._text_at = -1e9
        site = stack.store.site if stack.store is not None else None
        self.variants = _variants(site) if site is not None else {}
        if site is not None:
            from ..http import HTTPConnection
            self.cache_get = HTTPConnection.reply_cache(site).get
        else:
            self.cache_get = lambda k: None

    def install(self) -> "Observer":
        st = self.stack
        st.obs = self
        if self.metrics_port:
            st.side = self
        return self

    # ------------------------------------------------------------- Conn._deliver

    def replies(self, c, data, replies, now: float, tls: bool = False) -> None:
        """Replies about to be queued on `c` (from its current data_end on), for `data`.
        `tls`: an HTTPS connection's (tls.py), whose replies are encrypted later: they
        wait in `tls_wait` until `tls_sent` tells where each one's ciphertext ends."""
        k = c.key
        if k[-2:] == self.skip_port:
            return                                  # a scrape: not part of the site's traffic
        pend = self.pending
        if len(pend) + self.n_tls_wait >= MAX_PENDING:
            self.counters["log_responses_untracked"] += len(replies)
            return
        heads = self.heads
        buf = heads.pop(c, b"")
        if data is not None:
            buf = (buf + data) if buf else bytes(data)
        parts = buf.split(b"\r\n\r\n")
        rest = parts.pop()
        cached = not tls and len(replies) == 1 and data is not None and self.cache_get(data) is replies[0]
        start = c.data_end
        variants = self.variants
        if tls:
            pend = self.tls_wait.get(c)
            if pend is None:
                pend = self.tls_wait[c] = []
            n0 = len(pend)
        for r in replies:
            if parts:
                f = _fields(parts.pop(0))
            elif rest:
                f = _fields(rest)           # the reply to a request that is not complete (400, eof)
                rest = b""
            else:
                f = (None, None, None, None, None)
            resp = r.response
            if resp is not None:
                v = variants.get(id(resp), "identity")
                hl = resp.header_len
            else:
                v = "range" if r.status in (206, 416) else "dynamic"
                hl = len(r.header)
            n = r.length
            start = (start + n) & _MASK
            pend.append((c, start, n, hl, now, r.status, v, cached, tls, f))
            if r.close:
                rest = b""
                break
        if tls:
            self.n_tls_wait += len(pend) - n0
        if rest and len(rest) < 16384 and len(heads) < 65536:
            heads[c] = rest

    def tls_sent(self, c, end: int, total: int, hl: int) -> None:
        """TlsMixin._fill encrypted the last byte of `c`'s oldest waiting reply: its
        ciphertext ends at `end`; `total` plaintext bytes, `hl` of them the header
        (as encrypted: with Strict-Transport-Security when --hsts)."""
        w = self.tls_wait.get(c)
        if w:
            e = w.pop(0)
            self.n_tls_wait -= 1
            self.pending.append((c, end, total, hl) + e[4:])
            if not w:
                del self.tls_wait[c]

    # -------------------------------------------------------------- serve loop

    def flush(self, now: float) -> None:
        """Once per loop iteration: finished responses -> counters, histogram, log."""
        self.now = now
        pend = self.pending
        if not pend:
            return
        if len(pend) > SCAN_ALL:
            if now < self._scan_at:
                return
            self._scan_at = now + len(pend) * 2e-7 * 10
        keep = []
        done = []
        cnt = self.counters
        obs_h = self.hist.observe
        heads = self.heads
        nbytes = 0
        for e in pend:
            c, end, n, hl = e[0], e[1], e[2], e[3]
            una = c.snd_una
            if ((una - end) & _MASK) < _HALF:
                sent = n
            elif c.state == 9:                      # CLOSED (conn.py): reset or given up
                left = (end - una) & _MASK
                sent = n - left if left < n else 0
            else:
                keep.append(e)
                continue
            if c.state == 9:
                heads.pop(c, None)
            t, status, variant, cached, tls, f = e[4], e[5], e[6], e[7], e[8], e[9]
            ttlb = now - t
            cnt[f"http_responses_{status // 100}xx"] += 1
            nbytes += sent
            obs_h(ttlb)
            if self.log is not None:
                body = sent - hl if sent > hl else 0
                done.append((t, _addr(c.peer_ip), c.peer_port, f[0], f[1], f[2], status, body, sent,
                             ttlb, variant, cached, tls, f[3], f[4]))
        cnt["http_response_bytes"] += nbytes
        self.pending = keep
        if done:
            self.log.write(done, now, time.time())

    def tick(self, now: float) -> None:
        """Once a second: forget partial request heads of connections that are gone
        without a reply; a syslog sink retries lines waiting for ARP."""
        if self.heads:
            for c in [c for c in self.heads if c.state == 9]:
                del self.heads[c]
        if self.tls_wait:                           # HTTPS replies never encrypted (reset, failed):
            for c in [c for c in self.tls_wait if c.state == 9]:
                for e in self.tls_wait.pop(c):      # logged with the bytes acknowledged: none
                    self.n_tls_wait -= 1
                    self.pending.append((c, (c.snd_una + e[2]) & _MASK) + e[2:])
        sink = getattr(self.log, "sink", None)
        if sink is not None and hasattr(sink, "send"):
            sink.send(now)

    # ------------------------------------------------------------ Stack._tcp_in

    def admit(self, ipb: bytes) -> bool:
        if not self.allow:
            return True
        v = int.from_bytes(ipb, "big")
        n = len(ipb)
        return any(ln == n and v & m == net for ln, net, m in self.allow)

    def segment(self, key, src_mac, src_ip, seg, now) -> bool:
        """A segment without a connection (after TIME-WAIT): True if handled here."""
        st = self.stack
        ours = key[16:32] if len(key) == 36 else None   # IPv6: our address it came to
        fl = seg.flags
        if seg.dport == self.metrics_port:
            if fl & 0x17 != 0x02:                   # SYN only (no ACK/RST/FIN): else the default path
                return False
            if not self.admit(src_ip):
                st._reset_for(src_mac, src_ip, seg, ours)
                self.counters["metrics_denied"] += 1
                return True
            if len(st.conns) >= st.cfg.max_conns or st.n_synrcvd >= st.cfg.syn_backlog:
                self.counters["drop_metrics_busy"] += 1
                return True
            self._open(key, src_mac, src_ip, seg, now)
            self.counters["metrics_connections"] += 1
            return True
        if self.draining and st.store is not None and (
                seg.dport == st.cfg.port or (st.tls is not None and seg.dport == st.cfg.tls_port)):
            if not fl & 0x04:
                st._reset_for(src_mac, src_ip, seg, ours)
            self.counters["tcp_drain_refused"] += 1
            return True
        return False

    def _open(self, key, mac, ip, seg, now) -> None:
        """Stack._open for the metrics port: the same passive open (RFC 9293 §3.10.7.2),
        with our port in the connection's header templates and the scrape's HTTP."""
        from ..stack.conn import Conn
        from ..stack.conn6 import Conn6
        c = self.stack._open(key, mac, ip, seg.sport, seg.seq, seg.options.mss, seg.options.wscale, seg.window,
                             now, Conn if len(key) == 12 else Conn6, self.metrics_port)
        c.http = MetricsHTTP(self)

    # ------------------------------------------------------------------ /metrics

    def metrics_text(self) -> bytes:
        now = self.now
        if now - self._text_at < CACHE_S and self._text:
            self.counters["metrics_cached"] += 1
            return self._text
        st = self.stack
        from ..stack.conn import STATE_NAMES
        states = {}
        for c in st.conns.values():
            name = STATE_NAMES.get(c.state, str(c.state))
            states[name] = states.get(name, 0) + 1
        gauges = {"tcp_time_wait_entries": len(st.tw),
                  "tcp_syn_cookies_active": int(now < st._cookies_until),
                  "draining": int(self.draining), "http_responses_in_flight": len(self.pending)}
        counters = dict(self.collect())
        self._text = render(counters, gauges, states, self.hist, self.build, self.worker).encode()
        self._text_at = now
        self.counters["metrics_renders"] += 1
        return self._text


def build_info(store, version: str | None = None) -> dict:
    """The labels of haboob_build_info for an open store."""
    from ..content.store import _DIGEST_AT, _HDR
    try:
        with open(store.path, "rb") as f:
            digest = f.read(_HDR.size)[_DIGEST_AT:_DIGEST_AT + 32].hex()
    except OSError:
        digest = "unknown"
    files = {getattr(r, "file", r.path) for r in store.site.resources.values()}
    return {"store_sha256": digest, "site_files": len(files),
            "version": version or store.meta.get("version", "dev"), "kernel": os.uname().release}


class Drain:
    """The serve loop's stop(): drain on request (SIGTERM, stop_event), then stop."""

    def __init__(self, stack, stopper, timeout: float, side=None, mono=time.monotonic):
        self.stack = stack
        self.stopper = stopper
        self.timeout = timeout
        self.side = side
        self.mono = mono
        self.until = None

    def __call__(self) -> bool:
        s = self.stopper
        if s.flag:
            return True                             # SIGINT, or a second SIGTERM: stop now
        if not s():
            return False
        st = self.stack
        now = self.mono()
        if self.until is None:
            self.until = now + self.timeout
            st.counters["drain_started"] += 1
            if self.side is None:                   # no observer: a bare one refuses new connections
                self.side = Observer(st)
            self.side.draining = True
            st.side = self.side
            st._syn_fast_ok = False                 # SYNs take _tcp_in, where the side refuses them
        from ..stack.conn import _HTTP_DONE, ESTABLISHED, FIN_WAIT_2
        busy = 0
        mport = self.side.skip_port
        for c in list(st.conns.values()):
            if c.key[-2:] == mport:
                continue                            # health checks and scrapes: they close themselves
            if (c.state == ESTABLISHED and not c.q and not c.t_req and c.snd_una == c.data_end
                    and (c.http is not None or now - c.last_act > 1.0)):
                # idle: kept alive after a reply, or connected without asking for a
                # second (a FIN before its first request arrives would be a reply-less close)
                c.http = _HTTP_DONE                 # later requests are ignored: the client retries elsewhere
                c.close()
                c.output(now)
                st.counters["drain_closed_idle"] += 1
                busy += 1
            elif c.state != FIN_WAIT_2:
                busy += 1
        if busy == 0:
            return True
        if now >= self.until:
            st.counters["drain_timeouts"] += 1
            return True
        return False
