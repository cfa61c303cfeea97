"""TCP segments (RFC 9293 §3.1): checked parse and emit, with options.

Theory of operation: `TcpSegment.parse(buf, src, dst)` checks the header
and the checksum over the pseudo header (RFC 9293 §3.1) and raises Malformed:
  tcp_short         fewer than 20 bytes
  tcp_bad_offset    data offset < 5 or beyond the segment
  tcp_bad_checksum
  tcp_bad_options   an option whose length runs past the header or is < 2
Options understood (RFC 9293 §3.2): End, NOP, MSS (kind 2, only meaningful
on SYN), Window Scale (kind 3, RFC 7323 §2; shift capped at 14), SACK
permitted (kind 4) and Timestamps (kind 8) are recognized only so that we
know the peer offered them: we never offer them back, so neither is used on
the connection (RFC 7323 §3.2, RFC 2018 §2). Unknown options are skipped
by their length.
This module is the clean control path (SYNs, RSTs, tests); the established
connection's hot path patches prebuilt header templates instead (conn.py).
"""
import struct
from typing import NamedTuple

from .wire import Malformed, csum, sum_ok

__all__ = ["TcpSegment", "Options", "FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR",
           "flags_str", "pseudo_sum"]

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 1, 2, 4, 8, 16, 32, 64, 128
_HDR = struct.Struct("!HHIIBBHHH")


def flags_str(f: int) -> str:
    return "".join(c for bit, c in zip((FIN, SYN, RST, PSH, ACK, URG, ECE, CWR), "FSRPAUEC") if f & bit) or "-"


def pseudo_sum(src: bytes, dst: bytes, length: int) -> int:
    """Partial sum (mod 0xFFFF congruent) of the IPv4 pseudo header for TCP."""
    return int.from_bytes(bytes(src) + bytes(dst), "big") + 6 + length


class Options(NamedTuple):
    mss: int | None = None
    wscale: int | None = None
    sack_perm: bool = False
    timestamps: bool = False

    @classmethod
    def parse(cls, buf) -> "Options":
        mss = ws = None
        sack = ts = False
        i, n = 0, len(buf)
        while i < n:
            kind = buf[i]
            if kind == 0:
                break
            if kind == 1:
                i += 1
                continue
            if i + 1 >= n or buf[i + 1] < 2 or i + buf[i + 1] > n:
                raise Malformed("tcp_bad_options", f"option {kind} at {i}")
            ln = buf[i + 1]
            if kind == 2 and ln == 4:
                mss = (buf[i + 2] << 8) | buf[i + 3]
            elif kind == 3 and ln == 3:
                ws = min(buf[i + 2], 14)     # RFC 7323 §2.3: use 14 when larger
            elif kind == 4 and ln == 2:
                sack = True
            elif kind == 8 and ln == 10:
                ts = True
            i += ln
        return cls(mss, ws, sack, ts)

    def emit(self) -> bytes:
        out = b""
        if self.mss is not None:
            out += struct.pack("!BBH", 2, 4, self.mss)
        if self.wscale is not None:
            out += struct.pack("!BBBB", 1, 3, 3, self.wscale)
        if self.sack_perm:
            out += b"\x01\x01\x04\x02"
        if self.timestamps:
            out += b"\x01\x01\x08\x0a" + bytes(8)
        return out


class TcpSegment(NamedTuple):
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: Options = Options()
    payload: bytes = b""
    urgent: int = 0

    @classmethod
    def parse(cls, buf, src: bytes, dst: bytes, verify: bool = True) -> "TcpSegment":
        n = len(buf)
        if n < 20:
            raise Malformed("tcp_short", f"{n} bytes")
        sport, dport, seq, ack, off, flags, win, _, urg = _HDR.unpack_from(buf)
        hl = (off >> 4) * 4
        if hl < 20 or hl > n:
            raise Malformed("tcp_bad_offset", str(hl))
        if verify and not sum_ok(buf, pseudo_sum(src, dst, n)):
            raise Malformed("tcp_bad_checksum")
        opts = Options.parse(buf[20:hl]) if hl > 20 else Options()
        return cls(sport, dport, seq, ack, flags, win, opts, buf[hl:], urg)

    @property
    def seg_len(self) -> int:
        """SEG.LEN: payload plus one for SYN and one for FIN (RFC 9293 §3.4)."""
        return len(self.payload) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)

    def emit(self, src: bytes, dst: bytes) -> bytes:
        opts = self.options.emit()
        opts += b"\0" * (-len(opts) % 4)
        hl = 20 + len(opts)
        h = bytearray(_HDR.pack(self.sport, self.dport, self.seq & 0xFFFFFFFF, self.ack & 0xFFFFFFFF,
                                (hl // 4) << 4, self.flags, self.window, 0, self.urgent)) + opts
        body = bytes(h) + bytes(self.payload)
        c = csum(body, pseudo_sum(src, dst, len(body)))
        return body[:16] + c.to_bytes(2, "big") + body[18:]
