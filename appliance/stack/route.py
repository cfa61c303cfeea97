"""The IPv4 route table: on-link prefixes, static routes and the default, bounded.

Theory of operation: a list of Route(net, prefix, gateway, source) kept in
longest-prefix-first order; `lookup(dst)` returns the next hop (the
destination itself for an on-link route, else the route's gateway) or None
when no route covers it. Sources name who added a route ("connected" for our
address's prefix, "static" for --gateway, "dhcp" for a lease's routers or
RFC 3442 routes), so a new lease replaces exactly what the old one added
(`replace(source, routes)`).

A gateway must be on the link: when a route names one that no on-link
route covers (the /32 address some clouds hand out, with the router outside
it), an on-link host route to the gateway is added with the same source,
the way Linux's `onlink` flag and systemd-networkd do; the gateway is then
resolved by ARP like any neighbour. The table is small (`size` routes,
default 64; beyond that, adds are refused and counted by the caller): a
lookup is a short scan, and lookups are for frames we originate (DHCP,
ARP), never on the TCP fast path, whose replies go to the MAC the segment
came from.
"""
from typing import NamedTuple

__all__ = ["Route", "RouteTable", "TableFull"]

_M = 0xFFFFFFFF


class TableFull(ValueError):
    pass


class Route(NamedTuple):
    net: int
    prefix: int
    gateway: bytes | None          # None: on-link
    source: str

    def covers(self, v: int) -> bool:
        return (v ^ self.net) & ((_M << (32 - self.prefix)) & _M) == 0

    def __str__(self):
        net = ".".join(str((self.net >> s) & 255) for s in (24, 16, 8, 0))
        via = " via " + ".".join(map(str, self.gateway)) if self.gateway else " on-link"
        return f"{net}/{self.prefix}{via} ({self.source})"


class RouteTable:
    def __init__(self, size: int = 64):
        self.size = size
        self.routes = []
        self.gw = ()                # the gateways in use, each once (kept up to date: read per poll)

    def add(self, net: bytes, prefix: int, gateway: bytes | None = None, source: str = "static") -> None:
        if not 0 <= prefix <= 32 or len(net) != 4 or (gateway is not None and len(gateway) != 4):
            raise ValueError(f"bad route {net!r}/{prefix} via {gateway!r}")
        v = int.from_bytes(net, "big") & ((_M << (32 - prefix)) & _M)
        if gateway == b"\0\0\0\0":
            gateway = None                                  # RFC 3442 router 0.0.0.0: on-link
        if gateway is not None and not self.on_link(gateway):
            self._insert(Route(int.from_bytes(gateway, "big"), 32, None, source))
        self._insert(Route(v, prefix, bytes(gateway) if gateway else None, source))

    def _insert(self, r: Route) -> None:
        rs = self.routes
        rs[:] = [x for x in rs if (x.net, x.prefix) != (r.net, r.prefix)]
        if len(rs) >= self.size:
            raise TableFull(f"route table full ({self.size} routes)")
        rs.append(r)
        rs.sort(key=lambda x: -x.prefix)
        self._gateways()

    def remove(self, source: str) -> None:
        self.routes[:] = [r for r in self.routes if r.source != source]
        self._gateways()

    def _gateways(self) -> None:
        out = []
        for r in self.routes:
            if r.gateway and r.gateway not in out:
                out.append(r.gateway)
        self.gw = tuple(out)

    def lookup(self, dst: bytes):
        """The next hop for `dst` (4 bytes), or None without a route."""
        v = int.from_bytes(dst, "big")
        for r in self.routes:
            if r.covers(v):
                return r.gateway or bytes(dst)
        return None

    def on_link(self, dst: bytes) -> bool:
        v = int.from_bytes(dst, "big")
        for r in self.routes:
            if r.covers(v):
                return r.gateway is None
        return False

    def gateways(self) -> list:
        """The gateways in use, each once, in the table's order."""
        return list(self.gw)

    def default(self):
        for r in self.routes:
            if r.prefix == 0:
                return r.gateway
        return None

    def __len__(self):
        return len(self.routes)
