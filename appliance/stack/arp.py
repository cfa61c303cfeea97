"""ARP for IPv4 over Ethernet (RFC 826, gratuitous ARP per RFC 5227 §3) and the cache.

Theory of operation: we answer requests for our address, learn the sender of
every valid ARP packet addressed to us (RFC 826's "merge" rule, restricted to
our subnet), and resolve the next hop for replies. The stack only talks to
hosts that spoke to it first (clients) or to the gateway; replies go to the
source MAC of the frame, so the cache is mostly for the gateway and for
frames we originate (RSTs to unknown senders use the frame's source MAC too).
The cache is small and bounded: entries expire after `ttl` seconds and the
oldest is evicted when full.
"""
import struct
from typing import NamedTuple

from .wire import Malformed

__all__ = ["ArpPacket", "ArpCache", "OP_REQUEST", "OP_REPLY"]

OP_REQUEST = 1
OP_REPLY = 2
_ARP = struct.Struct("!HHBBH6s4s6s4s")


class ArpPacket(NamedTuple):
    op: int
    sha: bytes      # sender hardware address
    spa: bytes      # sender protocol address
    tha: bytes
    tpa: bytes

    @classmethod
    def parse(cls, buf) -> "ArpPacket":
        if len(buf) < 28:
            raise Malformed("arp_short", f"{len(buf)} bytes")
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(buf)
        if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
            raise Malformed("arp_unsupported", f"htype={htype} ptype={ptype:#x} hlen={hlen} plen={plen}")
        if op not in (OP_REQUEST, OP_REPLY):
            raise Malformed("arp_bad_op", str(op))
        return cls(op, sha, spa, tha, tpa)

    def emit(self) -> bytes:
        return _ARP.pack(1, 0x0800, 6, 4, self.op, self.sha, self.spa, self.tha, self.tpa)


class ArpCache:
    """IPv4 -> MAC with expiry; `now` is passed in."""

    def __init__(self, ttl: float = 60.0, size: int = 256):
        self.ttl = ttl
        self.size = size
        self._e = {}        # ip bytes -> (mac, expires)

    def learn(self, ip: bytes, mac: bytes, now: float) -> None:
        if ip not in self._e and len(self._e) >= self.size:
            self.expire(now)
            if len(self._e) >= self.size:
                del self._e[min(self._e, key=lambda k: self._e[k][1])]
        self._e[bytes(ip)] = (bytes(mac), now + self.ttl)

    def lookup(self, ip: bytes, now: float):
        e = self._e.get(ip)
        if e is None:
            return None
        if e[1] <= now:
            del self._e[ip]
            return None
        return e[0]

    def expire(self, now: float) -> None:
        for k in [k for k, (_, t) in self._e.items() if t <= now]:
            del self._e[k]

    def __len__(self):
        return len(self._e)
