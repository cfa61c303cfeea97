"""A DHCPv4 client (RFC 2131, options RFC 2132/3442), sans-IO.

Theory of operation. `Dhcp4Client(mac, counters, rng, config)` owns no
socket and reads no clock: the stack calls `start(now)`, `receive(src_mac,
payload, now)` with every UDP payload for port 68 (from port 67), `arp(op,
sha, spa, tpa, now)` with every ARP packet while an address is probed, and
`poll(now)`, which returns the next deadline. What the client wants sent is
appended to `out` as `("udp", dst_mac, src_ip, dst_ip, payload)` or
`("arp_probe", address)`; what happened to the address is appended to
`events` as Event(kind, lease, old) with kind one of
  acquired   a lease is bound (after the ARP probe found no conflict)
  renewed    the same address, a fresh lease (T1 renewal or T2 rebinding)
  changed    renewal/rebinding gave another address (`old` is the old lease)
  lost       the lease expired or a server NAKed it: stop using the address
  declined   the probe found another host on the offered address (DHCPDECLINE sent)
  no_answer  no server answered three DISCOVERs (said once until a lease is bound)
The stack applies them (address, routes, MTU) and forgets them.

States (RFC 2131 §4.4, figure 5): INIT -> SELECTING (DISCOVER, the first
valid OFFER wins) -> REQUESTING (REQUEST naming that server; replies from
other servers are ignored, so a rogue second server cannot break the
exchange) -> PROBING (RFC 5227 §2.1: PROBE_NUM ARP probes from 0.0.0.0, then
ANNOUNCE_WAIT; any ARP from another host using or probing the address is a
conflict: DECLINE and restart after 10 s, RFC 2131 §3.1 step 5) -> BOUND ->
at T1 RENEWING (REQUEST with ciaddr, unicast to the server; only its answer
counts) -> at T2 REBINDING (the same, broadcast; any server may answer) ->
at expiry the address is lost and the client starts over. A NAK in any of
these states restarts at INIT (at once the first time, with backoff if NAKs
repeat).

Timers. Retransmission in SELECTING/REQUESTING follows §4.1: 4 s, 8, 16, 32,
64 (the cap) each randomized by +-1 s; DISCOVER is retried forever, a
REQUEST four times before starting over. RENEWING and REBINDING retransmit
after half the time left until T2 (or expiry), at least 60 s (§4.4.5).
Lease times count from when the first REQUEST of the exchange was sent
(§4.4.1). T1/T2 default to 0.5 and 0.875 of the lease; a value that breaks
0 < T1 < T2 < lease is replaced by its default. The client skips
§4.4.1's 1-10 s initial random wait: an appliance booting is the one
client on its link that must be quick, and the backoff still spreads
retransmissions.

Options used: 1 subnet mask, 3 routers, 121 classless static routes (RFC
3442: when present the router option is ignored), 26 interface MTU, 51
lease time, 58/59 T1/T2, 54 server identifier; sent: 53, 61 (client
identifier: type 1 + MAC), 12 (host name, if configured), 50, 54, 55.
Options repeated in a message are concatenated (RFC 3396); option overload
(52) is honoured. A reply that is not a well-formed BOOTREPLY for our
transaction and MAC is counted `drop_dhcp_<reason>` and ignored.
"""
import random
import struct
from typing import NamedTuple

from .wire import Malformed

__all__ = ["Dhcp4Client", "DhcpConfig", "Lease", "Event", "parse_message", "classless_routes",
           "DISCOVER", "OFFER", "REQUEST", "DECLINE", "ACK", "NAK", "CLIENT_PORT", "SERVER_PORT"]

CLIENT_PORT, SERVER_PORT = 68, 67
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE = 1, 2, 3, 4, 5, 6, 7
MAGIC = b"\x63\x82\x53\x63"
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")     # 236 bytes, then the magic cookie
ZERO = b"\0\0\0\0"
BCAST = b"\xff\xff\xff\xff"
BCAST_MAC = b"\xff" * 6
INFINITE = 0xFFFFFFFF
PARAMS = bytes([1, 3, 26, 51, 54, 58, 59, 121])

INIT, SELECTING, REQUESTING, PROBING, BOUND, RENEWING, REBINDING = (
    "init", "selecting", "requesting", "probing", "bound", "renewing", "rebinding")


class DhcpConfig(NamedTuple):
    hostname: str | None = None     # sent as option 12
    probe: bool = True              # RFC 5227 probe of the offered address
    probe_wait: float = 1.0         # RFC 5227 §1.1 PROBE_WAIT, PROBE_NUM, PROBE_MIN/MAX, ANNOUNCE_WAIT
    probe_num: int = 3
    probe_min: float = 1.0
    probe_max: float = 2.0
    announce_wait: float = 2.0
    decline_wait: float = 10.0      # RFC 2131 §3.1 step 5
    request_tries: int = 4          # REQUESTs in REQUESTING before starting over
    quiet_after: int = 3            # DISCOVERs without an answer before the no_answer event


class Lease(NamedTuple):
    address: bytes
    prefix: int
    server: bytes                   # option 54
    server_mac: bytes               # where its ACK came from (the server or the relay): renewals go there
    routers: tuple = ()             # option 3, in order
    routes: tuple = ()              # option 121: (network bytes, prefix, gateway bytes; 0.0.0.0 = on-link)
    mtu: int | None = None          # option 26
    lease_time: int = 0             # option 51 (INFINITE: never expires)
    t1: float = 0.0                 # absolute times (the stack's clock)
    t2: float = 0.0
    expires: float = 0.0

    def cidr(self) -> str:
        return ".".join(map(str, self.address)) + f"/{self.prefix}"


class Event(NamedTuple):
    kind: str
    lease: Lease | None = None
    old: Lease | None = None


class Message(NamedTuple):
    op: int
    xid: int
    ciaddr: bytes
    yiaddr: bytes
    chaddr: bytes
    options: dict                   # code -> bytes (concatenated, RFC 3396)

    @property
    def type(self):
        v = self.options.get(53)
        return v[0] if v and len(v) == 1 else None


def _options(buf, out: dict) -> int | None:
    """Parse an options area into `out`; returns the overload value (option 52)."""
    i, n = 0, len(buf)
    while i < n:
        c = buf[i]
        if c == 255:
            return out.get(52, b"\0")[0] if out.get(52) else None
        if c == 0:
            i += 1
            continue
        if i + 1 >= n or i + 2 + buf[i + 1] > n:
            raise Malformed("dhcp_bad_options", f"option {c} runs past the end")
        ln = buf[i + 1]
        out[c] = out.get(c, b"") + bytes(buf[i + 2:i + 2 + ln])
        i += 2 + ln
    raise Malformed("dhcp_bad_options", "no end option")


def parse_message(buf) -> Message:
    """A BOOTP/DHCP message (either direction), checked; raises Malformed."""
    if len(buf) < 240:
        raise Malformed("dhcp_short", f"{len(buf)} bytes")
    op, htype, hlen, _, xid, _, _, ci, yi, _, _, ch, sname, file = _BOOTP.unpack_from(buf)
    if htype != 1 or hlen != 6:
        raise Malformed("dhcp_bad_htype", f"htype={htype} hlen={hlen}")
    if buf[236:240] != MAGIC:
        raise Malformed("dhcp_bad_cookie")
    opts = {}
    ov = _options(buf[240:], opts)
    if ov in (1, 3):
        _options(file, opts)
    if ov in (2, 3):
        _options(sname, opts)
    m = Message(op, xid, ci, yi, ch[:6], opts)
    if m.type is None:
        raise Malformed("dhcp_no_type")
    return m


def classless_routes(v: bytes) -> tuple:
    """RFC 3442 option 121: ((network, prefix, gateway), ...); raises Malformed."""
    out, i = [], 0
    while i < len(v):
        w = v[i]
        k = (w + 7) // 8
        if w > 32 or i + 1 + k + 4 > len(v):
            raise Malformed("dhcp_bad_classless_routes", f"width {w} at {i}")
        net = bytes(v[i + 1:i + 1 + k]) + bytes(4 - k)
        mask = (0xFFFFFFFF << (32 - w)) & 0xFFFFFFFF
        if int.from_bytes(net, "big") & ~mask & 0xFFFFFFFF:
            raise Malformed("dhcp_bad_classless_routes", "bits set beyond the prefix")
        out.append((net, w, bytes(v[i + 1 + k:i + 5 + k])))
        i += 5 + k
    return tuple(out)


def _u32(opts, code, reason):
    v = opts.get(code)
    if v is None:
        return None
    if len(v) != 4:
        raise Malformed(reason, f"option {code}: {len(v)} bytes")
    return int.from_bytes(v, "big")


def _prefix(mask: bytes) -> int:
    inv = ~int.from_bytes(mask, "big") & 0xFFFFFFFF
    if inv & (inv + 1) or inv == 0xFFFFFFFF:                     # not contiguous, or /0
        raise Malformed("dhcp_bad_mask", ".".join(map(str, mask)))
    return 32 - inv.bit_length()


def _unusable(a: bytes) -> bool:
    v = int.from_bytes(a, "big")
    return v == 0 or v >= 0xE0000000 or v >> 24 in (0, 127)


class Dhcp4Client:
    def __init__(self, mac: bytes, counters, rng: random.Random = None, config: DhcpConfig = DhcpConfig()):
        self.mac = bytes(mac)
        self.counters = counters
        self.rng = rng or random.SystemRandom()
        self.cfg = config
        self.out = []
        self.events = []
        self.state = INIT
        self.lease = None               # the bound lease (BOUND, RENEWING, REBINDING)
        self._offer = None              # REQUESTING/PROBING: (server id, address, server mac)
        self._pending = None            # PROBING: the acknowledged Lease
        self._xid = 0
        self._began = 0.0               # this acquisition's start (the secs field)
        self._req_at = 0.0              # first REQUEST of the exchange (lease times count from it)
        self._tries = 0
        self._naks = 0
        self._silent = False            # no_answer said (until a lease is bound)
        self._t = float("inf")          # the next deadline

    # ----------------------------------------------------------------- API

    def start(self, now: float, delay: float = 0.0) -> None:
        """Start over at INIT (a new transaction) after `delay` seconds."""
        self.state = INIT
        self._offer = self._pending = None
        self._t = now + delay

    def poll(self, now: float) -> float:
        if now >= self._t:
            self._timer(now)
        return self._t

    def receive(self, src_mac: bytes, payload, now: float) -> None:
        cnt = self.counters
        try:
            m = parse_message(payload)
            if m.op != 2:
                raise Malformed("dhcp_not_reply")
            if m.xid != self._xid or self.state in (INIT, BOUND, PROBING):
                raise Malformed("dhcp_wrong_xid")
            if m.chaddr != self.mac:
                raise Malformed("dhcp_not_our_mac")
            sid = m.options.get(54)
            if sid is None or len(sid) != 4:
                raise Malformed("dhcp_no_server_id")
            t = m.type
            if t == OFFER:
                self._on_offer(m, sid, src_mac, now)
            elif t in (ACK, NAK):
                if self.state == SELECTING:
                    raise Malformed("dhcp_unexpected_" + ("ack" if t == ACK else "nak"))
                if self.state == REQUESTING and sid != self._offer[0] or \
                        self.state == RENEWING and sid != self.lease.server:
                    raise Malformed("dhcp_wrong_server")        # e.g. a rogue second server
                if t == ACK:
                    self._on_ack(m, sid, src_mac, now)
                else:
                    self._on_nak(now)
            else:
                raise Malformed("dhcp_unexpected_type", str(t))
        except Malformed as e:
            cnt["drop_" + e.reason] += 1

    def arp(self, op: int, sha: bytes, spa: bytes, tpa: bytes, now: float) -> None:
        """An ARP packet seen on the link: a conflict while probing (RFC 5227 §2.1.1)."""
        if self.state != PROBING or sha == self.mac:
            return
        a = self._pending.address
        if spa == a or (spa == ZERO and tpa == a and op == 1):
            self.counters["dhcp_address_conflicts"] += 1
            self._send(DECLINE, BCAST_MAC, ZERO, BCAST, now, requested=a, server=self._pending.server)
            self.counters["dhcp_declines_sent"] += 1
            self.events.append(Event("declined", self._pending))
            self.start(now, self.cfg.decline_wait)

    # ------------------------------------------------------------ messages

    def _on_offer(self, m, sid, src_mac, now):
        if self.state != SELECTING:
            raise Malformed("dhcp_offer_ignored")                # we chose already (a second server)
        if _unusable(m.yiaddr):
            raise Malformed("dhcp_bad_address", ".".join(map(str, m.yiaddr)))
        self.counters["dhcp_offers"] += 1
        self._offer = (sid, bytes(m.yiaddr), bytes(src_mac))
        self.state = REQUESTING
        self._tries = 0
        self._req_at = now
        self._request(now)

    def _lease(self, m, sid, src_mac) -> Lease:
        o = m.options
        lt = _u32(o, 51, "dhcp_bad_lease_time")
        if lt is None:
            raise Malformed("dhcp_no_lease_time")
        a = bytes(m.yiaddr)
        if _unusable(a):
            raise Malformed("dhcp_bad_address", ".".join(map(str, a)))
        if 1 in o:
            if len(o[1]) != 4:
                raise Malformed("dhcp_bad_mask", f"{len(o[1])} bytes")
            prefix = _prefix(o[1])
        else:                                                   # classful, as BOOTP did
            prefix = 8 if a[0] < 128 else 16 if a[0] < 192 else 24
        routers = ()
        if 3 in o:
            r = o[3]
            if not r or len(r) % 4:
                raise Malformed("dhcp_bad_routers", f"{len(r)} bytes")
            routers = tuple(bytes(r[i:i + 4]) for i in range(0, len(r), 4))
        routes = classless_routes(o[121]) if 121 in o else ()
        mtu = None
        if 26 in o:
            if len(o[26]) != 2:
                raise Malformed("dhcp_bad_mtu", f"{len(o[26])} bytes")
            mtu = int.from_bytes(o[26], "big")
            if mtu < 68:                                        # RFC 2132 §5.1: minimum 68
                raise Malformed("dhcp_bad_mtu", str(mtu))
        t1 = _u32(o, 58, "dhcp_bad_t1")
        t2 = _u32(o, 59, "dhcp_bad_t2")
        base = self._req_at
        if lt == INFINITE:
            return Lease(a, prefix, bytes(sid), bytes(src_mac), routers, routes, mtu, lt,
                         float("inf"), float("inf"), float("inf"))
        if t1 is None or t2 is None or not 0 < t1 < t2 < lt:
            if t2 is None or not 0 < t2 < lt:
                t2 = lt * 0.875
            if t1 is None or not 0 < t1 < t2:
                t1 = lt * 0.5 if lt * 0.5 < t2 else t2 * 0.5
        return Lease(a, prefix, bytes(sid), bytes(src_mac), routers, routes, mtu, lt,
                     base + t1, base + t2, base + lt)

    def _on_ack(self, m, sid, src_mac, now):
        lease = self._lease(m, sid, src_mac)
        self.counters["dhcp_acks"] += 1
        self._naks = 0
        if self.state == REQUESTING:
            if self.cfg.probe:
                self._pending = lease
                self.state = PROBING
                self._tries = 0
                self._t = now + self.rng.uniform(0, self.cfg.probe_wait)
            else:
                self._bind(lease, now)
            return
        old = self.lease                                        # RENEWING / REBINDING
        self.lease = lease
        self.state = BOUND
        self._t = lease.t1
        self.events.append(Event("renewed" if old.address == lease.address and old.prefix == lease.prefix
                                 else "changed", lease, old))

    def _bind(self, lease, now):
        self.lease = lease
        self._pending = None
        self.state = BOUND
        self._silent = False
        self._t = lease.t1
        self.counters["dhcp_leases_bound"] += 1
        self.events.append(Event("acquired", lease))

    def _on_nak(self, now):
        self.counters["dhcp_naks"] += 1
        self._lose("nak")
        delay = 0.0 if self._naks == 0 else min(4.0 * 2 ** (self._naks - 1), 64.0)
        self._naks += 1
        self.start(now, delay)

    def _lose(self, why):
        if self.lease is not None:
            self.counters["dhcp_leases_lost_" + why] += 1
            self.events.append(Event("lost", self.lease))
            self.lease = None

    # -------------------------------------------------------------- timers

    def _backoff(self) -> float:
        return min(4.0 * 2 ** self._tries, 64.0) + self.rng.uniform(-1.0, 1.0)

    def _timer(self, now):
        s = self.state
        if s == INIT:
            self._xid = self.rng.getrandbits(32)
            self._began = now
            self._tries = 0
            self.state = SELECTING
            self._discover(now)
        elif s == SELECTING:
            self._tries += 1
            if self._tries >= self.cfg.quiet_after and not self._silent:
                self._silent = True
                self.events.append(Event("no_answer"))
            self._discover(now)
        elif s == REQUESTING:
            self._tries += 1
            if self._tries >= self.cfg.request_tries:
                self.counters["dhcp_request_timeouts"] += 1
                self.start(now)
                self._timer(now)
            else:
                self._request(now)
        elif s == PROBING:
            c = self.cfg
            if self._tries < c.probe_num:
                self._tries += 1
                self.out.append(("arp_probe", self._pending.address))
                self.counters["dhcp_arp_probes"] += 1
                self._t = now + (self.rng.uniform(c.probe_min, c.probe_max) if self._tries < c.probe_num
                                 else c.announce_wait)
            else:
                self._bind(self._pending, now)
        elif s in (BOUND, RENEWING, REBINDING):
            L = self.lease
            if now >= L.expires:
                self.counters["dhcp_expired"] += 1
                self._lose("expired")
                self.start(now)
                self._timer(now)
                return
            if now >= L.t2:
                if s != REBINDING:
                    self.state = REBINDING
                    self._xid = self.rng.getrandbits(32)
                    self._req_at = self._began = now
                    self.counters["dhcp_rebinds"] += 1
                self._renew(BCAST_MAC, BCAST, now, L.expires)
            else:
                if s == BOUND:
                    self.state = RENEWING
                    self._xid = self.rng.getrandbits(32)
                    self._req_at = self._began = now
                    self.counters["dhcp_renewals"] += 1
                self._renew(L.server_mac, L.server, now, L.t2)

    def _renew(self, dmac, dst, now, until):
        left = until - now
        self._send(REQUEST, dmac, self.lease.address, dst, now, ciaddr=self.lease.address)
        self.counters["dhcp_requests_sent"] += 1
        self._t = min(now + max(min(60.0, left), left / 2), until)

    def _discover(self, now):
        self._send(DISCOVER, BCAST_MAC, ZERO, BCAST, now)
        self.counters["dhcp_discovers_sent"] += 1
        self._t = now + self._backoff()

    def _request(self, now):
        sid, addr, _ = self._offer
        self._send(REQUEST, BCAST_MAC, ZERO, BCAST, now, requested=addr, server=sid)
        self.counters["dhcp_requests_sent"] += 1
        self._t = now + self._backoff()

    def _send(self, mtype, dmac, src, dst, now, ciaddr=ZERO, requested=None, server=None):
        secs = min(int(now - self._began), 0xFFFF) if now > self._began else 0
        m = bytearray(_BOOTP.pack(1, 1, 6, 0, self._xid, secs, 0, ciaddr, ZERO, ZERO, ZERO,
                                  self.mac + bytes(10), bytes(64), bytes(128)))
        m += MAGIC
        m += bytes([53, 1, mtype, 61, 7, 1]) + self.mac
        if requested is not None:
            m += bytes([50, 4]) + requested
        if server is not None:
            m += bytes([54, 4]) + server
        if mtype != DECLINE:
            if self.cfg.hostname:
                h = self.cfg.hostname.encode()[:63]
                m += bytes([12, len(h)]) + h
            m += bytes([55, len(PARAMS)]) + PARAMS
        m.append(255)
        if len(m) < 300:                    # the BOOTP minimum some relays insist on (RFC 1542 §2.1)
            m += bytes(300 - len(m))
        self.out.append(("udp", dmac, src, dst, bytes(m)))
