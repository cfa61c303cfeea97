"""IPv4 (RFC 791): checked parse and emit of the header.

Theory of operation: `IPv4Header.parse(buf)` validates, in this order, and
raises Malformed with the reason the stack counts:
  ip_short         fewer than 20 bytes
  ip_bad_version   version != 4
  ip_bad_ihl       IHL < 5 or header longer than the buffer
  ip_bad_length    total length < header length or > bytes received
                   (Ethernet pads short frames, so the buffer may be longer:
                   the payload is cut at total length)
  ip_bad_checksum  header checksum wrong (RFC 1071)
  ip_fragment      MF set or fragment offset != 0: we never reassemble; a
                   TCP peer that honours our MSS never needs to fragment
  ip_options       IHL > 5: we handle no IP options (RFC 791 lets a host
                   ignore most of them, but source routes must not be
                   silently ignored, RFC 1122 §3.2.1.8; dropping is safe)
We send with DF set and ID 0 (RFC 6864 §4.1: atomic datagrams may use any
ID), TTL 64, no options.
"""
import struct
from typing import NamedTuple

from .wire import Malformed, csum, sum_ok

__all__ = ["IPv4Header", "PROTO_ICMP", "PROTO_TCP", "PROTO_UDP", "HEADER_LEN", "DF"]

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
HEADER_LEN = 20
DF = 0x4000
_HDR = struct.Struct("!BBHHHBBH4s4s")


class IPv4Header(NamedTuple):
    src: bytes
    dst: bytes
    proto: int
    payload: bytes = b""     # the IP payload (bytes-like, cut at total length)
    ttl: int = 64
    tos: int = 0
    ident: int = 0
    flags_frag: int = DF

    @classmethod
    def parse(cls, buf) -> "IPv4Header":
        n = len(buf)
        if n < HEADER_LEN:
            raise Malformed("ip_short", f"{n} bytes")
        vihl, tos, total, ident, ff, ttl, proto, _, src, dst = _HDR.unpack_from(buf)
        if vihl >> 4 != 4:
            raise Malformed("ip_bad_version", str(vihl >> 4))
        ihl = (vihl & 15) * 4
        if ihl < HEADER_LEN or ihl > n:
            raise Malformed("ip_bad_ihl", str(ihl))
        if total < ihl or total > n:
            raise Malformed("ip_bad_length", f"total length {total}, {n} bytes received")
        if not sum_ok(buf[:ihl]):
            raise Malformed("ip_bad_checksum")
        if ff & 0x3FFF:
            raise Malformed("ip_fragment", f"flags/offset {ff:#x}")
        if ihl != HEADER_LEN:
            raise Malformed("ip_options", f"header length {ihl}")
        return cls(src, dst, proto, buf[ihl:total], ttl, tos, ident, ff)

    def header(self, payload_len: int) -> bytes:
        h = bytearray(_HDR.pack(0x45, self.tos, HEADER_LEN + payload_len, self.ident, self.flags_frag,
                                self.ttl, self.proto, 0, self.src, self.dst))
        h[10:12] = csum(h).to_bytes(2, "big")
        return bytes(h)

    def emit(self) -> bytes:
        return self.header(len(self.payload)) + bytes(self.payload)
