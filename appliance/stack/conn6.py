"""TCP over IPv6 (RFC 8200; TCP's pseudo header, RFC 8200 §8.1): `Conn6`, a Conn (conn.py).

Theory of operation. Input is the IPv4 code unchanged: the Stack hands
`segment` the frame with its first 20 bytes cut off, which puts the TCP
header at 34 as in an IPv4 frame (the bytes before it are never read).
Output differs only in the frame built: a 74-byte header template (Ethernet,
IPv6, TCP) with the IPv6 payload length at 18 and no IP header checksum; the
TCP checksum constants of the template (Stack.template: pseudo = addresses
+ 6) and the stored payload sums are used exactly as for IPv4. `_xmit` and
`_ctl` are Conn's with these offsets, written out so that the IPv4 methods
keep their constants. The key is the raw 36 bytes (source, destination,
ports) of the frame; its last two bytes are our port, as in an IPv4 key.
HTTPS over IPv6 is tls.py's TlsConn6 (the TLS mixin on this class).
"""
import struct

from .conn import ACK, Conn, SYN_RCVD, _tcp_pack
from .seq import MASK

__all__ = ["Conn6"]

_ip6_pack = struct.Struct("!H").pack_into           # at 18: IPv6 payload length
_GSO6 = 4                                           # virtio_net_hdr gso_type TCPV6


class Conn6(Conn):
    """A connection over IPv6 (see the theory of operation)."""
    __slots__ = ()

    def __init__(self, st, key: bytes, peer_mac: bytes, peer_ip: bytes, peer_port: int,
                 iss: int, irs: int, peer_mss, peer_ws, peer_wnd: int, now: float, state: int = SYN_RCVD,
                 lport: int = 0):
        # Stack.template takes the 32 address bytes (peer and ours) as "peer_ip":
        # its cache key then names our address too, and a length other than 4
        # builds the IPv6 template. SMSS = MTU - 60; without the option 1220
        # (RFC 9293 §3.7.1: the IPv6 default is the minimum MTU 1280 - 60).
        mss = min(peer_mss or 1220, st.cfg.mtu - 60)
        Conn.__init__(self, st, key, peer_mac, key[:32], peer_port, iss, irs, mss, peer_ws, peer_wnd, now,
                      state, lport)
        self.peer_ip = peer_ip
        self.gso = st.gso6(self.mss)

    def __repr__(self):
        return "Conn6(" + Conn.__repr__(self)[5:]

    def set_mss(self, mss: int) -> bool:
        """Lower SMSS (an ICMPv6 Packet Too Big, RFC 8201 §4); False if it is not lower."""
        if mss >= self.mss:
            return False
        self.mss, self.aligned, self.tso_max, _ = self.st.mss_params(mss)
        self.gso = self.st.gso6(self.mss)
        self.cc.mss = self.mss
        return True

    def _xmit(self, seq: int, flags: int, it, o: int, n: int, mode: int) -> None:
        """Conn._xmit for the IPv6 header (TCP at 54)."""
        hdr = it[3]
        hl = it[4]
        if o < hl:
            e = o + n
            if e <= hl:
                prefix = hdr if (o == 0 and e == hl) else hdr[o:e]
                rest = None
            else:
                prefix = hdr[o:] if o else hdr
                rest = it[5][:e - hl]
        else:
            prefix = b""
            rest = it[5][o - hl:o - hl + n]
        h = bytearray(self.tmpl)
        if prefix:
            h += prefix
        tl = 20 + n                                     # the TCP length = the IPv6 payload length
        _ip6_pack(h, 18, tl)
        rn = self.rcv_nxt
        st = self.st
        if mode == 0:
            sums = it[6]
            sm = st.smss
            if sums is not None and o % sm == 0 and (n == sm or o + n == it[2]):
                k = o // sm
                psum = sums[k] if k else it[7]
            else:
                st.counters["tcp_tx_sw_csum"] += 1
                data = bytes(prefix) + (bytes(rest) if rest is not None else b"")
                psum = int.from_bytes(data, "big") << (8 if n & 1 else 0)
            ck = (-(self.tcp_const + seq + rn + (((0x5000 | flags) << 16) | self.rwnd) + tl + psum)) % 0xFFFF
            gso = None
        else:
            ck = (self.pseudo + tl) % 0xFFFF
            gso = st.gso_csum6 if (mode == 1 or n <= self.mss) else self.gso
        _tcp_pack(h, 58, seq, rn, 0x5000 | flags, self.rwnd, ck)
        st.txq.append((h, rest, gso))
        self.rcv_unacked = 0
        self.t_ack = 0.0
        c = st.counters
        c["tcp_out_segments"] += 1
        c["tcp_out_bytes"] += n

    def _ctl(self, seq: int, flags: int, opts: bytes = b"") -> None:
        """Conn._ctl for the IPv6 header (TCP at 54). Options come only with our
        SYN-ACK (Stack.send_synack): its MSS is MTU - 60 here."""
        if opts:
            st = self.st
            opts = st._synack6_ws if self.ws_ok else st._synack6_opts
            v = st._opts_cache.get((self.tmpl, opts))
            t, hl, osum = v if v is not None else st.opts_template(self.tmpl, 0, opts)
            h = bytearray(t)
        else:
            h = bytearray(self.ctl_tmpl)
            hl = 20
            osum = 0
        rn = self.rcv_nxt if flags & ACK else 0
        offflags = (hl << 10) | flags
        ck = (-(self.tcp_const + seq + rn + ((offflags << 16) | self.rwnd) + hl + osum)) % 0xFFFF
        _tcp_pack(h, 58, seq & MASK, rn, offflags, self.rwnd, ck)
        self.st.txq.append((h, None, None))
        self.st.counters["tcp_out_segments"] += 1
        if flags & ACK:
            self.rcv_unacked = 0
            self.t_ack = 0.0
