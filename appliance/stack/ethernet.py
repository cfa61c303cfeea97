"""Ethernet II frames (IEEE 802.3 with EtherType): parse/emit.

Theory of operation: 14-byte header (destination MAC, source MAC,
EtherType), no VLAN tags (a tagged frame has EtherType 0x8100 and is
dropped as an unknown type). The FCS is not seen: the NIC strips it.
"""
import struct
from typing import NamedTuple

from .wire import Malformed

__all__ = ["ETH_IPV4", "ETH_ARP", "BROADCAST", "HEADER_LEN", "EthernetFrame"]

ETH_IPV4 = 0x0800
ETH_ARP = 0x0806
BROADCAST = b"\xff" * 6
HEADER_LEN = 14
_HDR = struct.Struct("!6s6sH")


class EthernetFrame(NamedTuple):
    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes = b""

    @classmethod
    def parse(cls, buf) -> "EthernetFrame":
        if len(buf) < HEADER_LEN:
            raise Malformed("eth_short", f"{len(buf)} bytes")
        dst, src, et = _HDR.unpack_from(buf)
        return cls(dst, src, et, buf[HEADER_LEN:])

    def emit(self) -> bytes:
        return _HDR.pack(self.dst, self.src, self.ethertype) + bytes(self.payload)
