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
handled from the same raw header. A frame the IPv4 fast path does not
take and that is IPv6 with next header TCP goes to the IPv6 fast path
(`_tcp6`: the same steps with the IPv6 offsets, a 36-byte key, `Conn6`;
see docs/internals.md). Everything else takes the slow path
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
TlsConns (IPv4) or TlsConn6s (IPv6) (SYNs to it take the general path, not
the fast one): a SYN creates a
SYN-RECEIVED Conn and a SYN-ACK with our MSS and, when the peer offered it,
Window Scale 0 (we take its scaling; our own window stays <= 65535). We never
offer SACK or timestamps. When `syn_backlog` half-open connections exist (or
`syncookies="always"`), the SYN-ACK carries a SYN cookie instead (isn.py)
and no state is kept; a returning ACK that carries a valid cookie creates
the connection directly. `max_conns` caps the table (SYNs beyond are counted
and dropped). Segments for other ports, or non-SYNs without a connection,
get a RST (RFC 9293 §3.10.7.1) — never in answer to a RST.

SYN floods (RFC 4987). The defence has three parts. (1) Before the stack:
the SYN ring's kernel gate (rings/ebpf.py) or a SynGate (rings/base.py; in
the SYN ring or the serve loop) hands the stack segments of known
connections first, every SYN of a source in `syn_trusted` (IPv4 and IPv6
sources filled by `established`: it answered our SYN-ACK, so it is not
spoofed), retransmissions, and of the other SYNs only a budget, so a new
client's SYN gets in on its first retransmission at the latest. (2) Here, answering a SYN costs as
little as possible: once the backlog is full, `_cookie_synack` packs the
SYN-ACK in one call with both sums added up from the fields, with no
state and no segment objects, on both the fast and the general path.
(3) Pressure: a full backlog puts the stack under pressure for
`_PRESSURE_S` (10 s after it was last full). Meanwhile every SYN gets a
cookie, even when half-open slots have freed up (no new half-open state
for the flood to fill), and the half-open entries get
`syn_retries_pressure` (1) SYN-ACK retransmissions instead of
`syn_retries` (5): the flood's entries (spoofed sources never answer)
are gone ~3 s (RTO 1 s + 2 s) after they were made instead of ~63 s, so
`tcp_conns_open` falls back to the real connections within seconds of a
flood's end. A real client whose SYN-ACK and its retransmission were
both lost retries its SYN and gets a cookie.

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
announce ourselves at `start` and on every new address (gratuitous ARP, RFC
5227 §3) and resolve every gateway of the route table (route.py; retried
every second until known). Replies always go to the source MAC of the frame
that asked, so neither the cache nor the routes are on the hot path.

Addresses. `ip` may be None: no address until DHCP (`enable_dhcp`, dhcp4.py)
binds one; `set_address` changes it (connections of the old one dropped,
header caches cleared) and queues an event in `events` for the console.
Without an address `ipb` is b"", which the fast path's 4-byte comparison
never matches. UDP (udp.py) and, with `enable_ipv6`, IPv6 (ipv6.py) take
the slow path; each protocol module is sans-IO and driven from here.

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
from .conn6 import Conn6
from .counters import Counters
from .ethernet import BROADCAST, ETH_ARP, ETH_IPV4, EthernetFrame
from .icmp import ECHO_REQUEST, Icmp
from .ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, IPv4Header
from . import isn as _isn
from .isn import IsnGenerator
from .rings.base import GSO, Offload
from .route import RouteTable, TableFull
from .tcp import ACK, FIN, RST, SYN, Options, TcpSegment
from .udp import UdpDatagram, UdpPorts
from .wire import Malformed, ip_bytes, sum_ok

__all__ = ["Stack", "StackConfig", "imf_fixdate"]


def _ip_or_none(b):
    return ".".join(map(str, b)) if b else None

_KEEP = b"keep-alive"
_CLOSE = b"close     "
_ZERO_MAC = b"\0" * 6
_TCPH = struct.Struct("!HHIIBBH")
_NO_OPTIONS = Options()
_SLOTS_PER_S = 1000.0           # timer wheel resolution: 1 ms
_IP_FIXED = struct.Struct("!HHHBBH").pack_into      # at 16: total length, id, flags/frag, ttl, proto, csum
# a cookie SYN-ACK: Ethernet, IPv4 (44 bytes, DF, TTL 64), TCP with the MSS option
_COOKIE_SA = struct.Struct("!6s6sHBBHHHBBH4s4sHHIIBBHHHI").pack
_PRESSURE_S = 10.0              # "under pressure" for this long after the SYN backlog was last full
# Entries of the caches keyed by what clients send (cleared when full; the
# bounds in bytes are in docs/internals.md, "Memory bounds")
TMPL_CACHE_MAX = 4096           # peer MAC + IP
CONN_TMPL_MAX = 16384           # peer MAC + IP + port
OPTS_CACHE_MAX = 16384          # (template, SYN-ACK options)
MSS_CACHE_MAX = 1024            # peer's MSS option
TRUSTED_MAX = 16384             # IPv4 sources and IPv6 /64s that completed a handshake (syn_trusted)
HDR_CACHE_MAX = 8192            # prebuilt response x Connection value (not client-keyed: the store's size)
_IP6 = struct.Struct("!IHBB16s16s")                 # version/class/flow, payload length, next header, hops, src, dst
_V4MAPPED = bytes(10) + b"\xff\xff"


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
    syn_retries_pressure: int = 1   # the same while SYN cookies are in use (the backlog overflowed)
    delack: float = 0.04            # delayed ACK (RFC 9293 §3.8.6.3: < 0.5 s)
    idle_timeout: float = 60.0      # no progress for this long: close (or abort if stuck)
    request_timeout: float = 30.0   # a request started but not complete for this long: close
    time_wait: float = 60.0         # 2*MSL
    arp_ttl: float = 300.0
    arp_cache_size: int = 256
    challenge_ack_limit: int = 1000  # per second, the whole stack (RFC 5961 §7)
    tso_max: int = 62000            # payload bytes per GSO super-frame (< 64 KB with headers)
    ooo_limit: int = 16384          # out-of-order bytes kept per connection
    ooo_segments: int = 64          # ... in at most this many segments (each costs ~150 bytes of overhead)
    max_queued: int = 256           # replies queued per connection before request data is refused
    tls_port: int = 443             # HTTPS, when the Stack has a TlsServer (tls.py)


class Stack:
    def __init__(self, store, mac: bytes, ip: str | None, prefix: int, gateway: str | None, offload: Offload,
                 config: StackConfig = StackConfig(), secret: bytes = None, http_factory=None, tls=None):
        if isinstance(mac, str):
            mac = bytes.fromhex(mac.replace(":", "").replace("-", ""))
        if len(mac) != 6:
            raise ValueError(f"MAC address must be 6 bytes, got {mac!r}")
        if ip is not None and not 0 < prefix <= 32:
            raise ValueError(f"prefix length must be 1..32, got {prefix}")
        if config.syncookies not in ("auto", "always", "never"):
            raise ValueError(f"syncookies must be auto, always or never, got {config.syncookies!r}")
        if not 576 <= config.mtu <= 65535:
            raise ValueError(f"MTU must be 576..65535, got {config.mtu}")
        if not 0 < config.rcv_wnd <= 65535:
            raise ValueError(f"rcv_wnd must be 1..65535, got {config.rcv_wnd}")
        self.store = store
        self.mac = bytes(mac)
        self.routes = RouteTable()
        self.events = []            # address events for the serve loop (see set_address): drained there
        self.dhcp = None            # a dhcp4.Dhcp4Client once enable_dhcp() was called
        self.ip6 = None             # an ipv6.Ipv6Host once enable_ipv6() was called
        self.dev_mtu = config.mtu
        self._set_address(ip_bytes(ip) if ip is not None else None, prefix)
        if gateway:
            gw = ip_bytes(gateway)
            if ip is None or not self.on_link(gw):
                raise ValueError(f"gateway {gateway} is not in {ip}/{prefix}")
            self.routes.add(b"\0\0\0\0", 0, gw, "static")
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
                self._reply_limits = HTTPConnection(site, blob).limits
        else:
            self.smss = 0
            self.blob = None
        self.http_factory = http_factory
        self.http_first = http_first
        self.counters = Counters()
        self.udp = UdpPorts(self.counters)     # port -> handler (the DHCP client binds 68)
        self.tls = tls              # a tls.TlsServer: HTTPS on cfg.tls_port (TlsConn), or None
        if tls is not None:
            if config.tls_port == config.port:
                raise ValueError(f"tls_port and port are both {config.port}")
            tls.bind(self.counters, site_http)     # HTTPS always serves the site (not http_factory)
            from .tls import TlsConn, TlsConn6
            self._tls_conn = TlsConn
            self._tls_conn6 = TlsConn6
        self.txq = []
        self.conns = {}             # raw 4-tuple (src ip, dst ip, sport, dport as received) -> Conn
        self.tw = {}                # TIME-WAIT: raw 4-tuple -> (expiry, snd_nxt, rcv_nxt, peer_mac)
        self.n_synrcvd = 0
        # IPv4 source -> None: completed a handshake, so its SYNs pass the flood gate
        # (rings/base.py SynGate; the serve loop hands it this table)
        self.syn_trusted = {}
        self.arp = ArpCache(config.arp_ttl, config.arp_cache_size)
        self.date = None            # 29 bytes once set_date was called; until then the stored placeholder
        self.date_gen = 0
        self._hdr_cache = {}
        self._next = 0.0            # no deadline before this (a lower bound)
        self._wheel = {}            # timer slot (int(t * _SLOTS_PER_S)) -> {Conn: None} armed in it
        self._slots = []            # heap of the slot numbers in _wheel
        self._cookies_until = -1.0  # cookies sent until then may come back (their lifetime)
        # the backlog overflowed: cookies for every SYN until then ("always": for ever)
        self._pressure_until = float("inf") if config.syncookies == "always" else -1.0
        self._chal_sec = -1
        self._chal_n = 0
        self._gw_arp_at = {}        # gateway -> when to ARP for it again (while unresolved)
        self.gso_csum = GSO(34, 16, 0, 54)
        self.gso_csum6 = GSO(54, 16, 0, 74, 4)     # IPv6: TCP at 54, gso_type TCPV6
        self._gso6 = {}
        self._tmpl_cache = {}       # peer MAC + IP -> (Ethernet+IP header, ip_const, pseudo_const)
        self._conn_tmpl = {}        # peer MAC + IP + port -> Stack.template()
        self._opts_cache = {}       # (template, TCP options) -> Stack.opts_template()
        self._mss_cache = {}        # peer's MSS option -> (SMSS, aligned, tso_max, gso): see mss_params
        self._port_pre = config.port << 16
        self._tcp_tail = struct.pack("!IIBBHHH", 0, 0, 0x50, 0, 0, 0, 0)   # TCP header after the ports
        self._set_mtu(config.mtu)
        self.last_error = None
        self.obs = None             # access log / metrics hooks (appliance/obs): None = off
        self.side = None            # other ports and draining (appliance/obs): segments without a connection
        # the fast path's constants
        self._port_b = config.port.to_bytes(2, "big")
        self._syn_fast_ok = store is not None and config.port != 0

    # --------------------------------------------------------------- public API

    def start(self, now: float) -> None:
        """Announce our address (gratuitous ARP), start resolving the gateways, start DHCP."""
        if self.ipb:
            self._announce(now)
        if self.dhcp is not None:
            self.dhcp.start(now)
        if self.ip6 is not None:
            self.ip6.start(now)
            self._ip6_run()
        self._next = 0.0

    # ------------------------------------------------- address, routes, DHCP

    def _set_address(self, ipb, prefix) -> None:
        """Our address (None: none). b"" as `ipb` never equals the fast path's 4-byte slice."""
        self.ipb = bytes(ipb) if ipb else b""
        self.ip = ".".join(map(str, ipb)) if ipb else None
        self.prefix = prefix if ipb else 32
        self.netmask = (0xFFFFFFFF << (32 - self.prefix)) & 0xFFFFFFFF
        self.net = int.from_bytes(self.ipb, "big") & self.netmask if ipb else -1
        self.routes.remove("connected")
        if ipb:
            self.routes.add(self.ipb, self.prefix, None, "connected")

    def set_address(self, ipb, prefix: int, now: float, how: str = "static", event: str = "acquired") -> None:
        """Serve on `ipb`/`prefix` from now on (None: on no address). Connections and
        TIME-WAIT state of an old address are dropped silently (its peers cannot
        reach it any more); the header caches, which hold our address, are cleared.
        An event (kind, info) is queued in `events` for the console."""
        old = self.ipb
        if old and old != (ipb or b""):
            for c in list(self.conns.values()):
                if len(c.key) == 12:                # IPv4 ones (IPv6 keys are 36 bytes)
                    self.remove(c)
                    self.counters["tcp_conns_dropped_address_change"] += 1
            for k in [k for k in self.tw if len(k) == 12]:
                del self.tw[k]
        self._set_address(ipb, prefix)
        self._tmpl_cache.clear()
        self._conn_tmpl.clear()
        self._opts_cache.clear()
        info = {"event": event, "ip": self.ip, "prefix": self.prefix if ipb else None, "how": how}
        if ipb:
            info["gateway"] = _ip_or_none(self.routes.default())
            self._announce(now)
        self.events.append(("address", info))

    def _announce(self, now: float) -> None:
        self._arp_out(OP_REQUEST, BROADCAST, self.ipb, _ZERO_MAC)
        self.counters["arp_announcements"] += 1
        for g in self.routes.gateways():
            if self.arp.lookup(g, now) is None:
                self._resolve_gateway(g, now)

    def _set_mtu(self, mtu: int) -> None:
        """The IP MTU our MSS option and segment sizes follow (a DHCP option 26 may lower
        it below the device's, never raise it above)."""
        mtu = max(576, min(mtu, self.dev_mtu))
        self.cfg = self.cfg._replace(mtu=mtu)
        self._synack_opts = Options(mss=mtu - 40).emit()
        self._synack_ws = Options(mss=mtu - 40, wscale=0).emit()
        self._synack6_opts = Options(mss=mtu - 60).emit()          # IPv6: 40 bytes of IP header
        self._synack6_ws = Options(mss=mtu - 60, wscale=0).emit()
        self._mss_cache = {}

    def enable_ipv6(self, secret: bytes, config=None, rng=None) -> None:
        """IPv6 control plane (ipv6.py: ND, SLAAC, MLDv2, ICMPv6 echo) from `start` on.
        `secret` keys the RFC 7217 interface identifiers: keep it stable per host."""
        import random
        from .ipv6 import Ipv6Host
        self.ip6 = Ipv6Host(self.mac, self.counters, secret, rng or random.SystemRandom(), config, self.dev_mtu)
        self.ip6.too_big = self._too_big

    def _ip6_run(self) -> None:
        h = self.ip6
        for fr in h.out:
            self.txq.append((fr, None, None))
        h.out.clear()
        if h.events:
            for kind, info in h.events:
                if info.get("event") in ("lost", "duplicate"):
                    self._drop_address6(info["ip6"])
            self.events.extend(h.events)
            h.events.clear()

    def _drop_address6(self, text: str) -> None:
        """An IPv6 address went away: its connections and TIME-WAIT state with it."""
        import ipaddress
        a = ipaddress.IPv6Address(text).packed
        for c in list(self.conns.values()):
            if c.key[16:32] == a and len(c.key) == 36:
                self.remove(c)
                self.counters["tcp_conns_dropped_address_change"] += 1
        for k in [k for k in self.tw if k[16:32] == a and len(k) == 36]:
            del self.tw[k]

    def _too_big(self, body: bytes, now: float) -> None:
        """ICMPv6 Packet Too Big (RFC 4443 §3.2) for one of our connections: lower its
        SMSS to the reported MTU - 60 (RFC 8201 §4: never below the IPv6 minimum MTU
        1280) and resend what is in flight in the smaller segments. Accepted only
        when the quoted segment matches a connection and a sequence number in
        flight (RFC 8201 §5.2, RFC 5927 §4.1), since anyone can send one."""
        cnt = self.counters
        if len(body) < 8 + 40 + 8 or body[8] >> 4 != 6 or body[14] != 6:
            raise Malformed("icmp6_too_big_short")
        inner = body[8:]
        key = inner[24:40] + inner[8:24] + inner[42:44] + inner[40:42]
        c = self.conns.get(key)
        if c is None:
            raise Malformed("icmp6_too_big_no_connection")
        seq = int.from_bytes(inner[44:48], "big")
        if not ((seq - c.snd_una) & MASK) < ((c.snd_max - c.snd_una) & MASK):
            raise Malformed("icmp6_too_big_not_in_flight")
        mtu = min(max(int.from_bytes(body[4:8], "big"), 1280), self.cfg.mtu)
        if not c.set_mss(mtu - 60):
            cnt["icmp6_too_big_not_lower"] += 1
            return
        cnt["tcp_pmtu_lowered"] += 1
        c.snd_nxt = c.snd_una                       # resend in the new size (cf. Linux tcp_simple_retransmit)
        c.rtt_t = 0.0
        c.output(now)

    def enable_dhcp(self, config=None, rng=None) -> None:
        """Acquire (and keep) the address by DHCPv4 (dhcp4.py) from `start` on."""
        from .dhcp4 import CLIENT_PORT, DhcpConfig, Dhcp4Client
        self.dhcp = Dhcp4Client(self.mac, self.counters, rng, config or DhcpConfig())
        self.udp.bind(CLIENT_PORT, self._dhcp_in, any_dst=True)

    def _dhcp_in(self, src_mac, src_ip, dst_ip, sport, payload, now) -> None:
        if sport != 67:
            raise Malformed("dhcp_bad_source_port", str(sport))
        self.dhcp.receive(src_mac, payload, now)
        self._dhcp_run(now)
        self._next = 0.0            # the client's deadline may have moved earlier: poll asks it again

    def _dhcp_run(self, now: float) -> None:
        """Send what the DHCP client queued; apply its events."""
        d = self.dhcp
        for o in d.out:
            if o[0] == "udp":
                self.udp_send(o[1], o[3], 68, 67, o[4], src_ip=o[2])
            else:                                           # RFC 5227 §2.1.1 probe: sender 0.0.0.0
                arp = ArpPacket(OP_REQUEST, self.mac, b"\0\0\0\0", _ZERO_MAC, o[1]).emit()
                self.txq.append((EthernetFrame(BROADCAST, self.mac, ETH_ARP).emit() + arp + bytes(18), None, None))
        d.out.clear()
        for ev in d.events:
            k, L = ev.kind, ev.lease
            if k in ("acquired", "changed", "renewed"):
                if k != "renewed":                              # before the routes: gateways must be on-link
                    self.set_address(L.address, L.prefix, now, "dhcp", k)
                self.routes.remove("dhcp")
                try:
                    # RFC 3442: classless routes, when sent, replace the router option
                    for net, plen, gw in L.routes:
                        self.routes.add(net, plen, gw, "dhcp")
                    if not L.routes and L.routers:
                        self.routes.add(b"\0\0\0\0", 0, L.routers[0], "dhcp")
                except TableFull:
                    self.counters["drop_route_table_full"] += 1
                if L.mtu:
                    self._set_mtu(L.mtu)
                if k == "renewed":
                    self.counters["dhcp_leases_renewed"] += 1
                else:
                    self.events[-1][1].update(gateway=_ip_or_none(self.routes.default()), lease=L.lease_time,
                                              server=_ip_or_none(L.server), mtu=self.cfg.mtu)
                    for g in self.routes.gateways():
                        self._resolve_gateway(g, now)
            elif k == "lost":
                self.routes.remove("dhcp")
                self.set_address(None, 32, now, "dhcp", "lost")
            else:                                           # declined, no_answer: for the console
                self.events.append((k, {"ip": _ip_or_none(L.address) if L else None}))
        d.events.clear()

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

    def tables(self) -> dict:
        """name -> (entries, bound or None) of every table the stack keeps; for tests
        and the fuzz command (control path). The reply cache is the HTTP layer's,
        shared by the site's connections."""
        cfg = self.cfg
        t = {"conns": (len(self.conns), cfg.max_conns), "time_wait": (len(self.tw), cfg.max_conns),
             "wheel_slots": (len(self._wheel), None), "wheel_heap": (len(self._slots), None),
             "wheel_entries": (sum(map(len, self._wheel.values())), cfg.max_conns),
             "hdr_cache": (len(self._hdr_cache), HDR_CACHE_MAX), "tmpl_cache": (len(self._tmpl_cache), TMPL_CACHE_MAX),
             "conn_tmpl": (len(self._conn_tmpl), CONN_TMPL_MAX), "opts_cache": (len(self._opts_cache), OPTS_CACHE_MAX),
             "mss_cache": (len(self._mss_cache), MSS_CACHE_MAX), "arp": (len(self.arp), self.arp.size),
             "isn_cache": (len(self.isn._fcache), _isn._FCACHE_MAX),
             "syn_trusted": (len(self.syn_trusted), TRUSTED_MAX), "counters": (len(self.counters), None),
             "ooo_segments": (max((len(c.ooo) for c in self.conns.values()), default=0), cfg.ooo_segments),
             "ooo_bytes": (max((c.ooo_bytes for c in self.conns.values()), default=0), cfg.ooo_limit),
             "send_queue": (max((len(c.q) for c in self.conns.values()), default=0), None)}
        if self.http_first is not None:
            cache = self.http_first.__self__
            lim = self._reply_limits
            t["reply_cache"] = (len(cache), lim.cache_entries)
            t["reply_cache_bytes"] = (cache.nbytes, lim.cache_bytes)
        return t

    @property
    def gateway(self):
        """The default route's gateway (4 bytes), if any."""
        return self.routes.default()

    @property
    def gateway_mac(self):
        g = self.routes.default()
        return self.arp._e.get(g, (None,))[0] if g else None

    def on_link(self, ipb: bytes) -> bool:
        return self.routes.on_link(ipb)

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
            if n >= 74 and b[12] == 0x86 and b[13] == 0xDD and b[20] == 6 and self.ip6 is not None:
                self._tcp6(b, n, now, csum_ok)
                return
            self._slow(b, now, csum_ok)
        except Exception as e:          # a bug must not stop the server: count it, keep the text
            self.counters["drop_internal_error"] += 1
            self.last_error = f"{type(e).__name__}: {e}"

    def _tcp6(self, b: bytes, n: int, now: float, csum_ok: bool) -> None:
        """An IPv6 frame with next header TCP (RFC 8200, no extension headers): the
        IPv4 fast path's steps with the IPv6 offsets. The connection key is the raw 36
        bytes of addresses and ports (22..58); Conn.segment gets the frame from byte
        20 on, where the TCP header sits at 34 as in an IPv4 frame (see Conn6)."""
        a = self.ip6.addrs.get(b[38:54])
        if a is None or a.state != "preferred" or b[0:6] != self.mac or b[14] >> 4 != 6:
            self._slow(b, now, csum_ok)                 # ip6.receive names the drop
            return
        cnt = self.counters
        plen = (b[18] << 8) | b[19]
        if plen < 20 or 54 + plen > n:
            cnt["drop_ip6_bad_length"] += 1
            return
        end = 54 + plen
        if not csum_ok and not sum_ok(b[22:end], 6 + plen):     # pseudo header: addresses, length, 6
            cnt["drop_tcp_bad_checksum"] += 1
            return
        key = b[22:58]
        c = self.conns.get(key)
        if c is not None:
            cnt["tcp_in_segments"] += 1
            c.segment(b[20:end], end - 20, now)
            return
        try:
            src = b[22:38]
            if src[0] == 0xFF or src in (bytes(15) + b"\1", bytes(16)) or src[:12] == _V4MAPPED or src in self.ip6.addrs:
                raise Malformed("ip6_bad_source")
            hl = (b[66] >> 4) << 2
            if hl < 20 or 54 + hl > end:
                raise Malformed("tcp_bad_offset", str(hl))
            sport, dport, seq, ack, _, fl, win = _TCPH.unpack_from(b, 54)
            opts = Options.parse(b[74:54 + hl]) if hl > 20 else _NO_OPTIONS
            self._tcp_in(b[6:12], src, TcpSegment(sport, dport, seq, ack, fl, win, opts, b[54 + hl:end]),
                         b[20:end], end - 20, now, b[38:54])
        except Malformed as e:
            cnt["drop_" + e.reason] += 1

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
            if eth.ethertype == 0x86DD and self.ip6 is not None:
                if not self.ip6.accepts_mac(eth.dst):
                    raise Malformed("eth_not_for_us")
                try:
                    self.ip6.receive(f, now, csum_ok)
                finally:
                    self._ip6_run()
                    self._next = 0.0    # its deadlines may have moved earlier (a new tentative address)
                return
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
        if self.dhcp is not None and self.dhcp.state == "probing":
            self.dhcp.arp(a.op, a.sha, a.spa, a.tpa, now)      # RFC 5227 conflict detection
            self._dhcp_run(now)
        if a.spa == self.ipb:
            if a.sha != self.mac:
                cnt["arp_address_conflict"] += 1        # someone else claims our address (RFC 5227)
            raise Malformed("arp_from_our_address")
        if a.tpa == self.ipb:
            if a.spa != b"\0\0\0\0" and (self.on_link(a.spa) or a.spa in self._gw_arp_at):
                self.arp.learn(a.spa, a.sha, now)       # RFC 826 merge: the asker will talk to us
            if a.op == OP_REQUEST:
                self._arp_out(OP_REPLY, eth.src, a.spa, a.sha)
                cnt["arp_replies"] += 1
            else:
                cnt["arp_replies_received"] += 1
        elif a.spa in self.arp._e or (a.spa in self._gw_arp_at and a.op == OP_REPLY):
            self.arp.learn(a.spa, a.sha, now)           # update an entry we have (RFC 826)
            cnt["arp_updates"] += 1
        else:
            raise Malformed("arp_not_for_us")

    def _arp_out(self, op: int, dst_mac: bytes, tpa: bytes, tha: bytes) -> None:
        arp = ArpPacket(op, self.mac, self.ipb, tha, tpa).emit()
        self.txq.append((EthernetFrame(dst_mac, self.mac, ETH_ARP).emit() + arp + bytes(18), None, None))

    def _resolve_gateway(self, g: bytes, now: float) -> None:
        if self.ipb:
            self._arp_out(OP_REQUEST, BROADCAST, g, _ZERO_MAC)
            self.counters["arp_requests"] += 1
        self._gw_arp_at[g] = now + 1.0

    def _ipv4_in(self, eth, f, now: float, csum_ok: bool = False) -> None:
        ip = IPv4Header.parse(eth.payload)
        if ip.proto == PROTO_UDP:
            self._udp_in(eth, ip, now, csum_ok)
            return
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

    def _udp_in(self, eth, ip, now: float, csum_ok: bool) -> None:
        d = ip.dst
        to_us = d == self.ipb or d == b"\xff\xff\xff\xff" or (
            self.prefix < 31 and int.from_bytes(d, "big") == self.net | (~self.netmask & MASK))
        self._check_source(ip.src)
        dg = UdpDatagram.parse(ip.payload, ip.src, d, verify=not csum_ok)
        self.udp.deliver(bytes(eth.src), bytes(ip.src), bytes(d), dg, now, to_us)

    def udp_send(self, dst_mac: bytes, dst_ip: bytes, sport: int, dport: int, payload: bytes,
                 src_ip: bytes = None) -> None:
        """Queue one UDP datagram (from our address, or `src_ip`: 0.0.0.0 before we have one)."""
        src = src_ip if src_ip is not None else self.ipb
        dg = UdpDatagram(sport, dport, payload).emit(src, dst_ip)
        ip = IPv4Header(src, dst_ip, PROTO_UDP, dg).emit()
        self.txq.append((EthernetFrame(dst_mac, self.mac, ETH_IPV4).emit() + ip, None, None))
        self.counters["udp_out_datagrams"] += 1

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

    def _tcp_in(self, src_mac: bytes, src_ip: bytes, seg, f, end: int, now: float, ours=None) -> None:
        """A checked TCP segment of frame `f` (TCP header at 34) ending at `end`. `ours`:
        our IPv6 address it came to (an IPv6 frame from byte 20 on); None for IPv4."""
        cnt = self.counters
        key = src_ip + (self.ipb if ours is None else ours) + struct.pack("!HH", seg.sport, seg.dport)
        c = self.conns.get(key)
        if c is not None:                      # e.g. broadcast destination MAC: still ours
            cnt["tcp_in_segments"] += 1
            c.segment(f, end, now)
            return
        tw = self.tw.get(key)
        if tw is not None:
            if self._tw_segment(key, tw, seg, src_mac, src_ip, now, ours):
                return
        if self.side is not None and self.side.segment(key, src_mac, src_ip, seg, now):
            return                             # the metrics port, or refused while draining (appliance/obs)
        fl = seg.flags
        if ((seg.dport != self.cfg.port or not seg.dport)
                and (self.tls is None or seg.dport != self.cfg.tls_port)
                or self.store is None):
            if not fl & RST:
                self._reset_for(src_mac, src_ip, seg, ours)
            raise Malformed("tcp_closed_port", str(seg.dport))
        if fl & RST:
            raise Malformed("tcp_rst_no_connection")
        if fl & ACK:
            if not fl & SYN and now < self._cookies_until:
                mss = self.isn.check_cookie(key, (seg.seq - 1) & MASK, (seg.ack - 1) & MASK, now)
                if mss is not None and len(self.conns) < self.cfg.max_conns:
                    cnt["tcp_syncookies_accepted"] += 1
                    if seg.dport == self.cfg.port:
                        cls = Conn if ours is None else Conn6
                    else:
                        cls = self._tls_conn if ours is None else self._tls_conn6
                    c = cls(self, key, src_mac, src_ip, seg.sport, (seg.ack - 1) & MASK,
                            (seg.seq - 1) & MASK, mss, None, seg.window, now, ESTABLISHED)
                    c.snd_una = c.snd_nxt
                    c.wl1 = (seg.seq - 1) & MASK
                    self.conns[key] = c
                    cnt["tcp_conns_open"] += 1
                    self.arm(c, c.deadline())
                    self.established(c, False)
                    c.segment(f, end, now)
                    return
            self._reset_for(src_mac, src_ip, seg, ours)
            raise Malformed("tcp_ack_no_connection")
        if not fl & SYN:
            raise Malformed("tcp_no_connection")
        if fl & FIN:
            raise Malformed("tcp_syn_fin")
        if len(self.conns) >= self.cfg.max_conns:
            raise Malformed("tcp_conn_limit")
        if self.n_synrcvd >= self.cfg.syn_backlog or now < self._pressure_until:
            if self.cfg.syncookies == "never":
                raise Malformed("tcp_syn_backlog_full")
            if ours is None:
                self._cookie_synack(src_mac, src_ip, seg.sport, key, seg.seq, seg.options.mss, now, seg.dport)
            else:                                       # IPv6: the MSS is MTU - 60
                mss = min(seg.options.mss or 1220, self.cfg.mtu - 60)
                cookie = self.isn.cookie(key, seg.seq, mss, now)
                self._cookies_until = now + 130.0
                if self.n_synrcvd >= self.cfg.syn_backlog and self.cfg.syncookies == "auto":
                    self._pressure_until = now + _PRESSURE_S
                self._emit_tcp(src_mac, src_ip, seg.dport, seg.sport, cookie, (seg.seq + 1) & MASK,
                               SYN | ACK, Options(mss=self.cfg.mtu - 60), src=ours)
                cnt["tcp_syncookies_sent"] += 1
            return
        self._open(key, src_mac, src_ip, seg.sport, seg.seq, seg.options.mss, seg.options.wscale,
                   seg.window, now, Conn if ours is None else Conn6)

    def _open(self, key, mac, ip, port, seq, mss, ws, win, now, cls=Conn, lport: int = 0) -> Conn:
        """Passive open (RFC 9293 §3.10.7.2): a SYN-RECEIVED Conn (Conn6 for IPv6) and our
        SYN-ACK; `lport`: our port when it is neither the site's nor HTTPS's (the metrics
        port, appliance/obs). A key's last two bytes are our port in both families."""
        cnt = self.counters
        if lport:
            c = cls(self, key, mac, ip, port, self.isn.isn(key, now), seq, mss, ws, win, now, SYN_RCVD, lport)
        else:
            if self.tls is not None and key[-2:] != self._port_b:
                cls = self._tls_conn if cls is Conn else self._tls_conn6    # HTTPS (tls.py)
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
        return c

    def _syn(self, b: bytes, end: int, now: float) -> None:
        """A plain SYN to our port (the connection-per-request hot path): the same
        steps as _tcp_in's passive open, from the raw header, without parsed
        segment objects; under pressure a cookie instead (_cookie_synack)."""
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
            elif hl == 24 and b[54] == 2 and b[55] == 4:
                mss = (b[56] << 8) | b[57]                  # MSS alone (many stacks, and floods)
                ws = None
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
        if self.n_synrcvd >= self.cfg.syn_backlog or now < self._pressure_until:
            if self.cfg.syncookies == "never":
                cnt["drop_tcp_syn_backlog_full"] += 1
            else:
                self._cookie_synack(b[6:12], src_ip, (b[34] << 8) | b[35], key, seq, mss, now)
            return
        self._open(key, b[6:12], src_ip, (b[34] << 8) | b[35], seq, mss, ws, (b[48] << 8) | b[49], now)

    def _cookie_synack(self, mac, ip, port, key, seq, peer_mss, now, dport=None) -> None:
        """Answer a SYN with a SYN cookie (isn.py) and keep no state: one packed
        frame. While the backlog is full (a flood) this is every SYN's cost, so
        it is built flat rather than through the segment objects, and both sums
        are added up from the fields (RFC 1071: a 32-bit value read as one
        integer is congruent mod 0xFFFF to the sum of its two 16-bit words)
        instead of summing the packed bytes. A full backlog puts the stack
        under pressure for _PRESSURE_S: every SYN gets a cookie and half-open
        connections get fewer retries (synack_retries)."""
        cfg = self.cfg
        our = cfg.mtu - 40
        cookie = self.isn.cookie(key, seq, min(peer_mss or 536, our), now)
        self._cookies_until = now + 130.0               # a cookie is valid for 64-128 s
        if self.n_synrcvd >= cfg.syn_backlog and cfg.syncookies == "auto":
            self._pressure_until = now + _PRESSURE_S
        ipb = self.ipb
        addrs = int.from_bytes(ipb, "big") + int.from_bytes(ip, "big")
        dport = dport or cfg.port
        ack = (seq + 1) & MASK
        wnd = cfg.rcv_wnd
        # IPv4: 0x4500, length 44, id 0, DF, TTL 64 / TCP; TCP: pseudo header (protocol,
        # length 24), ports, cookie, ack, offset 6 + SYN|ACK, window, MSS option
        ip_sum = (-(0x4500 + 44 + 0x4000 + 0x4006 + addrs)) % 0xFFFF
        tcp_sum = (-(addrs + PROTO_TCP + 24 + dport + port + cookie + ack + 0x6012 + wnd + 0x0204 + our)) % 0xFFFF
        self.txq.append((_COOKIE_SA(mac, self.mac, ETH_IPV4, 0x45, 0, 44, 0, 0x4000, 64, PROTO_TCP, ip_sum, ipb, ip,
                                    dport, port, cookie, ack, 0x60, SYN | ACK, wnd, tcp_sum, 0, 0x02040000 | our),
                         None, None))
        cnt = self.counters
        cnt["tcp_out_segments"] += 1
        cnt["tcp_syncookies_sent"] += 1

    def under_pressure(self, now: float) -> bool:
        """A SYN flood: the backlog overflowed in the last _PRESSURE_S (or cookies "always")."""
        return now < self._pressure_until

    def synack_retries(self, now: float) -> int:
        """SYN-ACK retransmissions a half-open connection gets before it is
        forgotten: fewer while under pressure (the backlog overflowed in the last
        _PRESSURE_S), so that a flood's half-open entries are retired within
        seconds, not after the ~63 s of syn_retries (Linux too gives the entries
        of a crowded SYN queue fewer retries: inet_csk_reqsk_queue_prune)."""
        cfg = self.cfg
        if now < self._pressure_until:
            return min(cfg.syn_retries, cfg.syn_retries_pressure)
        return cfg.syn_retries

    def _tw_segment(self, key, tw, seg, src_mac, src_ip, now, ours=None) -> bool:
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
        self._emit_tcp(src_mac, src_ip, seg.dport, seg.sport, snd_nxt, rcv_nxt, ACK, src=ours)
        return True

    def _reset_for(self, src_mac, src_ip, seg, ours=None) -> None:
        """RFC 9293 §3.10.7.1: a RST answering a segment that has no connection."""
        if seg.flags & ACK:
            self._emit_tcp(src_mac, src_ip, seg.dport, seg.sport, seg.ack, 0, RST, src=ours)
        else:
            self._emit_tcp(src_mac, src_ip, seg.dport, seg.sport, 0, (seg.seq + seg.seg_len) & MASK, RST | ACK,
                           src=ours)
        self.counters["tcp_rst_sent"] += 1

    def _emit_tcp(self, dmac, dst, sport, dport, seq, ack, flags, options=Options(), window=None, src=None) -> None:
        """One segment without a connection; `src`: our IPv6 address (None: IPv4)."""
        win = self.cfg.rcv_wnd if window is None else window
        tcp = TcpSegment(sport, dport, seq, ack, flags, win if not flags & RST else 0, options).emit(
            self.ipb if src is None else src, dst)
        if src is None:
            ip = IPv4Header(self.ipb, bytes(dst), PROTO_TCP, tcp).emit()
            self.txq.append((EthernetFrame(bytes(dmac), self.mac, ETH_IPV4).emit() + ip, None, None))
        else:
            ip = _IP6.pack(0x60000000, len(tcp), PROTO_TCP, 64, bytes(src), bytes(dst)) + tcp
            self.txq.append((EthernetFrame(bytes(dmac), self.mac, 0x86DD).emit() + ip, None, None))
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
            if len(tmpl) == 74:
                h[18:20] = hl.to_bytes(2, "big")          # IPv6 payload length (no header checksum)
            else:
                _IP_FIXED(h, 16, 20 + hl, 0, 0x4000, 64, PROTO_TCP, (-(ip_const + 20 + hl)) % 0xFFFF)
            if len(self._opts_cache) >= OPTS_CACHE_MAX:
                self._opts_cache.clear()
            v = self._opts_cache[k] = (bytes(h), hl, int.from_bytes(opts, "big"))
        return v

    def established(self, c: Conn, from_syn_rcvd: bool = True) -> None:
        if from_syn_rcvd:
            self.n_synrcvd -= 1
        # the source answered our SYN-ACK, so it is not spoofed: its SYNs pass the flood gate
        k = c.key
        t = self.syn_trusted
        if len(t) >= TRUSTED_MAX:
            t.clear()
        # IPv4: the address; IPv6: its /64 (one network, one entry: a host picks any
        # address in its /64, and a farm of them cannot crowd the table out)
        src = k[:4] if len(k) == 12 else k[:8]
        t.pop(src, None)                            # last in order: the serve loop hands the
        t[src] = None                               # most recent to the SYN ring's filter
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
            if len(self._mss_cache) >= MSS_CACHE_MAX:
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
        if len(peer_ip) != 4:
            return self._template6(k, peer_mac, peer_ip, peer_port, lport)
        p = peer_mac + peer_ip
        pv = self._tmpl_cache.get(p)
        if pv is None:
            t = EthernetFrame(peer_mac, self.mac, ETH_IPV4).emit()
            t += struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0x4000, 64, PROTO_TCP, 0, self.ipb, peer_ip)
            ip_const = int.from_bytes(t[14:34], "big") % 0xFFFF
            pseudo = (int.from_bytes(self.ipb + peer_ip, "big") + PROTO_TCP) % 0xFFFF
            if len(self._tmpl_cache) >= TMPL_CACHE_MAX:
                self._tmpl_cache.clear()
            pv = self._tmpl_cache[p] = (bytes(t), ip_const, pseudo)
        t, ip_const, pseudo = pv
        ports = (lport << 16 if lport else self._port_pre) | peer_port
        t = t + ports.to_bytes(4, "big") + self._tcp_tail
        ctl = bytearray(t)
        _IP_FIXED(ctl, 16, 40, 0, 0x4000, 64, PROTO_TCP, (-(ip_const + 40)) % 0xFFFF)
        if len(self._conn_tmpl) >= CONN_TMPL_MAX:
            self._conn_tmpl.clear()
        v = self._conn_tmpl[k] = (t, ip_const, pseudo, (pseudo + ports) % 0xFFFF, bytes(ctl))
        return v

    def _template6(self, k, peer_mac: bytes, addrs: bytes, peer_port: int, lport: int = 0):
        """template() for IPv6 (Conn6): `addrs` is the peer's address then ours. The
        Ethernet+IPv6+TCP header (74 bytes), ip_const 0 (IPv6 has no header
        checksum), the pseudo-header constant sum(src, dst) + 6 (RFC 8200 §8.1: the
        length is added per segment, as for IPv4), `ctl` with payload length 20."""
        pv = self._tmpl_cache.get(peer_mac + addrs)
        if pv is None:
            peer, ours = addrs[:16], addrs[16:32]
            t = EthernetFrame(peer_mac, self.mac, 0x86DD).emit() + _IP6.pack(0x60000000, 0, PROTO_TCP, 64, ours, peer)
            pseudo = (int.from_bytes(addrs, "big") + PROTO_TCP) % 0xFFFF
            if len(self._tmpl_cache) >= 4096:
                self._tmpl_cache.clear()
            pv = self._tmpl_cache[peer_mac + addrs] = (bytes(t), 0, pseudo)
        t, _, pseudo = pv
        ports = (lport << 16 if lport else self._port_pre) | peer_port
        t = t + ports.to_bytes(4, "big") + self._tcp_tail
        ctl = bytearray(t)
        ctl[18:20] = b"\0\x14"
        if len(self._conn_tmpl) >= 16384:
            self._conn_tmpl.clear()
        v = self._conn_tmpl[k] = (t, 0, pseudo, (pseudo + ports) % 0xFFFF, bytes(ctl))
        return v

    def gso6(self, mss: int):
        """The GSO descriptor of an IPv6 connection's super-frames (TCPV6, 74-byte headers)."""
        g = self._gso6.get(mss)
        if g is None:
            if len(self._gso6) >= 1024:
                self._gso6.clear()
            g = self._gso6[mss] = GSO(54, 16, mss, 74, 4)
        return g

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
            if len(self._hdr_cache) >= HDR_CACHE_MAX:
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
        if self.dhcp is not None:
            d = self.dhcp.poll(now)
            if self.dhcp.out or self.dhcp.events:
                self._dhcp_run(now)
                d = self.dhcp.poll(now)
            if d < nxt:
                nxt = d
        if self.ip6 is not None:
            d = self.ip6.poll(now)
            self._ip6_run()
            if d < nxt:
                nxt = d
        if self.routes.gw and self.ipb:                         # resolve every next hop in use
            gw = self._gw_arp_at
            for g in self.routes.gw:
                if self.arp.lookup(g, now) is None:
                    t = gw.get(g, 0.0)
                    if now >= t:
                        self._resolve_gateway(g, now)
                        t = gw[g]
                    if t < nxt:
                        nxt = t
            if len(gw) > 2 * len(self.routes) + 8:              # bounded: forget old next hops
                gw.clear()
        self._next = nxt
        return nxt
