"""UDP (RFC 768): checked parse and emit, and the port registry.

Theory of operation: the appliance serves TCP; UDP exists for its control
plane (the DHCP client on port 68). `UdpDatagram.parse(buf, src, dst)`
validates and raises Malformed with the reason the stack counts:
  udp_short         fewer than 8 bytes
  udp_bad_length    length field < 8 or > the IP payload (the payload is cut
                    at the length field: RFC 768 lets the IP datagram be longer)
  udp_bad_checksum  checksum present (non-zero) and wrong; over IPv4 a zero
                    checksum means "none computed" (RFC 768), and we always
                    send one (a computed 0 goes out as 0xFFFF)
`UdpPorts` maps a local port to a handler
`handler(src_mac, src_ip, dst_ip, sport, payload, now)`. The stack passes
whether the destination address is ours (our address, the limited or the
subnet broadcast); a port bound with `any_dst=True` also takes datagrams to
other addresses (the DHCP client: a server may unicast its OFFER to the
address it offers, before we have it, RFC 2131 §4.1). A datagram for an
unbound port (or not to us) is dropped as `udp_closed_port` (we send no ICMP port
unreachable: nothing but DHCP is expected, and broadcasts must never be
answered with ICMP errors, RFC 1122 §3.2.2). The registry is bounded by the
port space and filled only by our own components.
"""
import struct
from typing import NamedTuple

from .wire import Malformed, csum, sum_ok

__all__ = ["UdpDatagram", "UdpPorts", "HEADER_LEN", "PROTO_UDP"]

PROTO_UDP = 17
HEADER_LEN = 8
_HDR = struct.Struct("!HHHH")


def _pseudo(src: bytes, dst: bytes, length: int) -> int:
    return int.from_bytes(src + dst, "big") + PROTO_UDP + length


class UdpDatagram(NamedTuple):
    sport: int
    dport: int
    payload: bytes = b""

    @classmethod
    def parse(cls, buf, src: bytes, dst: bytes, verify: bool = True) -> "UdpDatagram":
        n = len(buf)
        if n < HEADER_LEN:
            raise Malformed("udp_short", f"{n} bytes")
        sport, dport, length, ck = _HDR.unpack_from(buf)
        if length < HEADER_LEN or length > n:
            raise Malformed("udp_bad_length", f"length {length}, {n} bytes received")
        if verify and ck and not sum_ok(buf[:length], _pseudo(src, dst, length)):
            raise Malformed("udp_bad_checksum")
        return cls(sport, dport, bytes(buf[HEADER_LEN:length]))

    def emit(self, src: bytes, dst: bytes) -> bytes:
        length = HEADER_LEN + len(self.payload)
        h = _HDR.pack(self.sport, self.dport, length, 0)
        ck = csum(h + self.payload, _pseudo(src, dst, length))
        return h[:6] + (ck or 0xFFFF).to_bytes(2, "big") + bytes(self.payload)


class UdpPorts:
    """Local port -> handler. `deliver` raises Malformed for an unbound port."""

    def __init__(self, counters):
        self.counters = counters
        self._h = {}

    def bind(self, port: int, handler, any_dst: bool = False) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"UDP port must be 1..65535, got {port}")
        if port in self._h:
            raise ValueError(f"UDP port {port} is already bound")
        self._h[port] = (handler, any_dst)

    def unbind(self, port: int) -> None:
        self._h.pop(port, None)

    def bound(self, port: int) -> bool:
        return port in self._h

    def deliver(self, src_mac: bytes, src_ip: bytes, dst_ip: bytes, d: UdpDatagram, now: float,
                to_us: bool = True) -> None:
        e = self._h.get(d.dport)
        if e is None:
            raise Malformed("udp_closed_port", str(d.dport))
        if not (to_us or e[1]):
            raise Malformed("ip_not_for_us")
        self.counters["udp_in_datagrams"] += 1
        e[0](src_mac, src_ip, dst_ip, d.sport, d.payload, now)
