"""The parent's control plane for a multi-worker server: the DHCP lease and IPv6.

Theory of operation. With several workers in one PACKET_FANOUT group a DHCP
reply, a router advertisement or a DHCPv6 reply would reach whichever
worker the flow hash picks, so no worker can run a client. Instead the
parent runs them: `ParentControl(iface, mac, ..., dhcp=, ip6=)` opens its
own AF_PACKET socket on the interface (outside the fanout group), with a
classic BPF filter (CONTROL_BPF) that passes only what a client needs: ARP
and IPv4 UDP to port 68; ICMPv6 MLD queries (bare or behind the router
alert hop-by-hop header), RA, NS and NA; IPv6 UDP to port 546. It drives a
Stack without a content store from it: the same dhcp4.py client (probe and
all) and the same ipv6.py host (link-local, SLAAC or DHCPv6 or static, DAD,
MLD reports, router solicitations, gateway resolution). The parent feeds
its stack ARP replies (for its gateway) and, while probing, every ARP
packet; it never answers ARP requests, and while workers run (`serving`)
answers no NS either (the workers do, for the addresses they serve); it
never sees TCP or echo (the filter). serve.py acquires the lease and lets
IPv6 settle (`ip6_settled`, at most SETTLE6 seconds) before forking the
workers with the leased address as their static one and the IPv6
`delegation()` (ipv6.Delegated6: addresses past DAD, routers, MTU), calls
`pump(now)` from its supervision loop (renewal, rebinding, RA lifetimes,
DHCPv6 renewals), and restarts the workers when the IPv4 address changes
or is lost or the delegation's addresses or MTU change (not sooner than
HOLD6 after the last start: a rogue router's stream of short-lived
prefixes cannot keep the workers restarting). Low rate by construction: a
few frames per renewal or advertisement.
"""
import ctypes
import os
import socket
import struct

from .counters import Counters

__all__ = ["ParentControl", "CONTROL_BPF", "SETTLE6", "HOLD6"]

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SOL_PACKET, PACKET_AUXDATA = 263, 8
PACKET_ADD_MEMBERSHIP, PACKET_MR_ALLMULTI = 1, 2
PACKET_OUTGOING = 4
TP_STATUS_CSUMNOTREADY, TP_STATUS_CSUM_VALID = 0x8, 0x80
_AUX = socket.CMSG_SPACE(20)            # struct tpacket_auxdata

SETTLE6 = 6.0            # seconds IPv6 may take (RS, RA, SLAAC DAD) before the workers start anyway
HOLD6 = 5.0              # seconds a set of workers serves at least before an IPv6 change restarts it
MLD_QUERY, RA, NS, NA = 130, 134, 135, 136


def _asm(prog) -> list:
    """Classic BPF with labels: items are "label:" strings or (code, jt, jf, k) with
    jt/jf a label (or 0: the next instruction)."""
    at, n = {}, 0
    for i in prog:
        if isinstance(i, str):
            at[i.rstrip(":")] = n
        else:
            n += 1
    out = []
    for i in prog:
        if not isinstance(i, str):
            code, jt, jf, k = i
            pc = len(out)
            out.append((code, at[jt] - pc - 1 if jt else 0, at[jf] - pc - 1 if jf else 0, k))
    return out


LDH, LDB, LDXB, LDHX, JEQ, JSET, RET = 0x28, 0x30, 0xB1, 0x48, 0x15, 0x45, 0x06
CONTROL_BPF = _asm([
    (LDH, 0, 0, 12),                    # EtherType
    (JEQ, "ok", 0, 0x0806),             # ARP
    (JEQ, 0, "v6", 0x0800),
    (LDB, 0, 0, 23),                    # IPv4: protocol
    (JEQ, 0, "drop", 17),
    (LDH, 0, 0, 20),
    (JSET, "drop", 0, 0x1FFF),          # a fragment
    (LDXB, 0, 0, 14),                   # x = IP header length
    (LDHX, 0, 0, 16),                   # UDP destination port
    (JEQ, "ok", "drop", 68),
    "v6:",
    (JEQ, 0, "drop", 0x86DD),
    (LDB, 0, 0, 20),                    # next header
    (JEQ, 0, "udp6", 58),
    (LDB, 0, 0, 54),                    # ICMPv6 type
    (JEQ, "ok", 0, MLD_QUERY),
    (JEQ, "ok", 0, RA),
    (JEQ, "ok", 0, NS),
    (JEQ, "ok", "drop", NA),
    "udp6:",
    (JEQ, 0, "hbh", 17),
    (LDH, 0, 0, 56),                    # UDP destination port
    (JEQ, "ok", "drop", 546),
    "hbh:",
    (JEQ, 0, "drop", 0),                # hop-by-hop options (MLD's router alert)
    (LDH, 0, 0, 54),                    # its next header ICMPv6, length 0 (8 bytes)
    (JEQ, 0, "drop", 0x3A00),
    (LDB, 0, 0, 62),
    (JEQ, "ok", "drop", MLD_QUERY),
    "ok:",
    (RET, 0, 0, 0x40000),
    "drop:",
    (RET, 0, 0, 0),
])


def attach_filter(sock, prog=CONTROL_BPF) -> None:
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class ParentControl:
    """`dhcp`: run the DHCPv4 client; `ip6`: "off", "auto" or an ipv6.Static6 (with
    `secret`, the RFC 7217 key)."""

    def __init__(self, iface: str, mac: bytes, mtu: int, hostname=None, now: float = 0.0, dhcp: bool = True,
                 ip6="off", secret: bytes = b""):
        from .dhcp4 import DhcpConfig
        from .iface import Stack, StackConfig
        from .rings.base import Offload
        self.sock = self._open(iface, ip6 != "off")
        self.stack = Stack(None, mac, None, 0, None, Offload(), StackConfig(mtu=max(576, mtu)), os.getrandom(32))
        if dhcp:
            self.stack.enable_dhcp(DhcpConfig(hostname=hostname))
        if ip6 != "off":
            self.stack.enable_ipv6(secret)
            if ip6 != "auto":
                self.stack.ip6.set_static(ip6)
        self.started = now
        self.stack.start(now)
        self._flush()

    @staticmethod
    def _open(iface, allmulti):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            attach_filter(s)
            # the checksum status of each frame: a local sender's (veth) UDP checksum is
            # only the pseudo-header sum (CHECKSUM_PARTIAL), as on the rings
            s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            s.bind((iface, 0))
            if allmulti:                # RAs to all-nodes, NS to our solicited-node groups (see tpacket.py)
                ifindex = socket.if_nametoindex(iface)
                s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
                             struct.pack("=iHH8s", ifindex, PACKET_MR_ALLMULTI, 0, b""))
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return s

    @property
    def serving(self) -> bool:
        return self.stack.ip6 is not None and not self.stack.ip6.answer_ns

    @serving.setter
    def serving(self, on: bool) -> None:
        """Workers run: they answer NS for the addresses they serve, not the parent."""
        if self.stack.ip6 is not None:
            self.stack.ip6.answer_ns = not on

    def ip6_settled(self, now: float) -> bool:
        """IPv6 is worth starting workers with (ipv6.settled), or SETTLE6 passed."""
        h = self.stack.ip6
        return h is None or h.settled() or now - self.started >= SETTLE6

    def delegation(self):
        """ipv6.Delegated6 for the workers, or "off"."""
        return "off" if self.stack.ip6 is None else self.stack.ip6.delegation()

    @property
    def counters(self) -> Counters:
        return self.stack.counters

    def fileno(self) -> int:
        return self.sock.fileno()

    def pump(self, now: float) -> list:
        """Take what arrived, run the timers, send; returns (deadline, events)."""
        st = self.stack
        while True:
            try:
                data, anc, _, addr = self.sock.recvmsg(2048, _AUX)
            except (BlockingIOError, InterruptedError):
                break
            if addr[2] == PACKET_OUTGOING:
                continue
            ok = any(lv == SOL_PACKET and ty == PACKET_AUXDATA and len(d) >= 4 and
                     struct.unpack_from("I", d)[0] & (TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID)
                     for lv, ty, d in anc)
            # ARP: replies, and anything while probing (RFC 5227); the workers answer requests
            if data[12:14] == b"\x08\x06" and (st.dhcp is None or not (len(data) >= 22 and data[21] == 2) and
                                                 st.dhcp.state != "probing"):
                continue
            st.receive(data, now, ok)
        deadline = st.poll(now)
        self._flush()
        evs = st.events[:]
        st.events.clear()
        return deadline, evs

    def _flush(self) -> None:
        for f in self.stack.txq:
            try:
                self.sock.send(bytes(f[0]))
            except OSError:
                self.stack.counters["parent_send_errors"] += 1
        self.stack.txq.clear()

    def close(self) -> None:
        self.sock.close()
