"""DHCP for a multi-worker server: the parent process keeps the lease.

Theory of operation. With several workers in one PACKET_FANOUT group a DHCP
reply would reach whichever worker the flow hash picks, so no worker can
run the client. Instead the parent runs it: `ParentLease(iface, mac, ...)`
opens its own AF_PACKET socket on the interface (outside the fanout group),
with a classic BPF filter that passes only ARP and IPv4 UDP to port 68, and
drives a Stack without a content store (`enable_dhcp`) from it: the same
dhcp4.py client, probe and all. The parent only feeds it ARP replies (for
its gateway resolution) and, while probing, every ARP packet; it never
answers ARP requests (the workers do, for the address they serve) and never
sees TCP (the filter). serve.py acquires the lease before forking the
workers with the leased address as their static one, calls `pump(now)` from
its supervision loop (renewal, rebinding), and restarts the workers when the
address changes or is lost. Low rate by construction: a few frames per
renewal.
"""
import ctypes
import os
import socket
import struct

from .counters import Counters

__all__ = ["ParentLease", "DHCP_BPF"]

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SOL_PACKET, PACKET_AUXDATA = 263, 8
PACKET_OUTGOING = 4
TP_STATUS_CSUMNOTREADY, TP_STATUS_CSUM_VALID = 0x8, 0x80
_AUX = socket.CMSG_SPACE(20)            # struct tpacket_auxdata

# arp or (ip and udp and not a fragment and udp dst port 68)
DHCP_BPF = [
    (0x28, 0, 0, 12),           # 0 ldh [12]                 EtherType
    (0x15, 8, 0, 0x0806),       # 1 jeq ARP -> accept
    (0x15, 0, 8, 0x0800),       # 2 jeq IPv4, else drop
    (0x30, 0, 0, 23),           # 3 ldb [23]                 protocol
    (0x15, 0, 6, 17),           # 4 jeq UDP, else drop
    (0x28, 0, 0, 20),           # 5 ldh [20]                 flags/fragment offset
    (0x45, 4, 0, 0x1FFF),       # 6 jset offset -> drop
    (0xB1, 0, 0, 14),           # 7 ldxb 4*([14]&0xf)        IP header length
    (0x48, 0, 0, 16),           # 8 ldh [x+16]               UDP destination port
    (0x15, 0, 1, 68),           # 9 jeq 68, else drop
    (0x06, 0, 0, 0x40000),      # 10 accept
    (0x06, 0, 0, 0),            # 11 drop
]


def attach_filter(sock, prog=DHCP_BPF) -> None:
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class ParentLease:
    def __init__(self, iface: str, mac: bytes, mtu: int, hostname=None, now: float = 0.0):
        from .dhcp4 import DhcpConfig
        from .iface import Stack, StackConfig
        from .rings.base import Offload
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            attach_filter(self.sock)
            # the checksum status of each frame: a local sender's (veth) UDP checksum is
            # only the pseudo-header sum (CHECKSUM_PARTIAL), as on the rings
            self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            self.sock.bind((iface, 0))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.stack = Stack(None, mac, None, 0, None, Offload(), StackConfig(mtu=max(576, mtu)), os.getrandom(32))
        self.stack.enable_dhcp(DhcpConfig(hostname=hostname))
        self.stack.start(now)
        self._flush()

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
            if data[12:14] == b"\x08\x06" and not (len(data) >= 22 and data[21] == 2) and \
                    st.dhcp.state != "probing":
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
                self.stack.counters["dhcp_parent_send_errors"] += 1
        self.stack.txq.clear()

    def close(self) -> None:
        self.sock.close()
