"""IPv6 host control plane (RFC 8200, 4861, 4862, 4443, 3810, 7217), sans-IO.

Theory of operation. `Ipv6Host(mac, counters, secret, rng)` keeps our IPv6
addresses, the default routers and a neighbour cache; it owns no socket and
reads no clock. The stack hands it every IPv6 Ethernet frame
(`receive(frame, now)`) and calls `poll(now)` for its timers (it returns the
next deadline); frames to send are appended to `out` (whole Ethernet
frames), address events to `events` as (kind, info) like the IPv4 side.

Addresses. At `start` a link-local address is formed and, for every /64
prefix with the A flag in a router advertisement, a global one (SLAAC, RFC
4862 §5.5.3). Interface identifiers are RFC 7217 stable-privacy ones:
the first 64 bits of HMAC-SHA256(secret, prefix || MAC || DAD counter),
with the secret fixed per image and MAC (`secret` is passed in): stable
across reboots on one network, not trackable across networks, and the MAC
is not disclosed (EUI-64 would be all three). Every address starts
tentative: we join its solicited-node group (an MLDv2 report, RFC 3810,
so that MLD-snooping switches deliver our neighbour solicitations), then
duplicate address detection (RFC 4862 §5.4) sends one NS from :: after a
random 0..1 s delay and waits RetransTimer (1 s). An NS from :: or an NA
for a tentative address means a duplicate: the address is dropped and,
RFC 7217 §6, another identifier is tried with the next DAD counter (at most
IDGEN_RETRIES = 3 times). Once the link-local address is preferred we send
up to three router solicitations 4 s apart (RFC 4861 §6.3.7).

Input checks (RFC 4861 §6.1, §7.1): ND messages must have hop limit 255,
code 0, a valid ICMPv6 checksum, the minimum length, no option of length 0;
an RA must come from a link-local source; an NS from :: must go to a
solicited-node address and carry no source link-layer option; an NA to a
multicast address must not have S set. Everything else is counted
`drop_ip6_<reason>`/`drop_icmp6_<reason>` and dropped. Router solicitations
are ignored (we are a host). Tables are bounded (addresses, routers,
neighbours); a flood of advertisements costs one parse each and can add at
most `max_addresses` addresses.

DHCPv6. An RA with M=1 starts dhcp6.py's client (once our link-local
address is preferred: DHCPv6 is sent from it, to ff02::1:2 port 547). A
leased address becomes one of ours (how "dhcp6", prefix 128, its net the
whole address so that no prefix option touches its lifetimes): tentative,
DAD as above (a duplicate is Declined, not retried with another
identifier), then preferred, reported by the same address6 events and
served by TCP like any other; the client's `lost` removes it.

Static configuration (`set_static(Static6)` before `start`; `--ip6
ADDR/PREFIX --gateway6 GW`, `parse_static6` checks the words). The
link-local address is formed as always, the static address beside it with
an infinite lifetime: it joins its solicited-node group (MLDv2) and is
tentative until DAD passes like any other (RFC 4862 §5.4: DAD applies to
manually configured addresses too). A duplicate is not retried with another
identifier (there is no other): RFC 4862 §5.4.5, the address is not used,
an address6 event `duplicate` says so and the caller logs it as an error;
the link-local address and IPv4 keep serving. The gateway is the default
router (a `routers` entry that never expires, never removed by an RA) and is
resolved by an NS from our link-local address once that is preferred (up to
three, RetransTimer apart), the way the IPv4 side ARPs for its gateway. A
static host still reads router advertisements: their MTU option applies
(a property of the link), their routers are learned beside the gateway,
but their prefixes form no SLAAC address and M=1 starts no DHCPv6
(`nd_prefix_ignored_static`, `nd_ra_managed_ignored_static`): the operator
said which address to use.

Delegated configuration (`set_delegated(Delegated6)` before `start`): a
worker of a multi-worker server (serve.py, lease.py). The parent process
ran the whole control plane above (link-local, SLAAC or DHCPv6 or static,
DAD, MLD, RS/RA) on a socket of its own and hands the workers what it
acquired: the addresses, already past DAD (so no DAD, no MLD report: the
parent joined the groups), the routers and the link MTU. Such a host only
answers: NS for those addresses (each worker keeps its own neighbour
cache; the fanout hands an NS to any worker), echo, TCP. It sends no RS,
no DHCPv6 and no MLD report, and leaves RAs (`nd_ra_left_to_parent`), MLD
queries (`mld_query_left_to_parent`) and DHCPv6 replies
(`drop_udp6_dhcp6_left_to_parent`, no Port Unreachable) to the parent, which
restarts the workers when the address set or the MTU changes. Its
addresses never expire here: the parent tracks the lifetimes. The parent's
own host sets `answer_ns` False while workers run (they answer; the parent
still sees an NS from :: for an address it is testing).

Answers: NS for one of our preferred addresses -> NA (solicited and
override, with our link-layer address; to all-nodes when the solicitation
came from ::); ICMPv6 echo request -> echo reply (RFC 4443 §4.2), from the
address it was sent to (or, for a multicast request, our preferred
address); an MLD query -> a report of our groups. Packet Too Big is counted
(`icmp6_packet_too_big`) and handed to `too_big` (the Stack: it lowers the
connection's SMSS). UDP (checksum mandatory, RFC 8200 §8.1: a zero one is dropped) is served
on port 546 only, for the DHCPv6 client; another port gets a Port
Unreachable (RFC 4443 §3.1). TCP segments to a preferred address take the Stack's
IPv6 fast path (iface.py) and never come here; the others (extension headers,
a tentative address) are counted (`drop_ip6_tcp_not_served`) and dropped. An unknown next header gets a Parameter
Problem (RFC 8200 §4, RFC 4443 §3.4 code 1). ICMPv6 errors are never sent
for multicast destinations or unspecified sources (RFC 4443 §2.4 e) and
are rate-limited (§2.4 f: `error_rate` per second).
"""
import hashlib
import hmac
import ipaddress
import struct
from typing import NamedTuple

from .udp import UdpDatagram
from .wire import Malformed, csum, sum_ok

__all__ = ["Ipv6Host", "Ip6Config", "ETH_IPV6", "solicited_node", "multicast_mac", "ip6_str", "LINK_LOCAL",
           "Static6", "parse_static6", "ip6_mode", "Delegated6"]

ETH_IPV6 = 0x86DD
NH_HBH, NH_TCP, NH_UDP, NH_ICMP6 = 0, 6, 17, 58
ECHO_REQUEST, ECHO_REPLY = 128, 129
MLD_QUERY, MLD2_REPORT = 130, 143
RS, RA, NS, NA = 133, 134, 135, 136
OPT_SLLA, OPT_TLLA, OPT_PREFIX, OPT_MTU = 1, 2, 3, 5
UNSPEC = bytes(16)
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_ROUTERS = bytes.fromhex("ff020000000000000000000000000002")
MLD2_ROUTERS = bytes.fromhex("ff020000000000000000000000000016")
LINK_LOCAL = bytes.fromhex("fe800000000000000000000000000000")
ALL_DHCP = bytes.fromhex("ff020000000000000000000000010002")   # All_DHCP_Relay_Agents_and_Servers
_HDR = struct.Struct("!IHBB16s16s")
TWO_HOURS = 7200.0


class Ip6Config:
    __slots__ = ("dad_delay", "retrans", "rs_count", "rs_interval", "max_addresses", "max_routers",
                 "neigh_size", "neigh_ttl", "idgen_retries", "error_rate", "dhcp6")

    def __init__(self, dad_delay=1.0, retrans=1.0, rs_count=3, rs_interval=4.0, max_addresses=8,
                 max_routers=4, neigh_size=256, neigh_ttl=300.0, idgen_retries=3, error_rate=10, dhcp6=None):
        self.dhcp6 = dhcp6                  # a dhcp6.Dhcp6Config (None: its defaults)
        self.error_rate = error_rate        # RSTs and ICMPv6 errors per second
        self.dad_delay = dad_delay          # RFC 4862 §5.4.2: random 0..MAX_RTR_SOLICITATION_DELAY
        self.retrans = retrans              # RFC 4861 RetransTimer
        self.rs_count = rs_count            # MAX_RTR_SOLICITATIONS
        self.rs_interval = rs_interval      # RTR_SOLICITATION_INTERVAL
        self.max_addresses = max_addresses
        self.max_routers = max_routers
        self.neigh_size = neigh_size
        self.neigh_ttl = neigh_ttl
        self.idgen_retries = idgen_retries  # RFC 7217 §6 IDGEN_RETRIES


def ip6_str(a: bytes) -> str:
    return str(ipaddress.IPv6Address(bytes(a)))


class Static6(NamedTuple):
    """A static IPv6 address: 16 bytes, its prefix length, the gateway (16 bytes) or None."""
    addr: bytes
    prefix: int
    gateway: bytes | None = None

    def __str__(self):
        return f"{ip6_str(self.addr)}/{self.prefix}"


class Delegated6(NamedTuple):
    """What a multi-worker parent acquired, for its workers (set_delegated): `addrs`
    ((address, prefix length, how), ...), `routers` ((address, MAC or None), ...), `mtu`."""
    addrs: tuple
    routers: tuple = ()
    mtu: int = 1500

    def key(self):
        """What the workers must be restarted for when it changes."""
        return self.addrs, self.mtu


def parse_static6(value: str, gateway: str | None = None, opt: str = "--ip6 ",
                  gw_opt: str = "--gateway6 ") -> Static6:
    """`ADDR/PREFIX` (and a gateway) as a Static6, or ValueError naming the option and
    what is wrong with it (`opt`/`gw_opt`: the words the user typed, e.g. haboob.ip6=)."""
    example = "2001:2:0:1::10/64"
    addr, sep, plen = value.partition("/")
    if not sep:
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            raise ValueError(f"{opt}{value!r} is neither off, auto nor an IPv6 ADDR/PREFIX like {example}") from None
        raise ValueError(f"{opt}{value!r} needs a prefix length, like {value}/64")
    try:
        a = ipaddress.IPv6Address(addr)
    except ValueError:
        raise ValueError(f"{opt}{value!r}: {addr!r} is not an IPv6 address (like {example}), "
                         f"nor auto or off") from None
    if not plen.isdigit() or not 1 <= int(plen) <= 128:
        raise ValueError(f"{opt}{value!r}: the prefix length {plen!r} is out of range (1..128)")
    net = ipaddress.IPv6Network(f"{a}/{plen}", strict=False)
    why = ("a multicast address" if a.is_multicast else
           "link-local (fe80::/10; the appliance makes its own link-local address)" if a.is_link_local else
           "the unspecified address" if a.is_unspecified else
           "the loopback address" if a.is_loopback else
           "an IPv4-mapped address" if a.ipv4_mapped is not None else
           f"the subnet-router anycast address of {net} (RFC 4291 §2.6.1)"
           if net.prefixlen <= 126 and a == net.network_address else None)
    if why:
        raise ValueError(f"{opt}{value!r}: {a} is {why}, not a host's global address")
    gw = None
    if gateway is not None:
        try:
            g = ipaddress.IPv6Address(gateway)
        except ValueError:
            raise ValueError(f"{gw_opt}{gateway!r} is not an IPv6 address") from None
        if g.is_multicast or g.is_unspecified or g.is_loopback or g == a:
            raise ValueError(f"{gw_opt}{gateway!r} is " + ("our own address" if g == a else "not a router's "
                             "unicast address"))
        if not g.is_link_local and g not in net:
            raise ValueError(f"{gw_opt}{gateway!r} is neither link-local (fe80::/10) nor on-link in {net}")
        gw = g.packed
    return Static6(a.packed, int(plen), gw)


def ip6_mode(value: str, gateway: str | None = None, opt: str = "--ip6 ", gw_opt: str = "--gateway6 "):
    """"off", "auto" or a Static6 for the words `value` (and `gateway`); ValueError names what is wrong."""
    if value in ("off", "auto"):
        if gateway:
            raise ValueError(f"{gw_opt.rstrip('= ')} needs a static {opt}ADDR/PREFIX "
                             f"(with {value}, " + ("there is no IPv6" if value == "off" else
                                                   "router advertisements name the router") + ")")
        return value
    return parse_static6(value, gateway, opt, gw_opt)


def solicited_node(a: bytes) -> bytes:
    return bytes.fromhex("ff0200000000000000000001ff") + bytes(a[13:16])


def multicast_mac(a: bytes) -> bytes:
    return b"\x33\x33" + bytes(a[12:16])


def _pseudo(src, dst, length, nh=NH_ICMP6) -> int:
    return int.from_bytes(src + dst, "big") + length + nh


class _Addr:
    __slots__ = ("addr", "prefix", "how", "state", "valid", "preferred", "t", "dad_counter", "net", "sent")

    def __init__(self, addr, net, how, valid, preferred, dad_counter):
        self.addr, self.net, self.how = addr, net, how
        self.prefix = 64
        self.state = "tentative"
        self.valid, self.preferred = valid, preferred
        self.t = 0.0                        # tentative: when the DAD NS goes / when DAD ends
        self.dad_counter = dad_counter
        self.sent = False                   # the DAD NS went out

    def info(self, event, gateway=None):
        d = {"event": event, "ip6": ip6_str(self.addr), "prefix": self.prefix, "how": self.how}
        if gateway is not None:
            d["gateway"] = ip6_str(gateway)
        return d


class Ipv6Host:
    def __init__(self, mac: bytes, counters, secret: bytes, rng, config: Ip6Config = None, mtu: int = 1500):
        self.mac = bytes(mac)
        self.counters = counters
        self.secret = bytes(secret)
        self.rng = rng
        self.cfg = config or Ip6Config()
        self.link_mtu = self.mtu = mtu
        self.out = []
        self.events = []
        self.addrs = {}                     # address -> _Addr (tentative or preferred)
        self.routers = {}                   # router address -> (mac, expires)
        self.neigh = {}                     # address -> (mac, expires)
        self._groups = {ALL_NODES}          # multicast groups we receive
        self._rs_left = 0
        self._rs_at = float("inf")
        self._ra_seen = False
        self._err_sec = -1
        self._err_n = 0
        self.too_big = None                 # callback(icmp6 body, now) for Packet Too Big (TCP's SMSS)
        self.dhcp6 = None                   # a dhcp6.Dhcp6Client once an RA said M=1
        self._dhcp6_wanted = False
        self.static = None                  # a Static6 (set_static): no SLAAC, no DHCPv6
        self._gw_left = 0                   # neighbour solicitations left for the static gateway
        self._gw_at = float("inf")
        self.delegated = None               # a Delegated6 (set_delegated): a worker, the parent decides
        self.answer_ns = True               # False in a parent while its workers answer

    # ---------------------------------------------------------------- API

    def set_delegated(self, d: Delegated6) -> None:
        """Serve `d`'s addresses as they are (the parent did DAD); call before start()."""
        self.delegated = d
        self.mtu = min(self.link_mtu, max(1280, d.mtu))
        for r, mac in d.routers:
            self.routers[bytes(r)] = (mac, float("inf"))

    def delegation(self) -> Delegated6:
        """Our preferred addresses, routers and MTU, for the workers (a parent's call)."""
        return Delegated6(tuple(sorted((x.addr, x.prefix, x.how) for x in self.addrs.values()
                                       if x.state == "preferred")),
                          tuple(sorted((r, m) for r, (m, _) in self.routers.items())), self.mtu)

    def settled(self) -> bool:
        """Nothing tentative, link-local preferred, and a router was heard from (and,
        when it asked for DHCPv6, a leased address is ours): what a parent waits for."""
        if self._ll() == UNSPEC or any(a.state == "tentative" for a in self.addrs.values()):
            return False
        if self.static is not None:
            return True
        return self._ra_seen and (not self._dhcp6_wanted or any(a.how == "dhcp6" for a in self.addrs.values()))

    def set_static(self, static: Static6) -> None:
        """Use `static` (parse_static6) instead of SLAAC/DHCPv6; call before start()."""
        self.static = static
        if static.gateway is not None:
            self.routers[static.gateway] = (None, float("inf"))     # resolved once link-local is up

    def start(self, now: float) -> None:
        inf = float("inf")
        if self.delegated is not None:       # preferred at once, no DAD, no MLD, no RS
            self._ra_seen = True
            for addr, plen, how in self.delegated.addrs:
                a = _Addr(bytes(addr), bytes(addr) if how != "slaac" else bytes(addr[:8]), how, inf, inf, 0)
                a.prefix, a.state = plen, "preferred"
                self.addrs[a.addr] = a
                self._groups.add(solicited_node(a.addr))
            return
        self._new_address(LINK_LOCAL[:8], "link-local", inf, inf, 0, now)
        s = self.static
        if s is not None:                   # tentative like any other: DAD (RFC 4862 §5.4)
            self._new_address(s.addr, "static", inf, inf, 0, now, addr=s.addr)

    def preferred(self, scope_global: bool = True):
        """Our preferred addresses, global ones first."""
        a = [x.addr for x in self.addrs.values() if x.state == "preferred"]
        return sorted(a, key=lambda x: x[:2] == b"\xfe\x80") if scope_global else a

    def accepts_mac(self, dst: bytes) -> bool:
        return dst == self.mac or (dst[:2] == b"\x33\x33" and any(dst[2:] == g[12:] for g in self._groups))

    def receive(self, f, now: float, csum_ok: bool = False) -> None:
        """An Ethernet frame with EtherType 0x86DD; raises Malformed to drop it.
        `csum_ok`: the device vouches for the UDP checksum (as in Stack.receive)."""
        n = len(f)
        if n < 54:
            raise Malformed("ip6_short", f"{n} bytes")
        vtf, plen, nh, hop, src, dst = _HDR.unpack_from(f, 14)
        if vtf >> 28 != 6:
            raise Malformed("ip6_bad_version", str(vtf >> 28))
        if 54 + plen > n:
            raise Malformed("ip6_bad_length", f"payload length {plen}, {n - 54} bytes received")
        a = self.addrs.get(dst)
        if not (dst in self._groups or (a is not None and (a.state == "preferred" or nh == NH_ICMP6))):
            raise Malformed("ip6_not_for_us", ip6_str(dst))
        if src[0] == 0xFF:
            raise Malformed("ip6_bad_source", ip6_str(src))
        body = bytes(f[54:54 + plen])
        if nh == NH_HBH:                    # MLD queries come with a router alert option
            if len(body) < 8 or len(body) < 8 + body[1] * 8:
                raise Malformed("ip6_bad_extension")
            nh, body = body[0], body[8 + body[1] * 8:]
        if nh == NH_UDP:
            return self._udp(f, src, dst, body, now, csum_ok)
        if nh == NH_TCP:
            if dst[0] != 0xFF and src != UNSPEC and len(body) >= 20 and self._error_ok(now):
                self._tcp_reset(bytes(f[6:12]), src, dst, body)
            raise Malformed("ip6_tcp_not_served")
        if nh != NH_ICMP6:
            if dst[0] != 0xFF and src != UNSPEC and self._error_ok(now):
                ptr = 6 if f[20] == nh else 40                    # the Next Header field that named it
                self._send_icmp(bytes(f[6:12]), dst, src, bytes([4, 1, 0, 0]) + ptr.to_bytes(4, "big") +
                                bytes(f[14:14 + min(40 + plen, 1232)]), hop=64)
                self.counters["icmp6_param_problems_sent"] += 1
            raise Malformed("ip6_unknown_next_header", str(nh))
        if len(body) < 4:
            raise Malformed("icmp6_short", f"{len(body)} bytes")
        if not sum_ok(body, _pseudo(src, dst, len(body))):
            raise Malformed("icmp6_bad_checksum")
        if a is not None and a.state != "preferred" and body[0] not in (NS, NA):
            raise Malformed("ip6_not_for_us", "tentative " + ip6_str(dst))
        t = body[0]
        src_mac = bytes(f[6:12])
        if t == ECHO_REQUEST:
            self._echo(src_mac, src, dst, body)
        elif t in (NS, NA, RA, RS):
            if hop != 255 or body[1] != 0:                  # RFC 4861 §6.1.2, §7.1
                raise Malformed("nd_bad_hop_limit" if hop != 255 else "nd_bad_code", f"hop {hop} code {body[1]}")
            if t == RS:
                self.counters["nd_rs_ignored"] += 1         # RFC 4861 §6.2.6: hosts discard
            elif t == RA and self.delegated is not None:
                self.counters["nd_ra_left_to_parent"] += 1
            elif t == NS:
                self._ns(src_mac, src, dst, body, now)
            elif t == NA:
                self._na(src_mac, src, dst, body, now)
            else:
                self._ra(src_mac, src, body, now)
        elif t == MLD_QUERY:
            if self.delegated is not None:
                self.counters["mld_query_left_to_parent"] += 1      # the parent joined, it reports
                return
            self.counters["mld_queries"] += 1
            self._mld_report(self._groups - {ALL_NODES})
        elif t == 2:
            self.counters["icmp6_packet_too_big"] += 1
            if self.too_big is not None:
                self.too_big(body, now)                 # the Stack lowers the connection's MSS
        else:
            self.counters["icmp6_ignored"] += 1

    def poll(self, now: float) -> float:
        nxt = float("inf")
        for a in list(self.addrs.values()):
            if a.state == "tentative":
                if now >= a.t:
                    self._dad_step(a, now)
                if a.addr in self.addrs and a.t < nxt:
                    nxt = a.t
            else:
                if now >= a.valid:
                    self._drop(a, "lost")
                    continue
                if a.valid < nxt:
                    nxt = a.valid
        if self._rs_left and now >= self._rs_at:
            ll = self._ll()
            opts = bytes([OPT_SLLA, 1]) + self.mac
            self._send_icmp(b"\x33\x33\x00\x00\x00\x02", ll, ALL_ROUTERS, bytes([RS, 0, 0, 0, 0, 0, 0, 0]) + opts)
            self.counters["nd_rs_sent"] += 1
            self._rs_left -= 1
            self._rs_at = now + self.cfg.rs_interval if self._rs_left else float("inf")
        if self._rs_at < nxt:
            nxt = self._rs_at
        if self._gw_left and now >= self._gw_at:
            self._resolve_gateway(now)
        if self._gw_at < nxt:
            nxt = self._gw_at
        d = self._dhcp6_run(now)
        if d < nxt:
            nxt = d
        for r, (_, exp) in list(self.routers.items()):
            if exp <= now:
                del self.routers[r]
                self.counters["nd_routers_expired"] += 1
            elif exp < nxt:
                nxt = exp
        return nxt

    # -------------------------------------------------------- addresses

    def _iid(self, net8: bytes, counter: int) -> bytes:
        return hmac.new(self.secret, net8 + self.mac + bytes([counter]), hashlib.sha256).digest()[:8]

    def _new_address(self, net8, how, valid, preferred, counter, now, addr=None):
        if len(self.addrs) >= self.cfg.max_addresses:
            self.counters["drop_ip6_address_table_full"] += 1
            return
        if addr is None:
            addr = net8 + self._iid(net8, counter)
        a = _Addr(addr, net8, how, valid, preferred, counter)
        if how == "dhcp6":
            a.prefix = 128                          # IA_NA carries no prefix length (RFC 8415 §21.6)
        elif how == "static":
            a.prefix = self.static.prefix           # its net is the whole address: no RA prefix touches it
        a.t = now + self.rng.uniform(0, self.cfg.dad_delay)
        self.addrs[addr] = a
        g = solicited_node(addr)
        if g not in self._groups:
            self._groups.add(g)
            self._mld_report([g])                   # join before DAD (RFC 4862 §5.4.2)

    def _dad_step(self, a, now):
        if a.sent:                                  # RetransTimer passed without a conflict
            a.state = "preferred"
            self.counters["ip6_addresses_preferred"] += 1
            self.events.append(("address6", a.info("acquired", self.static.gateway if a.how == "static"
                                                    else None)))
            if a.how == "link-local":
                if not self._ra_seen:
                    self._rs_left = self.cfg.rs_count
                    self._rs_at = now
                if self.static is not None and self.static.gateway is not None:
                    self._gw_left, self._gw_at = 3, now
            return
        ns = bytes([NS, 0, 0, 0, 0, 0, 0, 0]) + a.addr
        g = solicited_node(a.addr)
        self._send_icmp(multicast_mac(g), UNSPEC, g, ns)
        self.counters["nd_dad_ns_sent"] += 1
        a.sent = True
        a.t = now + self.cfg.retrans

    def _duplicate(self, a, now):
        self.counters["ip6_dad_duplicates"] += 1
        self._drop(a, "duplicate")
        if a.how == "static":
            self.counters["ip6_static_duplicate"] += 1        # RFC 4862 §5.4.5: not used, logged
        elif a.how == "dhcp6":
            if self.dhcp6 is not None:
                self.dhcp6.declined(a.addr, now)             # RFC 8415 §18.2.8: Decline, start over
                self._dhcp6_apply(now)
        elif a.dad_counter < self.cfg.idgen_retries:          # RFC 7217 §6: the next identifier
            self._new_address(a.net, a.how, a.valid, a.preferred, a.dad_counter + 1, now)

    def _drop(self, a, event):
        self.addrs.pop(a.addr, None)
        g = solicited_node(a.addr)
        if not any(solicited_node(x) == g for x in self.addrs):
            self._groups.discard(g)
        self.events.append(("address6", a.info(event)))

    def _resolve_gateway(self, now):
        """An NS for the static gateway (RFC 4861 §7.2.2), until its NA is in the cache."""
        gw, ll = self.static.gateway, self._ll()
        if gw in self.neigh or ll == UNSPEC:
            self._gw_left, self._gw_at = 0, float("inf")
            return
        g = solicited_node(gw)
        self._send_icmp(multicast_mac(g), ll, g, bytes([NS, 0, 0, 0, 0, 0, 0, 0]) + gw + bytes([OPT_SLLA, 1]) + self.mac)
        self.counters["nd_gateway_ns_sent"] += 1
        self._gw_left -= 1
        self._gw_at = now + self.cfg.retrans if self._gw_left else float("inf")

    def _ll(self):
        for a in self.addrs.values():
            if a.how == "link-local" and a.state == "preferred":
                return a.addr
        return UNSPEC

    # ------------------------------------------------------------ input

    @staticmethod
    def _options(buf) -> list:
        out, i = [], 0
        while i < len(buf):
            if i + 2 > len(buf) or buf[i + 1] == 0 or i + buf[i + 1] * 8 > len(buf):
                raise Malformed("nd_bad_option", f"at {i}")     # RFC 4861 §4.6: length 0 is invalid
            out.append((buf[i], buf[i + 2:i + buf[i + 1] * 8]))
            i += buf[i + 1] * 8
        return out

    def _learn(self, ip, mac, now):
        if ip not in self.neigh and len(self.neigh) >= self.cfg.neigh_size:
            del self.neigh[next(iter(self.neigh))]                # the oldest entry
        self.neigh.pop(ip, None)
        self.neigh[ip] = (bytes(mac), now + self.cfg.neigh_ttl)

    def _ns(self, src_mac, src, dst, body, now):
        if len(body) < 24:
            raise Malformed("nd_short", f"NS of {len(body)} bytes")
        target = body[8:24]
        if target[0] == 0xFF:
            raise Malformed("nd_bad_target")
        opts = self._options(body[24:])
        slla = next((v[:6] for k, v in opts if k == OPT_SLLA), None)
        if src == UNSPEC and (dst[:13] != solicited_node(target)[:13] or slla is not None):
            raise Malformed("nd_bad_dad_ns")                      # RFC 4861 §7.1.1
        a = self.addrs.get(target)
        if a is None:
            raise Malformed("nd_not_our_target")
        if a.state == "tentative":
            if src == UNSPEC:                                     # someone else's DAD: RFC 4862 §5.4.3
                self._duplicate(a, now)
            else:
                self.counters["nd_ns_for_tentative_ignored"] += 1
            return
        if not self.answer_ns:
            self.counters["nd_ns_left_to_workers"] += 1
            return
        if slla is not None and src != UNSPEC:
            self._learn(src, slla, now)
        na = bytes([NA, 0, 0, 0, 0x60 if src != UNSPEC else 0x20, 0, 0, 0]) + target + bytes([OPT_TLLA, 1]) + self.mac
        if src == UNSPEC:                                         # RFC 4861 §7.2.4
            self._send_icmp(multicast_mac(ALL_NODES), target, ALL_NODES, na)
        else:
            self._send_icmp(slla or src_mac, target, src, na)
        self.counters["nd_na_sent"] += 1

    def _na(self, src_mac, src, dst, body, now):
        if len(body) < 24:
            raise Malformed("nd_short", f"NA of {len(body)} bytes")
        target = body[8:24]
        if target[0] == 0xFF:
            raise Malformed("nd_bad_target")
        if dst[0] == 0xFF and body[4] & 0x40:
            raise Malformed("nd_bad_na_solicited")                # RFC 4861 §7.1.2
        opts = self._options(body[24:])
        a = self.addrs.get(target)
        if a is not None:
            if a.state == "tentative":
                self._duplicate(a, now)
            else:
                self.counters["ip6_address_conflict"] += 1        # RFC 4862 §5.4.4: log, keep it
            return
        tlla = next((v[:6] for k, v in opts if k == OPT_TLLA), None)
        if target in self.neigh or target in self.routers:
            self._learn(target, tlla or src_mac, now)
            self.counters["nd_na_learned"] += 1
        else:
            self.counters["nd_na_unsolicited_ignored"] += 1

    def _ra(self, src_mac, src, body, now):
        if src[:2] != b"\xfe\x80" or src[1] & 0xC0 != 0x80:
            raise Malformed("nd_ra_not_link_local")               # RFC 4861 §6.1.2
        if len(body) < 16:
            raise Malformed("nd_short", f"RA of {len(body)} bytes")
        flags, lifetime = body[5], int.from_bytes(body[6:8], "big")
        opts = self._options(body[16:])
        self.counters["nd_ra_received"] += 1
        self._ra_seen = True
        self._rs_left = 0
        self._rs_at = float("inf")
        if flags & 0x80:
            if self.static is not None:
                self.counters["nd_ra_managed_ignored_static"] += 1
            else:
                self.counters["nd_ra_managed"] += 1               # DHCPv6 for an address (dhcp6.py)
                self._dhcp6_wanted = True
        mac = src_mac
        for k, v in opts:
            if k == OPT_SLLA and len(v) >= 6:
                mac = bytes(v[:6])
            elif k == OPT_MTU and len(v) >= 6:
                m = int.from_bytes(v[2:6], "big")
                if 1280 <= m <= self.link_mtu:
                    self.mtu = m
                else:
                    self.counters["nd_ra_bad_mtu"] += 1
        if lifetime:
            if self.static is not None and src == self.static.gateway:
                self.routers[bytes(src)] = (mac, float("inf"))
            elif src in self.routers or len(self.routers) < self.cfg.max_routers:
                self.routers[bytes(src)] = (mac, now + lifetime)
            else:
                self.counters["drop_nd_router_table_full"] += 1
        elif self.static is None or src != self.static.gateway:   # the static gateway stays
            self.routers.pop(bytes(src), None)
        self._learn(bytes(src), mac, now)
        for k, v in opts:
            if k == OPT_PREFIX:
                self._prefix(v, now)
        if self._dhcp6_wanted and self.dhcp6 is None:
            self._dhcp6_run(now)

    def _prefix(self, v, now):
        """A prefix information option (RFC 4862 §5.5.3)."""
        if self.static is not None:
            self.counters["nd_prefix_ignored_static"] += 1       # the operator chose the address
            return
        if len(v) < 30:
            self.counters["nd_bad_prefix_option"] += 1
            return
        plen, fl = v[0], v[1]
        valid, pref = int.from_bytes(v[2:6], "big"), int.from_bytes(v[6:10], "big")
        net = bytes(v[14:30])
        if not fl & 0x40 or net[:2] == b"\xfe\x80" or net[0] == 0xFF:
            return                                                # not autonomous, link-local, multicast
        if pref > valid:
            self.counters["nd_prefix_bad_lifetimes"] += 1
            return
        if plen != 64:
            self.counters["nd_prefix_not_64"] += 1                # SLAAC needs a 64-bit identifier
            return
        inf = 0xFFFFFFFF
        vt = float("inf") if valid == inf else now + valid
        pt = float("inf") if pref == inf else now + pref
        net8 = net[:8]
        a = next((x for x in self.addrs.values() if x.net == net8), None)
        if a is None:
            if valid:
                self._new_address(net8, "slaac", vt, pt, 0, now)
            return
        a.preferred = pt                                          # §5.5.3 e): the two-hour rule
        remaining = a.valid - now
        if valid > TWO_HOURS or vt > a.valid:
            a.valid = vt
        elif remaining > TWO_HOURS:
            a.valid = now + TWO_HOURS

    # ---------------------------------------------------- UDP, DHCPv6

    def _udp(self, f, src, dst, body, now, csum_ok=False):
        """UDP over IPv6: only port 546 (our DHCPv6 client) is served. With `csum_ok`
        (a veth's or virtio's CHECKSUM_PARTIAL: the field holds only the pseudo-header
        sum) the checksum is not ours to verify."""
        if not csum_ok and len(body) >= 8 and body[6:8] == b"\0\0":
            raise Malformed("udp6_zero_checksum")                 # RFC 8200 §8.1: mandatory over IPv6
        d = UdpDatagram.parse(body, src, dst, verify=not csum_ok)
        if d.dport == 546 and self.delegated is not None:
            raise Malformed("udp6_dhcp6_left_to_parent")          # the parent's client has it too
        if d.dport == 546 and self.dhcp6 is not None:
            if d.sport != 547:
                raise Malformed("dhcp6_bad_source_port", str(d.sport))
            self.counters["udp6_in_datagrams"] += 1
            try:
                self.dhcp6.receive(d.payload, now)
            finally:
                self._dhcp6_run(now)                            # a Request chosen now goes now
            return
        if dst[0] != 0xFF and src != UNSPEC and self._error_ok(now):     # port unreachable, RFC 4443 §3.1
            self._send_icmp(bytes(f[6:12]), dst, src, bytes([1, 4, 0, 0, 0, 0, 0, 0]) +
                            bytes(f[14:14 + min(40 + int.from_bytes(f[18:20], "big"), 1232)]), hop=64)
            self.counters["icmp6_port_unreachable_sent"] += 1
        raise Malformed("udp6_closed_port", str(d.dport))

    def _dhcp6_run(self, now) -> float:
        c = self.dhcp6
        if c is None:
            if not self._dhcp6_wanted or self._ll() == UNSPEC:
                return float("inf")                              # DHCPv6 needs a link-local source
            from .dhcp6 import Dhcp6Client, Dhcp6Config
            c = self.dhcp6 = Dhcp6Client(self.mac, self.counters, self.rng, self.cfg.dhcp6 or Dhcp6Config())
            c.start(now)
        d = c.poll(now)
        self._dhcp6_apply(now)
        return d

    def _dhcp6_apply(self, now):
        c = self.dhcp6
        ll = self._ll()
        for p in c.out:
            if ll == UNSPEC:
                self.counters["dhcp6_no_link_local"] += 1
                continue
            u = UdpDatagram(546, 547, p).emit(ll, ALL_DHCP)
            ip = _HDR.pack(0x60000000, len(u), NH_UDP, 1, ll, ALL_DHCP)
            self.out.append(struct.pack("!6s6sH", multicast_mac(ALL_DHCP), self.mac, ETH_IPV6) + ip + u)
        c.out.clear()
        for e in c.events:
            a = self.addrs.get(e.address)
            if e.kind == "bound" and a is None:
                self._new_address(e.address, "dhcp6", e.valid, e.preferred, 0, now, addr=e.address)
            elif e.kind in ("bound", "renewed") and a is not None:
                a.valid, a.preferred = e.valid, e.preferred       # the same address: nothing to announce
            elif e.kind == "lost" and a is not None and a.how == "dhcp6":
                self._drop(a, "lost")
        c.events.clear()

    def _echo(self, src_mac, src, dst, body):
        if body[1] != 0 or len(body) < 8:
            raise Malformed("icmp6_bad_echo")
        me = dst if dst[0] != 0xFF else next(iter(self.preferred()), None)
        if me is None:
            raise Malformed("ip6_no_address")
        self._send_icmp(src_mac, me, src, bytes([ECHO_REPLY, 0, 0, 0]) + body[4:], hop=64)
        self.counters["icmp6_echo_replies"] += 1

    def _error_ok(self, now) -> bool:
        s = int(now)
        if s != self._err_sec:
            self._err_sec, self._err_n = s, 0
        self._err_n += 1
        return self._err_n <= self.cfg.error_rate

    def _tcp_reset(self, dmac, src, dst, seg):
        """RFC 9293 §3.10.7.1: the RST answering a segment for a closed port."""
        sport, dport, seq, ack, off, fl = struct.unpack_from("!HHIIBB", seg)
        if fl & 0x04:
            return                                                # never answer a RST
        if fl & 0x10:
            rseq, rack, rfl = ack, 0, 0x04
        else:
            n = len(seg) - (off >> 4) * 4 + (1 if fl & 0x02 else 0) + (1 if fl & 0x01 else 0)
            rseq, rack, rfl = 0, (seq + n) & 0xFFFFFFFF, 0x14
        tcp = struct.pack("!HHIIBBHHH", dport, sport, rseq, rack, 0x50, rfl, 0, 0, 0)
        ck = csum(tcp, _pseudo(dst, src, 20, NH_TCP))
        tcp = tcp[:16] + ck.to_bytes(2, "big") + tcp[18:]
        ip = _HDR.pack(0x60000000, 20, NH_TCP, 64, dst, src)
        self.out.append(struct.pack("!6s6sH", dmac, self.mac, ETH_IPV6) + ip + tcp)
        self.counters["tcp6_rst_sent"] += 1

    # ----------------------------------------------------------- output

    def _send_icmp(self, dmac, src, dst, msg, hop=255):
        ck = csum(msg, _pseudo(src, dst, len(msg)))
        msg = msg[:2] + ck.to_bytes(2, "big") + msg[4:]
        ip = _HDR.pack(0x60000000, len(msg), NH_ICMP6, hop, src, dst)
        self.out.append(struct.pack("!6s6sH", dmac, self.mac, ETH_IPV6) + ip + msg)

    def _mld_report(self, groups):
        """An MLDv2 report (RFC 3810 §5.2): CHANGE_TO_EXCLUDE({}) per group, i.e. join;
        hop limit 1 and a router alert hop-by-hop option (§5)."""
        groups = sorted(groups)
        if not groups:
            return
        recs = b"".join(bytes([4, 0, 0, 0]) + g for g in groups)
        msg = bytes([MLD2_REPORT, 0, 0, 0, 0, 0]) + len(groups).to_bytes(2, "big") + recs
        src = self._ll()
        ck = csum(msg, _pseudo(src, MLD2_ROUTERS, len(msg)))
        msg = msg[:2] + ck.to_bytes(2, "big") + msg[4:]
        hbh = bytes([NH_ICMP6, 0, 5, 2, 0, 0, 1, 0])              # router alert (MLD), PadN
        ip = _HDR.pack(0x60000000, len(hbh) + len(msg), NH_HBH, 1, src, MLD2_ROUTERS)
        self.out.append(struct.pack("!6s6sH", multicast_mac(MLD2_ROUTERS), self.mac, ETH_IPV6) + ip + hbh + msg)
        self.counters["mld_reports_sent"] += 1
