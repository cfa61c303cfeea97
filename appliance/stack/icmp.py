"""ICMP echo (RFC 792): we answer echo requests and ignore every other type.

Theory of operation: an echo request is validated (length, ICMP checksum
over the whole ICMP message, RFC 792) and answered with type 0, the same
identifier, sequence number and data (pings are rare: the control path,
summed at C speed).
"""
import struct
from typing import NamedTuple

from .wire import Malformed, csum, sum_ok

__all__ = ["Icmp", "ECHO_REQUEST", "ECHO_REPLY"]

ECHO_REPLY = 0
ECHO_REQUEST = 8


class Icmp(NamedTuple):
    type: int
    code: int
    rest: bytes         # the 4 bytes after the checksum (id, seq for echo)
    data: bytes

    @classmethod
    def parse(cls, buf) -> "Icmp":
        if len(buf) < 8:
            raise Malformed("icmp_short", f"{len(buf)} bytes")
        if not sum_ok(buf):
            raise Malformed("icmp_bad_checksum")
        t, c = buf[0], buf[1]
        return cls(t, c, bytes(buf[4:8]), buf[8:])

    def emit(self) -> bytes:
        body = struct.pack("!BBH", self.type, self.code, 0) + self.rest + bytes(self.data)
        return body[:2] + csum(body).to_bytes(2, "big") + body[4:]

    def echo_reply(self) -> "Icmp":
        return Icmp(ECHO_REPLY, 0, self.rest, self.data)
