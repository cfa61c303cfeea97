"""A DHCPv6 client for one address (RFC 8415, IA_NA), sans-IO.

Theory of operation. `Dhcp6Client(mac, counters, rng, config)` owns no
socket and reads no clock. ipv6.py starts it when a router advertisement
says M=1 (and our link-local address is preferred), hands it every UDP
payload for port 546 (`receive(payload, now)`) and calls `poll(now)`, which
returns the next deadline. Messages to send are appended to `out` as
payloads; ipv6.py sends each from our link-local address, port 546, to
All_DHCP_Relay_Agents_and_Servers (ff02::1:2) port 547 -- we never use a
server's Server Unicast option, so every message is multicast (§18.2). What
happened to the address is appended to `events` as Event(kind, address,
valid, preferred) (absolute times), kind one of
  bound      a Reply gave an address: ipv6.py runs DAD on it, then uses it
  renewed    a Renew/Rebind Reply extended it (the address may be the same only)
  lost       valid lifetime over, or the server took it back (lifetime 0)
`declined(address, now)` is ipv6.py's answer when DAD found a duplicate:
a Decline goes out (§18.2.8) and the client starts over.

States (§18.2): SOLICIT (with Rapid Commit if `rapid_commit`: a Reply with
Rapid Commit binds at once, §18.2.1) collects Advertises until the first
retransmission time is over, then takes the one with the highest Preference
(255 is taken at once, §18.2.9); later the first usable Advertise wins. An
Advertise without an address (NoAddrsAvail, §18.2.9) is ignored. REQUEST
to the chosen server; other servers' messages are ignored from then on (a
rogue server cannot take over the exchange). BOUND -> at T1 RENEW (to that
server, REN_TIMEOUT 10 s) -> at T2 REBIND (no Server Identifier, any server,
REB_TIMEOUT 10 s) -> at the end of the valid lifetime `lost` and SOLICIT
again. T1/T2 of 0 mean ours: 0.5 and 0.8 of the preferred lifetime (§14.2,
§21.4); T1 > T2 discards the IA (§21.4). A Reply to a Request with
NoAddrsAvail or NotOnLink starts over with a Solicit; NoBinding to a
Renew/Rebind sends a Request (§18.2.10.1); UnspecFail and UseMulticast
(we multicast anyway) leave the retransmission running.

Timers (§15, §7.6): the first RT is IRT*(1+RAND), later RT = 2*RT*(1+RAND)
capped at MRT*(1+RAND), RAND uniform in -0.1..0.1 (0..0.1 for the first
Solicit, which must not come before IRT); Solicit: IRT 1 s, MRT 3600 s (or
a server's SOL_MAX_RT option, 60..86400), tried forever, the first one
after a random 0..SOL_MAX_DELAY 1 s; Request: IRT 1 s, MRT 30 s, MRC 10,
then Solicit; Renew until T2, Rebind until the valid lifetime; Decline: IRT
1 s, MRC 4. Every message has a fresh transaction id (kept across its
retransmissions) and an Elapsed Time option (hundredths of a second since
the first transmission of the exchange, §21.9).

Identity: DUID-LL (§11.4: type 3, hardware type 1, the MAC) and IAID = the
last four bytes of the MAC (stable across reboots). Input: a message for
another transaction, type, client DUID, or (after we chose) server, and a
malformed one (options running past their end, an IA or address option too
short, a missing Server Identifier) is counted `drop_dhcp6_<reason>` and
ignored. State is a fixed set of fields: one chosen server, one address.
"""
import random
import struct
from typing import NamedTuple

from .wire import Malformed

__all__ = ["Dhcp6Client", "Dhcp6Config", "Event", "parse", "CLIENT_PORT", "SERVER_PORT", "ALL_SERVERS",
           "SOLICIT", "ADVERTISE", "REQUEST", "RENEW", "REBIND", "REPLY", "DECLINE"]

CLIENT_PORT, SERVER_PORT = 546, 547
ALL_SERVERS = bytes.fromhex("ff020000000000000000000000010002")
SOLICIT, ADVERTISE, REQUEST, RENEW, REBIND, REPLY, DECLINE = 1, 2, 3, 5, 6, 7, 9
O_CLIENTID, O_SERVERID, O_IA_NA, O_IAADDR, O_ORO, O_PREF, O_ELAPSED, O_STATUS, O_RAPID = 1, 2, 3, 5, 6, 7, 8, 13, 14
O_SOL_MAX_RT = 82
SUCCESS, UNSPEC_FAIL, NO_ADDRS, NO_BINDING, NOT_ON_LINK, USE_MULTICAST = 0, 1, 2, 3, 4, 5
INF = 0xFFFFFFFF

IDLE, SOLICITING, REQUESTING, BOUND, RENEWING, REBINDING, DECLINING = (
    "idle", "soliciting", "requesting", "bound", "renewing", "rebinding", "declining")


class Dhcp6Config(NamedTuple):
    rapid_commit: bool = True
    sol_max_delay: float = 1.0      # §7.6 SOL_MAX_DELAY
    sol_timeout: float = 1.0        # SOL_TIMEOUT
    sol_max_rt: float = 3600.0      # SOL_MAX_RT
    req_timeout: float = 1.0        # REQ_TIMEOUT, REQ_MAX_RT, REQ_MAX_RC
    req_max_rt: float = 30.0
    req_max_rc: int = 10
    ren_timeout: float = 10.0       # REN_TIMEOUT, REN_MAX_RT (REB_* are the same values)
    ren_max_rt: float = 600.0
    dec_timeout: float = 1.0        # DEC_TIMEOUT, DEC_MAX_RC
    dec_max_rc: int = 4


class Event(NamedTuple):
    kind: str
    address: bytes
    valid: float = 0.0
    preferred: float = 0.0


def _opts(buf, reason="dhcp6_bad_option") -> list:
    out, i, n = [], 0, len(buf)
    while i < n:
        if i + 4 > n:
            raise Malformed(reason, f"option header at {i} of {n}")
        code, ln = struct.unpack_from("!HH", buf, i)
        if i + 4 + ln > n:
            raise Malformed(reason, f"option {code} runs past the end")
        out.append((code, bytes(buf[i + 4:i + 4 + ln])))
        i += 4 + ln
    return out


def _status(v) -> int:
    if len(v) < 2:
        raise Malformed("dhcp6_bad_status")
    return int.from_bytes(v[:2], "big")


class Message(NamedTuple):
    type: int
    xid: int
    opts: dict                      # code -> first value (the ones we read appear once, §21)
    status: int                     # top-level Status Code (Success when absent, §21.13)
    ia: tuple | None                # (t1, t2, status, ((address, preferred, valid), ...)) of our IAID


def parse(buf, iaid: bytes = None) -> Message:
    """A server message (ADVERTISE/REPLY), checked; raises Malformed."""
    if len(buf) < 4:
        raise Malformed("dhcp6_short", f"{len(buf)} bytes")
    opts = {}
    for c, v in _opts(buf[4:]):
        opts.setdefault(c, v)
        if c == O_IA_NA and iaid is not None and v[:4] == iaid:
            opts[c] = v                                   # the IA_NA for our IAID, not another client's
    st = _status(opts[O_STATUS]) if O_STATUS in opts else SUCCESS
    ia = None
    v = opts.get(O_IA_NA)
    if v is not None:
        if len(v) < 12:
            raise Malformed("dhcp6_bad_ia_na", f"{len(v)} bytes")
        t1, t2 = struct.unpack_from("!II", v, 4)
        ist, addrs = SUCCESS, []
        for c, w in _opts(v[12:]):
            if c == O_STATUS:
                ist = _status(w)
            elif c == O_IAADDR:
                if len(w) < 24:
                    raise Malformed("dhcp6_bad_iaaddr", f"{len(w)} bytes")
                a, pref, valid = struct.unpack_from("!16sII", w)
                if pref <= valid and a[0] != 0xFF and a != bytes(16):     # §21.6: else discard the address
                    addrs.append((a, pref, valid))
        ia = (t1, t2, ist, tuple(addrs[:4]))
    return Message(buf[0], int.from_bytes(buf[1:4], "big"), opts, st, ia)


def _opt(code, v=b"") -> bytes:
    return struct.pack("!HH", code, len(v)) + v


class Dhcp6Client:
    def __init__(self, mac: bytes, counters, rng: random.Random = None, config: Dhcp6Config = Dhcp6Config()):
        self.mac = bytes(mac)
        self.counters = counters
        self.rng = rng or random.SystemRandom()
        self.cfg = config
        self.duid = b"\x00\x03\x00\x01" + self.mac              # DUID-LL, §11.4
        self.iaid = self.mac[2:6]
        self.out = []
        self.events = []
        self.state = IDLE
        self.address = None                 # bound: (address, valid, preferred) absolute
        self.server = None                  # the chosen server's DUID
        self.t1 = self.t2 = 0.0
        self._sol_max_rt = config.sol_max_rt
        self._xid = 0
        self._t = float("inf")              # next transmission
        self._rt = self._irt = 0.0
        self._rc = 0
        self._first = 0.0                   # first transmission of the exchange (Elapsed Time)
        self._mrd = float("inf")            # the exchange's end (T2 for Renew, expiry for Rebind)
        self._collect_until = 0.0           # Solicit: Advertises are compared until then
        self._best = None                   # (preference, server DUID, message)
        self._req_ia = b""

    # ---------------------------------------------------------------- API

    def start(self, now: float) -> None:
        if self.state == IDLE:
            self._solicit(now, self.rng.uniform(0, self.cfg.sol_max_delay))

    def declined(self, address: bytes, now: float) -> None:
        """DAD found the leased address in use: Decline it and start over (§18.2.8)."""
        if self.address is None or self.address[0] != address:
            return
        self.counters["dhcp6_declined"] += 1
        self._req_ia = self._ia([(address, 0, 0)])
        self.address = None
        self._begin(DECLINING, now, self.cfg.dec_timeout)

    def poll(self, now: float) -> float:
        if self.address is not None:
            a, valid, pref = self.address
            if now >= valid:
                self._lose(now)
            elif self.state == BOUND and now >= self.t1:
                self._begin(RENEWING, now, self.cfg.ren_timeout, mrd=self.t2)
            elif self.state == RENEWING and now >= self.t2:
                self._begin(REBINDING, now, self.cfg.ren_timeout, mrd=valid)
        if self.state == SOLICITING and self._best is not None and now >= self._collect_until:
            self._choose(now)
        if now >= self._t:
            self._retransmit(now)
        nxt = self._t
        if self.state == SOLICITING and self._best is not None:
            nxt = min(nxt, self._collect_until)
        if self.address is not None:
            nxt = min(nxt, self.address[1])
            if self.state == BOUND:
                nxt = min(nxt, self.t1)
            elif self.state == RENEWING:
                nxt = min(nxt, self.t2)
        return nxt

    def receive(self, payload, now: float) -> None:
        """A UDP payload from port 547 to port 546; raises Malformed to drop it."""
        m = parse(payload, self.iaid)
        if m.type not in (ADVERTISE, REPLY):
            raise Malformed("dhcp6_bad_type", str(m.type))
        if self.state in (IDLE, BOUND) or m.xid != self._xid:
            raise Malformed("dhcp6_bad_xid", f"{m.xid:06x}")
        if m.opts.get(O_CLIENTID) != self.duid:
            raise Malformed("dhcp6_bad_client_id")
        sid = m.opts.get(O_SERVERID)
        if not sid or len(sid) > 130:
            raise Malformed("dhcp6_no_server_id")
        if O_SOL_MAX_RT in m.opts and len(m.opts[O_SOL_MAX_RT]) == 4:
            v = int.from_bytes(m.opts[O_SOL_MAX_RT], "big")
            if 60 <= v <= 86400:                                       # §21.24: else ignore it
                self._sol_max_rt = float(v)
        if self.state == SOLICITING:
            if m.type == ADVERTISE:
                self._advertise(m, sid, now)
            elif O_RAPID in m.opts and self.cfg.rapid_commit:
                self._reply(m, sid, now)
            else:
                raise Malformed("dhcp6_unexpected_reply")
            return
        if m.type != REPLY:
            raise Malformed("dhcp6_late_advertise")                 # we chose already
        if self.state in (REQUESTING, RENEWING, DECLINING) and sid != self.server:
            raise Malformed("dhcp6_other_server")
        if self.state == DECLINING:
            self.counters["dhcp6_decline_replies"] += 1
            self._solicit(now, 0.0)
            return
        self._reply(m, sid, now)

    # ------------------------------------------------------------ input

    def _advertise(self, m, sid, now):
        if m.status == NO_ADDRS or m.ia is None or m.ia[2] != SUCCESS or not m.ia[3]:
            self.counters["dhcp6_advertise_no_addrs"] += 1          # §18.2.9: ignored
            return
        pref = m.opts.get(O_PREF, b"\0")[:1] or b"\0"
        pref = pref[0]
        self.counters["dhcp6_advertises"] += 1
        if self._best is None or pref > self._best[0]:
            self._best = (pref, sid, m)
        if pref == 255 or now >= self._collect_until:
            self._choose(now)

    def _choose(self, now):
        _, sid, m = self._best
        self._best = None
        self.server = sid
        self._req_ia = self._ia([(a, 0, 0) for a, _, _ in m.ia[3]])
        self._begin(REQUESTING, now, self.cfg.req_timeout)

    def _reply(self, m, sid, now):
        if m.status == NOT_ON_LINK or (m.ia is not None and m.ia[2] in (NO_ADDRS, NOT_ON_LINK)):
            self.counters["dhcp6_status_" + ("no_addrs" if m.ia and m.ia[2] == NO_ADDRS else "not_on_link")] += 1
            if self.state in (SOLICITING, REQUESTING):
                self._solicit(now, self._backoff_delay())
            return
        if m.ia is not None and m.ia[2] == NO_BINDING and self.state in (RENEWING, REBINDING):
            self.counters["dhcp6_status_no_binding"] += 1
            self.server = sid
            self._req_ia = self._ia([(self.address[0], 0, 0)])
            self._begin(REQUESTING, now, self.cfg.req_timeout)
            return
        if m.status != SUCCESS:                                      # UnspecFail, UseMulticast, ...
            raise Malformed("dhcp6_status", str(m.status))          # retransmission continues
        if m.ia is None:
            raise Malformed("dhcp6_no_ia_na")
        t1, t2, _, addrs = m.ia
        if t1 and t2 and t1 > t2:
            raise Malformed("dhcp6_bad_t1_t2", f"T1 {t1} > T2 {t2}")    # §21.4: discard the IA
        mine = self.address[0] if self.address else None
        keep = next((x for x in addrs if x[0] == mine), None) if mine else None
        if mine and keep is None and self.state in (RENEWING, REBINDING):
            raise Malformed("dhcp6_address_not_renewed")            # it keeps until its valid lifetime
        a, pref, valid = keep or (addrs[0] if addrs else (None, 0, 0))
        if a is None:
            raise Malformed("dhcp6_no_address")
        if valid == 0:
            self._lose(now)                                          # the server took it back
            return
        vt = float("inf") if valid == INF else now + valid
        pt = float("inf") if pref == INF else now + pref
        base = pref if pref != INF else valid
        if not t1:                                                   # ours: at least 1 s, or a preferred
            t1 = max(base * 0.5, 1.0) if base != INF else INF        # lifetime of 0 would renew in a loop
        if not t2:
            t2 = max(base * 0.8, 2.0) if base != INF else INF
        self.t1 = float("inf") if t1 == INF else now + t1
        self.t2 = float("inf") if t2 == INF else now + max(t2, t1 if t1 != INF else t2)
        if mine is not None and a != mine:                           # a Request after NoBinding got another
            self.events.append(Event("lost", mine))
            mine = None
        renewed = mine is not None
        self.address = (a, vt, pt)
        self.server = sid
        self.state = BOUND
        self._t = float("inf")
        self.counters["dhcp6_renewed" if renewed else "dhcp6_bound"] += 1
        self.events.append(Event("renewed" if renewed else "bound", a, vt, pt))

    def _lose(self, now):
        if self.address is not None:
            self.events.append(Event("lost", self.address[0]))
            self.counters["dhcp6_lost"] += 1
        self.address = None
        self._solicit(now, 0.0)

    # ----------------------------------------------------------- output

    def _backoff_delay(self) -> float:
        return self.rng.uniform(0, self.cfg.sol_max_delay) + min(self._sol_max_rt, 2.0 ** min(self._rc, 12))

    def _solicit(self, now, delay):
        self.server = None
        self._best = None
        self._begin(SOLICITING, now + delay, self.cfg.sol_timeout)
        self._collect_until = float("inf")

    def _begin(self, state, at, irt, mrd=float("inf")):
        self.state = state
        self._xid = self.rng.getrandbits(24)
        self._rt = 0.0
        self._irt = irt
        self._rc = 0
        self._first = at
        self._mrd = mrd
        self._t = at

    def _retransmit(self, now):
        c = self.cfg
        s = self.state
        mrt = {SOLICITING: self._sol_max_rt, REQUESTING: c.req_max_rt, DECLINING: 0.0}.get(s, c.ren_max_rt)
        mrc = {REQUESTING: c.req_max_rc, DECLINING: c.dec_max_rc}.get(s, 0)
        if mrc and self._rc >= mrc:                                  # §15: MRC reached
            self.counters["dhcp6_gave_up_" + s] += 1
            self._solicit(now, 0.0)
            return
        if self._rc == 0:
            lo = 0.0 if s == SOLICITING else -0.1                   # §15: the first Solicit RT > IRT
            self._rt = self._irt * (1 + self.rng.uniform(lo, 0.1))
            if s == SOLICITING:
                self._collect_until = now + self._rt
        else:
            self._rt = 2 * self._rt * (1 + self.rng.uniform(-0.1, 0.1))
            if mrt and self._rt > mrt:
                self._rt = mrt * (1 + self.rng.uniform(-0.1, 0.1))
        self._rc += 1
        self._t = min(now + self._rt, self._mrd)                     # §15 MRD: Renew ends at T2, Rebind at expiry
        self._send(now)

    def _ia(self, addrs) -> bytes:
        sub = b"".join(_opt(O_IAADDR, a + struct.pack("!II", p, v)) for a, p, v in addrs)
        return _opt(O_IA_NA, self.iaid + bytes(8) + sub)

    def _send(self, now):
        s = self.state
        mtype = {SOLICITING: SOLICIT, REQUESTING: REQUEST, RENEWING: RENEW, REBINDING: REBIND,
                 DECLINING: DECLINE}[s]
        el = min(0xFFFF, int(round((now - self._first) * 100)))
        o = _opt(O_CLIENTID, self.duid) + _opt(O_ELAPSED, el.to_bytes(2, "big"))
        if s in (REQUESTING, RENEWING, DECLINING):
            o += _opt(O_SERVERID, self.server)
        if s == SOLICITING:
            o += _opt(O_ORO, O_SOL_MAX_RT.to_bytes(2, "big")) + (_opt(O_RAPID) if self.cfg.rapid_commit else b"")
            o += self._ia([])
        elif s == REQUESTING:
            o += _opt(O_ORO, O_SOL_MAX_RT.to_bytes(2, "big")) + self._req_ia
        elif s == DECLINING:
            o += self._req_ia
        else:                                                        # §18.2.4: lifetimes 0 in Renew/Rebind
            o += self._ia([(self.address[0], 0, 0)])
        self.out.append(bytes([mtype]) + self._xid.to_bytes(3, "big") + o)
        self.counters[f"dhcp6_{s}_sent"] += 1
