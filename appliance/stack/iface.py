"""The Stack: one interface, one address, one instance per core; frames in, frames out.

Theory of operation. The serve loop feeds every received frame to
`receive(frame, now)`, calls `poll(now)` to run timers (it returns the next
deadline), `set_date()` once a second, and drains `txq` (a list of Frames,
see rings/base.py) into the device. Nothing here reads a clock or does I/O,
and nothing raises out of `receive`: a frame is used, answered per the RFCs,
or counted and dropped under `drop_<reason>` (an unexpected exception is
counted as `drop_internal_error`, its text kept in `last_error`).

Dispatch. A fast path recognizes, with a handful of byte comparisons, an
IPv4/TCP frame to our MAC and address without IP options or fragmentation,
verifies the IP header and TCP checksums (C-speed sums, wire.py) and looks
the connection up by the raw 12 bytes of addresses and ports sliced from the
frame. Segments without a connection (SYNs, stray ACKs, TIME-WAIT) are
handled from the same raw header. Everything else takes the slow path
through the checked parsers of ethernet/arp/ipv4/icmp/tcp, which name the
reason of every drop. A device that has validated (or itself produced) the
TCP checksum says so with `receive(frame, now, csum_ok=True)`: virtio
NEEDS_CSUM frames from a local sender carry only the pseudo-header sum.

Construction: `Stack(store, mac, ip, prefix, gateway, offload, config,
secret, http_factory=None)`; `config.mtu` must be the device's MTU; the
secret (>= 16 bytes, from os.urandom) keys ISNs and SYN cookies;
`http_factory()` makes one HTTP connection object per TCP connection, with
its first data (default: appliance.http.HTTPConnection on the store; a
connection whose one segment is a cached whole request that closes it is
answered from the shared reply cache and needs none).

Passive open (RFC 9293 §3.10.7.2, LISTEN) on `cfg.port` and, with a
TlsServer (`tls=`, tls.py), on `cfg.tls_port`, whose connections are
TlsConns (SYNs to it take the general path, not the fast one): a SYN creates a
SYN-RECEIVED Conn and a SYN-ACK with our MSS and, when the peer offered it,
Window Scale 0 (we take its scaling; our own window stays <= 65535). We never
offer SACK or timestamps. When `syn_backlog` half-open connections exist (or
`syncookies="always"`), the SYN-ACK carries a SYN cookie instead (isn.py)
and no state is kept; a returning ACK that carries a valid cookie creates
the connection directly. `max_conns` caps the table (SYNs beyond are counted
and dropped). Segments for other ports, or non-SYNs without a connection,
get a RST (RFC 9293 §3.10.7.1) — never in answer to a RST.

Timers: every Conn has at most one entry in a timer wheel, at the earliest
of its deadlines or before it (`arm`, `Conn.sched`; a passive open's entry
sits at RTO_min, so that the reply's retransmission timer never has to move
it): slots of 1 ms (a dict used as an
ordered set of Conns), plus a heap of the slot numbers in use. `poll` takes
only the due entries, asks each connection for its deadline again and
re-arms it, so idle connections cost nothing per poll. A connection that
goes away leaves its slot at once (`remove`): a connection-per-request load
leaves nothing behind to pop later, and no dead Conn is kept alive for the
garbage collector to scan.

TIME-WAIT is a compact table key -> (expiry, snd_nxt, rcv_nxt, peer_mac):
retransmitted FINs are acknowledged again (and restart 2*MSL), RSTs are
ignored (RFC 1337), a new SYN reopens (see _tw_segment for why even one
with a lower sequence number). Insertion order is expiry order, so
expiring is popping from the front.

ARP (arp.py): we answer for our address, learn senders addressed to us,
announce ourselves at `start` (gratuitous ARP, RFC 5227 §3) and resolve the
gateway (retried every second until known). Replies always go to the source
MAC of the frame that asked, so the cache is not on the hot path.

Dates: `set_date` formats the IMF-fixdate (RFC 9110 §5.6.7) and drops the
cache of patched response headers (`patched`), which holds, per prebuilt
response and Connection value, the header bytes with Date and Connection
written in and the first segment's checksum sum fixed by the difference
(RFC 1624) -- per request, patching is one dict lookup.
"""
import heapq
import os
import struct
from typing import NamedTuple

from ..http.dates import format_date as imf_fixdate      # RFC 9110 §5.6.7, 29 bytes
from .arp import OP_REPLY, OP_REQUEST, ArpCache, ArpPacket
from .conn import CLOSED, ESTABLISHED, SYN_RCVD, Conn, MASK, HALF
from .counters import Counters
from .ethernet import BROADCAST, ETH_ARP, ETH_IPV4, EthernetFrame
from .icmp import ECHO_REQUEST, Icmp
from .ipv4 import PROTO_ICMP, PROTO_TCP, IPv4Header
from .isn import IsnGenerator
from .rings.base import GSO, Offload
from .tcp import ACK, FIN, RST, SYN, Options, TcpSegment
from .wire import Malformed, ip_bytes, sum_ok

__all__ = ["Stack", "StackConfig", "imf_fixdate"]

_KEEP = b"keep-alive"
_CLOSE = b"close     "
_ZERO_MAC = b"\0" * 6
_TCPH = struct.Struct("!HHIIBBH")
_NO_OPTIONS = Options()
_SLOTS_PER_S = 1000.0           # timer wheel resolution: 1 ms
_IP_FIXED = struct.Struct("!HHHBBH").pack_into      # at 16: total length, id, flags/frag, ttl, proto, csum


class StackConfig(NamedTuple):
    port: int = 80                  # the listening TCP port (plain HTTP; 0: none, HTTPS only)
    mtu: int = 1500                 # the device's IP MTU: our MSS option is mtu - 40
    max_conns: int = 65536          # connections (all states but TIME-WAIT); SYNs beyond are dropped
    syn_backlog: int = 1024         # half-open connections before SYN cookies are used
    syncookies: str = "auto"        # "auto" (when the backlog is full), "always", "never"
    rcv_wnd: int = 65535            # our advertised window (never scaled)
    iw_segments: int = 10           # initial window in segments (RFC 6928)
    rto_initial: float = 1.0        # RFC 6298 (2.1)
    rto_min: float = 0.2            # Linux's; RFC 6298 (2.4) says 1 s
    rto_max: float = 60.0
    max_retries: int = 8            # RTOs in a row without progress before a RST
    syn_retries: int = 5            # SYN-ACK retransmissions before forgetting a half-open connection
    delack: float = 0.04            # delayed ACK (RFC 9293 §3.8.6.3: < 0.5 s)
    idle_timeout: float = 60.0      # no progress for this long: close (or abort if stuck)
    request_timeout: float = 30.0   # a request started but not complete for this long: close
    time_wait: float = 60.0         # 2*MSL
    arp_ttl: float = 300.0
    arp_cache_size: int = 256
    challenge_ack_limit: int = 1000  # per second, the whole stack (RFC 5961 §7)
    tso_max: int = 62000            # payload bytes per GSO super-frame (< 64 KB with headers)
    ooo_limit: int = 16384          # out-of-order bytes kept per connection
    max_queued: int = 256           # replies queued per connection before request data is refused
    tls_port: int = 443             # HTTPS, when the Stack has a TlsServer (tls.py)


class Stack:
    def __init__(self, store, mac: bytes, ip: str, prefix: int, gateway: str | None, offload: Offload,
                 config: StackConfig = StackConfig(), secret: bytes = None, http_factory=None, tls=None):
        if isinstance(mac, str):
            mac = bytes.fromhex(mac.replace(":", "").replace("-", ""))
        if len(mac) != 6:
            raise ValueError(f"MAC address must be 6 bytes, got {mac!r}")
        if not 0 < prefix <= 32:
            raise ValueError(f"prefix length must be 1..32, got {prefix}")
        if config.syncookies not in ("auto", "always", "never"):
            raise ValueError(f"syncookies must be auto, always or never, got {config.syncookies!r}")
        if not 576 <= config.mtu <= 65535:
            raise ValueError(f"MTU must be 576..65535, got {config.mtu}")
        if not 0 < config.rcv_wnd <= 65535:
            raise ValueError(f"rcv_wnd must be 1..65535, got {config.rcv_wnd}")
        self.store = store
        self.mac = bytes(mac)
        self.ip = ip
        self.ipb = ip_bytes(ip)
        self.prefix = prefix
        self.netmask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
        self.net = int.from_bytes(self.ipb, "big") & self.netmask
        self.gateway = ip_bytes(gateway) if gateway else None
        if self.gateway and not self.on_link(self.gateway):
            raise ValueError(f"gateway {gateway} is not in {ip}/{prefix}")
        self.offload = offload
        self.mode = 2 if offload.tso else (1 if offload.csum else 0)
        self.cfg = config
        self.isn = IsnGenerator(secret if secret is not None else os.urandom(32))
        http_first = None
        site_http = None
        if store is not None:
            self.smss = store.mss
            self.blob = store.blob
            from appliance.http import HTTPConnection
            site, blob = store.site, store.blob
            site_http = lambda: HTTPConnection(site, blob)    # noqa: E731
            if http_factory is None:
                http_factory = site_http
                # a fresh connection's first segment: the shared reply cache first (Conn._deliver)
                http_first = HTTPConnection.reply_cache(site).get
        else:
            self.smss = 0
            self.blob = None
        self.http_factory = http_factory
        self.http_first = http_first
        self.counters = Counters()
        self.tls = tls              # a tls.TlsServer: HTTPS on cfg.tls_port (TlsConn), or None
        if tls is not None:
            if config.tls_port == config.port:
                raise ValueError(f"tls_port and port are both {config.port}")
            tls.bind(self.counters, site_http)     # HTTPS always serves the site (not http_factory)
            from .tls import TlsConn
            self._tls_conn = TlsConn
        self.txq = []
        self.conns = {}             # raw 4-tuple (src ip, dst ip, sport, dport as received) -> Conn
        self.tw = {}                # TIME-WAIT: raw 4-tuple -> (expiry, snd_nxt, rcv_nxt, peer_mac)
        self.n_synrcvd = 0
        self.arp = ArpCache(config.arp_ttl, config.arp_cache_size)
        self.date = None            # 29 bytes once set_date was called; until then the stored placeholder
        self.date_gen = 0
        self._hdr_cache = {}
        self._next = 0.0            # no deadline before this (a lower bound)
        self._wheel = {}            # timer slot (int(t * _SLOTS_PER_S)) -> {Conn: None} armed in it
        self._slots = []            # heap of the slot numbers in _wheel
        self._cookies_until = -1.0
        self._chal_sec = -1
        self._chal_n = 0
        self._gw_arp_at = 0.0
        self.gso_csum = GSO(34, 16, 0, 54)
        self._tmpl_cache = {}       # peer MAC + IP -> (Ethernet+IP header, ip_const, pseudo_const)
        self._conn_tmpl = {}        # peer MAC + IP + port -> Stack.template()
        self._opts_cache = {}       # (template, TCP options) -> Stack.opts_template()
        self._mss_cache = {}        # peer's MSS option -> (SMSS, aligned, tso_max, gso): see mss_params
        self._port_pre = config.port << 16
        self._tcp_tail = struct.pack("!IIBBHHH", 0, 0, 0x50, 0, 0, 0, 0)   # TCP header after the ports
        self._synack_opts = Options(mss=config.mtu - 40).emit()
        self._synack_ws = Options(mss=config.mtu - 40, wscale=0).emit()
        self.last_error = None
        # the fast path's constants
        self._port_b = config.port.to_bytes(2, "big")
        self._syn_fast_ok = store is not None and config.syncookies != "always" and config.port != 0

    # --------------------------------------------------------------- public API

    def start(self, now: float) -> None:
        """Announce our address (gratuitous ARP) and start resolving the gateway."""
        self._arp_out(OP_REQUEST, BROADCAST, self.ipb, _ZERO_MAC)
        self.counters["arp_announcements"] += 1
        if self.gateway:
            self._resolve_gateway(now)
        self._next = 0.0

    def set_date(self, unix_seconds: int) -> None:
        d = imf_fixdate(int(unix_seconds))
        if d != self.date:
            self.date = d
            self.date_gen += 1
            self._hdr_cache.clear()

    def shutdown(self) -> None:
        """Reset every connection (RST, RFC 9293 §3.10.5 ABORT) so that clients do not
        wait for a server that is going away; the loop sends txq one last time."""
        for c in list(self.conns.values()):
            c.abort("tcp_shutdown_resets")

    @property
    def gateway_mac(self):
        return self.arp._e.get(self.gateway, (None,))[0] if self.gateway else None

    def on_link(self, ipb: bytes) -> bool:
        return int.from_bytes(ipb, "big") & self.netmask == self.net

    def receive(self, f, now: float, csum_ok: bool = False) -> None:
        """One received frame (bytes-like). Never raises.

        `csum_ok`: the device vouches for the TCP/UDP checksum (a virtio
        NEEDS_CSUM frame from a local sender, whose checksum field holds only
        the pseudo-header sum, or one the NIC validated: TP_STATUS_CSUM_VALID /
        VIRTIO_NET_HDR_F_DATA_VALID); the stack then skips verifying it. The IP
        header checksum is always verified.

        The fast path is written out here rather than called: this runs once
        per frame, and a Python call costs as much as several of its checks."""
        try:
            # one copy of the (small) frame into bytes: slicing, comparing and summing
            # bytes is several times cheaper than doing it on a memoryview
            b = f.tobytes() if type(f) is memoryview else bytes(f)
            n = len(b)
            # IPv4, version 4 IHL 5, TCP, not a fragment, our address, our MAC
            if (n >= 54 and b[12] == 8 and b[13] == 0 and b[14] == 0x45 and b[23] == 6
                    and not (b[20] & 0x3F or b[21]) and b[30:34] == self.ipb and b[0:6] == self.mac):
                tl = (b[16] << 8) | b[17]
                if 40 <= tl <= n - 14 and int.from_bytes(b[14:34], "big") % 0xFFFF == 0:
                    end = 14 + tl
                    c = self.conns.get(b[26:38])
                    if c is not None:
                        # TCP checksum: the addresses and the segment are one run of bytes
                        # (26..end), so one sum covers pseudo header addresses + segment
                        if not csum_ok:
                            s = int.from_bytes(b[26:end], "big")
                            if tl & 1:
                                s <<= 8                             # pad the odd segment at its end
                            if (s + 6 + tl - 20) % 0xFFFF:
                                self.counters["drop_tcp_bad_checksum"] += 1
                                return
                        self.counters["tcp_in_segments"] += 1
                        c.segment(b, end, now)
                        return
                    # no connection: LISTEN / TIME-WAIT / reset, from the raw header
                    if not csum_ok and not sum_ok(b[26:end], 6 + tl - 20):
                        self.counters["drop_tcp_bad_checksum"] += 1
                        return
                    if b[47] == SYN and b[36:38] == self._port_b and self._syn_fast_ok:
                        self._syn(b, end, now)
                        return
                    try:
                        self._check_source(b[26:30])
                        hl = (b[46] >> 4) << 2
                        if hl < 20 or 34 + hl > end:
                            raise Malformed("tcp_bad_offset", str(hl))
                        sport, dport, seq, ack, _, fl, win = _TCPH.unpack_from(b, 34)
                        opts = Options.parse(b[54:34 + hl]) if hl > 20 else _NO_OPTIONS
                        self._tcp_in(b[6:12], b[26:30], TcpSegment(sport, dport, seq, ack, fl, win, opts,
                                                                   b[34 + hl:end]), b, end, now)
                    except Malformed as e:
                        self.counters["drop_" + e.reason] += 1
                    return
            self._slow(b, now, csum_ok)
        except Exception as e:          # a bug must not stop the server: count it, keep the text
            self.counters["drop_internal_error"] += 1
            self.last_error = f"{type(e).__name__}: {e}"

    def poll(self, now: float) -> float:
        """Run the timers that are due; return the next deadline (monotonic seconds)."""
        if now < self._next:
            return self._next
        try:
            return self._poll(now)
        except Exception as e:
            self.counters["drop_internal_error"] += 1
            self.last_error = f"{type(e).__name__}: {e}"
            self._next = now + 0.1
            return self._next

    # ------------------------------------------------------------- the slow path

    def _slow(self, f, now: float, csum_ok: bool = False) -> None:
        cnt = self.counters
        try:
            eth = EthernetFrame.parse(f)
            if eth.dst != self.mac and eth.dst != BROADCAST:
                raise Malformed("eth_not_for_us")
            if eth.ethertype == ETH_ARP:
                self._arp_in(eth, now)
            elif eth.ethertype == ETH_IPV4:
                self._ipv4_in(eth, f, now, csum_ok)
            else:
                raise Malformed("eth_unknown_type", f"{eth.ethertype:#06x}")
        except Malformed as e:
            cnt["drop_" + e.reason] += 1

    def _arp_in(self, eth, now: float) -> None:
        a = ArpPacket.parse(eth.payload)
        cnt = self.counters
        if a.spa == self.ipb:
            if a.sha != self.mac:
                cnt["arp_address_conflict"] += 1        # someone else claims our address (RFC 5227)
            raise Malformed("arp_from_our_address")
        if a.tpa == self.ipb:
            if self.on_link(a.spa) and a.spa != b"\0\0\0\0":
                self.arp.learn(a.spa, a.sha, now)       # RFC 826 merge: the asker will talk to us
            if a.op == OP_REQUEST:
                self._arp_out(OP_REPLY, eth.src, a.spa, a.sha)
                cnt["arp_replies"] += 1
            else:
                cnt["arp_replies_received"] += 1
        elif a.spa in self.arp._e:
            self.arp.learn(a.spa, a.sha, now)           # update an entry we have (RFC 826)
            cnt["arp_updates"] += 1
        else:
            raise Malformed("arp_not_for_us")

    def _arp_out(self, op: int, dst_mac: bytes, tpa: bytes, tha: bytes) -> None:
        arp = ArpPacket(op, self.mac, self.ipb, tha, tpa).emit()
        self.txq.append((EthernetFrame(dst_mac, self.mac, ETH_ARP).emit() + arp + bytes(18), None, None))

    def _resolve_gateway(self, now: float) -> None:
        self._arp_out(OP_REQUEST, BROADCAST, self.gateway, _ZERO_MAC)
        self.counters["arp_requests"] += 1
        self._gw_arp_at = now + 1.0

    def _ipv4_in(self, eth, f, now: float, csum_ok: bool = False) -> None:
        ip = IPv4Header.parse(eth.payload)
        if ip.dst != self.ipb:
            raise Malformed("ip_not_for_us")
        self._check_source(ip.src)
        if ip.proto == PROTO_TCP:
            seg = TcpSegment.parse(ip.payload, ip.src, ip.dst, verify=not csum_ok)
            self._tcp_in(bytes(eth.src), bytes(ip.src), seg, f, 14 + 20 + len(ip.payload), now)
        elif ip.proto == PROTO_ICMP:
            self._icmp_in(eth, ip)
        else:
            raise Malformed("ip_unknown_protocol", str(ip.proto))

    def _check_source(self, s: bytes) -> None:
        """RFC 1122 §3.2.1.3: no multicast, broadcast, loopback, "this network" or our own source."""
        v = int.from_bytes(s, "big")
        if (v >= 0xE0000000 or v < 0x01000000 or v >> 24 == 127 or s == self.ipb or
                (self.prefix < 31 and v & self.netmask == self.net and v | self.netmask == MASK)):
            raise Malformed("ip_bad_source", ".".join(map(str, s)))

    def _icmp_in(self, eth, ip) -> None:
        m = Icmp.parse(ip.payload)
        if m.type != ECHO_REQUEST or m.code != 0:
            self.counters["icmp_ignored"] += 1
            return
        out = IPv4Header(self.ipb, ip.src, PROTO_ICMP, m.echo_reply().emit()).emit()
        self.txq.append((EthernetFrame(eth.src, self.mac, ETH_IPV4).emit() + out, None, None))
        self.counters["icmp_echo_replies"] += 1

    def _tcp_in(self, src_mac: bytes, src_ip: bytes, seg, f, end: int, now: float) -> None:
        """A checked TCP segment (IPv4 header at 14, no options) of frame `f` ending at `end`."""
        cnt = self.counters
        key = src_ip + self.ipb + struct.pack("!HH", seg.sport, seg.dport)
        c = self.conns.get(key)
        if c is not None:                      # e.g. broadcast destination MAC: still ours
            cnt["tcp_in_segments"] += 1
            c.segment(f, end, now)
            return
        tw = self.tw.get(key)
        if tw is not None:
            if self._tw_segment(key, tw, seg, src_mac, src_ip, now):
                return
        fl = seg.flags
        if ((seg.dport != self.cfg.port or not seg.dport) and (self.tls is None or seg.dport != self.cfg.tls_port)
                or self.store is None):
            if not fl & RST:
                self._reset_for(src_mac, src_ip, seg)
            raise Malformed("tcp_closed_port", str(seg.dport))
        if fl & RST:
            raise Malformed("tcp_rst_no_connection")
        if fl & ACK:
            if not fl & SYN and now < self._cookies_until:
                mss = self.isn.check_cookie(key, (seg.seq - 1) & MASK, (seg.ack - 1) & MASK, now)
                if mss is not None and len(self.conns) < self.cfg.max_conns:
                    cnt["tcp_syncookies_accepted"] += 1
                    c = (Conn if seg.dport == self.cfg.port else self._tls_conn)(
                        self, key, src_mac, src_ip, seg.sport, (seg.ack - 1) & MASK,
                        (seg.seq - 1) & MASK, mss, None, seg.window, now, ESTABLISHED)
                    c.snd_una = c.snd_nxt
                    c.wl1 = (seg.seq - 1) & MASK
                    self.conns[key] = c
                    cnt["tcp_conns_open"] += 1
                    self.arm(c, c.deadline())
                    self.established(c, False)
                    c.segment(f, end, now)
                    return
            self._reset_for(src_mac, src_ip, seg)
            raise Malformed("tcp_ack_no_connection")
        if not fl & SYN:
            raise Malformed("tcp_no_connection")
        if fl & FIN:
            raise Malformed("tcp_syn_fin")
        if len(self.conns) >= self.cfg.max_conns:
            raise Malformed("tcp_conn_limit")
        cookies = self.cfg.syncookies
        if cookies == "always" or (self.n_synrcvd >= self.cfg.syn_backlog and cookies == "auto"):
            mss = min(seg.options.mss or 536, self.cfg.mtu - 40)
            cookie = self.isn.cookie(key, seg.seq, mss, now)
            self._cookies_until = now + 130.0
            self._emit_tcp(src_mac, src_ip, seg.dport, seg.sport, cookie, (seg.seq + 1) & MASK, SYN | ACK,
                           Options(mss=self.cfg.mtu - 40))
            cnt["tcp_syncookies_sent"] += 1
            return
        if self.n_synrcvd >= self.cfg.syn_backlog:
            raise Malformed("tcp_syn_backlog_full")
        self._open(key, src_mac, src_ip, seg.sport, seg.seq, seg.options.mss, seg.options.wscale,
                   seg.window, now)

    def _open(self, key, mac, ip, port, seq, mss, ws, win, now) -> None:
        """Passive open (RFC 9293 §3.10.7.2): a SYN-RECEIVED Conn and our SYN-ACK."""
        cnt = self.counters
        cls = Conn if self.tls is None or key[10:12] == self._port_b else self._tls_conn
        c = cls(self, key, mac, ip, port, self.isn.isn(key, now), seq, mss, ws, win, now, SYN_RCVD)
        self.conns[key] = c
        cnt["tcp_conns_open"] += 1
        self.n_synrcvd += 1
        cnt["tcp_syn_received"] += 1
        c.rtt_t = now
        c.t_rtx = now + c.rtt.rto
        # The wheel entry may be earlier than the deadline (when it comes due the
        # deadline is asked again). At RTO_min it is no later than the retransmission
        # timer of the reply, whatever the RTT sample: no move on the common path.
        self.arm(c, min(now + self.cfg.rto_min, c.t_rtx))
        self.send_synack(c)

    def _syn(self, b: bytes, end: int, now: float) -> None:
        """A plain SYN to our port (the connection-per-request hot path): the same
        steps as _tcp_in's passive open, from the raw header, without parsed
        segment objects. Only used while SYN cookies are not needed."""
        cnt = self.counters
        hl = (b[46] >> 4) << 2
        if hl < 20 or 34 + hl > end:
            cnt["drop_tcp_bad_offset"] += 1
            return
        src_ip = b[26:30]
        try:
            self._check_source(src_ip)
            if hl == 40 and b[54] == 2 and b[55] == 4 and b[70:73] == b"\x01\x03\x03":
                mss = (b[56] << 8) | b[57]                  # Linux: MSS, SACK-perm, TS, NOP, WS
                ws = b[73] if b[73] < 14 else 14            # RFC 7323 §2.3
            elif hl > 20:
                o = Options.parse(b[54:34 + hl])
                mss, ws = o.mss, o.wscale
            else:
                mss = ws = None
        except Malformed as e:
            cnt["drop_" + e.reason] += 1
            return
        key = b[26:38]
        seq = int.from_bytes(b[38:42], "big")
        if len(self.conns) >= self.cfg.max_conns:          # before TIME-WAIT state is given up
            cnt["drop_tcp_conn_limit"] += 1
            return
        tw = self.tw.pop(key, None)
        if tw is not None:                                  # see _tw_segment
            if 0 < ((seq - tw[2]) & MASK) < HALF:
                cnt["tcp_time_wait_reopened"] += 1
            else:
                cnt["tcp_time_wait_reopened_lower_seq"] += 1
        if self.n_synrcvd >= self.cfg.syn_backlog:         # the general path sends a cookie
            try:
                self._tcp_in(b[6:12], src_ip, TcpSegment(*_TCPH.unpack_from(b, 34)[:4], SYN,
                                                         (b[48] << 8) | b[49], Options(mss, ws)), b, end, now)
            except Malformed as e:                          # e.g. backlog full with cookies off
                cnt["drop_" + e.reason] += 1
            return
        self._open(key, b[6:12], src_ip, (b[34] << 8) | b[35], seq, mss, ws, (b[48] << 8) | b[49], now)

    def _tw_segment(self, key, tw, seg, src_mac, src_ip, now) -> bool:
        """A segment for a TIME-WAIT connection; False to process it as new (a new SYN)."""
        expiry, snd_nxt, rcv_nxt, mac = tw
        fl = seg.flags
        cnt = self.counters
        if fl & RST:
            cnt["tcp_time_wait_rst_ignored"] += 1       # RFC 1337
            return True
        if fl & SYN and not fl & ACK:
            # a new connection on the same 4-tuple (clients reuse ports fast when the
            # server closes first). RFC 9293 §3.10.7.4 / RFC 6191 allow it when the
            # SYN's sequence number is above RCV.NXT; without timestamps Linux would
            # answer a lower one with an ACK, the client would RST (ignored here,
            # RFC 1337) and retry after 1 s. We accept it at once: our new ISN
            # is fresh, and old duplicates still face the new connection's checks.
            if len(self.conns) >= self.cfg.max_conns:   # keep TIME-WAIT: the SYN is dropped
                cnt["drop_tcp_conn_limit"] += 1
                return True
            del self.tw[key]
            if 0 < ((seg.seq - rcv_nxt) & MASK) < HALF:
                cnt["tcp_time_wait_reopened"] += 1
            else:
                cnt["tcp_time_wait_reopened_lower_seq"] += 1
            return False
        if fl & FIN:
            del self.tw[key]                            # restart 2*MSL (keeps the table in expiry order)
            self.tw[key] = (now + self.cfg.time_wait, snd_nxt, rcv_nxt, mac)
        cnt["tcp_time_wait_acks"] += 1
        self._emit_tcp(src_mac, src_ip, seg.dport, seg.sport, snd_nxt, rcv_nxt, ACK)
        return True

    def _reset_for(self, src_mac, src_ip, seg) -> None:
        """RFC 9293 §3.10.7.1: a RST answering a segment that has no connection."""
        if seg.flags & ACK:
            self._emit_tcp(src_mac, src_ip, seg.dport, seg.sport, seg.ack, 0, RST)
        else:
            self._emit_tcp(src_mac, src_ip, seg.dport, seg.sport, 0, (seg.seq + seg.seg_len) & MASK, RST | ACK)
        self.counters["tcp_rst_sent"] += 1

    def _emit_tcp(self, dmac, dst, sport, dport, seq, ack, flags, options=Options(), window=None) -> None:
        win = self.cfg.rcv_wnd if window is None else window
        tcp = TcpSegment(sport, dport, seq, ack, flags, win if not flags & RST else 0, options).emit(self.ipb, dst)
        ip = IPv4Header(self.ipb, bytes(dst), PROTO_TCP, tcp).emit()
        self.txq.append((EthernetFrame(bytes(dmac), self.mac, ETH_IPV4).emit() + ip, None, None))
        self.counters["tcp_out_segments"] += 1

    # ------------------------------------------------------ services for Conn

    def send_synack(self, c: Conn) -> None:
        """Our SYN-ACK: MSS, and Window Scale 0 when the peer offered the option."""
        c._ctl(c.iss, SYN | ACK, self._synack_ws if c.ws_ok else self._synack_opts)

    def opts_template(self, tmpl: bytes, ip_const: int, opts: bytes):
        """(header, TCP header length, options' sum) of a data-less segment with
        `opts` for a connection's template: IP length and checksum and the options
        in place. The same for every SYN-ACK to one peer and port: cached."""
        k = (tmpl, opts)
        v = self._opts_cache.get(k)
        if v is None:
            h = bytearray(tmpl)
            h += opts
            hl = 20 + len(opts)
            _IP_FIXED(h, 16, 20 + hl, 0, 0x4000, 64, PROTO_TCP, (-(ip_const + 20 + hl)) % 0xFFFF)
            if len(self._opts_cache) >= 16384:
                self._opts_cache.clear()
            v = self._opts_cache[k] = (bytes(h), hl, int.from_bytes(opts, "big"))
        return v

    def established(self, c: Conn, from_syn_rcvd: bool = True) -> None:
        if from_syn_rcvd:
            self.n_synrcvd -= 1
        self.counters["tcp_established"] += 1       # (its HTTP state comes with its first data: Conn._deliver)

    def remove(self, c: Conn) -> None:
        if c.sched:
            b = self._wheel.get(int(c.sched * _SLOTS_PER_S))
            if b is not None:
                b.pop(c, None)
            c.sched = 0.0
        if self.conns.get(c.key) is c:
            del self.conns[c.key]
            self.counters["tcp_conns_open"] -= 1        # a gauge: connections in the table now
        if c.state == SYN_RCVD:
            self.n_synrcvd -= 1
        c.state = CLOSED

    def time_wait(self, c: Conn, now: float) -> None:
        self.remove(c)
        self.counters["tcp_time_wait"] += 1
        tw = self.tw
        if len(tw) >= self.cfg.max_conns:
            del tw[next(iter(tw))]
            self.counters["tcp_time_wait_evicted"] += 1
        tw[c.key] = (now + self.cfg.time_wait, c.snd_max, c.rcv_nxt, c.peer_mac)
        if now + self.cfg.time_wait < self._next:
            self._next = now + self.cfg.time_wait

    def arm(self, c: Conn, t: float) -> None:
        """Have `c`'s timer wheel entry come due no later than `t`: moved there if it
        is later (or there is none); an earlier one stays, since when it comes due
        the deadline is asked again."""
        if c.sched and c.sched <= t:
            return
        wheel = self._wheel
        if c.sched:
            b = wheel.get(int(c.sched * _SLOTS_PER_S))
            if b is not None:
                b.pop(c, None)
        c.sched = t
        k = int(t * _SLOTS_PER_S)
        b = wheel.get(k)
        if b is None:
            b = wheel[k] = {}
            heapq.heappush(self._slots, k)
        b[c] = None
        if t < self._next:
            self._next = t

    def challenge_ok(self, now: float) -> bool:
        s = int(now)
        if s != self._chal_sec:
            self._chal_sec = s
            self._chal_n = 0
        self._chal_n += 1
        return self._chal_n <= self.cfg.challenge_ack_limit

    def mss_params(self, peer_mss):
        """(SMSS, aligned, tso_max, gso) for a peer's MSS option (None: absent), cached:
        a client's connections all carry the same option.

        SMSS: the peer's MSS option, else 536 (RFC 9293 §3.7.1, RFC 6691), within our
        MTU; without checksum offload also within the store's MSS (segments must match
        the stored sums). `aligned`: segments can use the stored per-MSS sums."""
        v = self._mss_cache.get(peer_mss)
        if v is None:
            cfg = self.cfg
            mss = min(peer_mss or 536, cfg.mtu - 40)
            if self.mode == 0 and self.smss:
                mss = min(mss, self.smss)
            mss = max(mss, 64)
            if len(self._mss_cache) >= 1024:
                self._mss_cache.clear()
            v = self._mss_cache[peer_mss] = (mss, mss == self.smss, max(mss, (cfg.tso_max // mss) * mss),
                                             GSO(34, 16, mss, 54))
        return v

    def template(self, peer_mac: bytes, peer_ip: bytes, peer_port: int, lport: int = 0):
        """A connection's header templates and checksum constants: (template, ip_const,
        pseudo_const, tcp_const, ctl), all sums mod 0xFFFF. `template` is the
        Ethernet+IPv4+TCP header with addresses and ports; `ctl` the same with the IP
        total length and checksum of a 40-byte datagram (a bare ACK, FIN or RST)
        already in place. The Ethernet+IP part is cached per peer, the whole per
        peer and port: a client opens many connections and reuses its ports.
        `lport`: our port when it is not cfg.port (HTTPS)."""
        k = peer_mac + peer_ip + peer_port.to_bytes(2, "big")
        if lport:
            k += lport.to_bytes(2, "big")
        v = self._conn_tmpl.get(k)
        if v is not None:
            return v
        p = peer_mac + peer_ip
        pv = self._tmpl_cache.get(p)
        if pv is None:
            t = EthernetFrame(peer_mac, self.mac, ETH_IPV4).emit()
            t += struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0x4000, 64, PROTO_TCP, 0, self.ipb, peer_ip)
            ip_const = int.from_bytes(t[14:34], "big") % 0xFFFF
            pseudo = (int.from_bytes(self.ipb + peer_ip, "big") + PROTO_TCP) % 0xFFFF
            if len(self._tmpl_cache) >= 4096:
                self._tmpl_cache.clear()
            pv = self._tmpl_cache[p] = (bytes(t), ip_const, pseudo)
        t, ip_const, pseudo = pv
        ports = (lport << 16 if lport else self._port_pre) | peer_port
        t = t + ports.to_bytes(4, "big") + self._tcp_tail
        ctl = bytearray(t)
        _IP_FIXED(ctl, 16, 40, 0, 0x4000, 64, PROTO_TCP, (-(ip_const + 40)) % 0xFFFF)
        if len(self._conn_tmpl) >= 16384:
            self._conn_tmpl.clear()
        v = self._conn_tmpl[k] = (t, ip_const, pseudo, (pseudo + ports) % 0xFFFF, bytes(ctl))
        return v

    def patched(self, resp, close: bool):
        """(header bytes with Date and Connection written, first segment's sum, body view)."""
        k = resp.off * 2 + close
        v = self._hdr_cache.get(k)
        if v is None:
            off, hl = resp.off, resp.header_len
            old = self.blob[off:off + hl]
            hdr = bytearray(old)
            if resp.date_off >= 0 and self.date is not None:
                hdr[resp.date_off:resp.date_off + 29] = self.date
            if resp.conn_off >= 0:
                hdr[resp.conn_off:resp.conn_off + 10] = _CLOSE if close else _KEEP
            hdr = bytes(hdr)
            # the header block starts the first segment: its contribution to the
            # segment's sum is its big-endian value, shifted by 8 bits when an odd
            # number of bytes follows it in the (zero-padded, even) segment
            delta = int.from_bytes(hdr, "big") - int.from_bytes(old, "big")
            if hl & 1:
                delta <<= 8
            sum0 = (resp.sums[0] + delta) % 0xFFFF
            if len(self._hdr_cache) >= 8192:
                self._hdr_cache.clear()
            v = self._hdr_cache[k] = (hdr, sum0, self.blob[off + hl:off + resp.length])
        return v

    # ------------------------------------------------------------------ timers

    def _poll(self, now: float) -> float:
        wheel = self._wheel
        slots = self._slots
        cur = int(now * _SLOTS_PER_S)
        nxt = now + 3600.0
        while slots:
            k = slots[0]
            b = wheel[k]
            if k > cur or not b:
                if b:
                    nxt = min(c.sched for c in b)
                    break
                heapq.heappop(slots)
                del wheel[k]
                continue
            for c in list(b):
                if c.sched > now or b.pop(c, 0) is not None:
                    continue                        # not yet due (the current slot), or moved meanwhile
                c.sched = 0.0
                d = c.deadline()
                if d <= now:
                    c.on_timer(now)
                    if c.state == CLOSED:
                        continue
                    d = c.deadline()
                    if d <= now:                    # nothing moved it (should not happen): do not spin
                        d = now + 0.01
                self.arm(c, d)
            if k == cur:
                if b:
                    nxt = min(c.sched for c in b)
                    break
            elif b:
                continue                            # armed in the past meanwhile: run it again
            if wheel.get(k) is b and not b:
                heapq.heappop(slots)
                del wheel[k]
        tw = self.tw
        while tw:
            k = next(iter(tw))
            e = tw[k][0]
            if e > now:
                if e < nxt:
                    nxt = e
                break
            del tw[k]
        if self.gateway and self.gateway_mac is None:
            if now >= self._gw_arp_at:
                self._resolve_gateway(now)
            if self._gw_arp_at < nxt:
                nxt = self._gw_arp_at
        self._next = nxt
        return nxt
