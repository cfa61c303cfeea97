"""AF_PACKET TPACKET_V2 memory-mapped RX and TX rings: the Linux NIC backend.

Theory of operation (Documentation/networking/packet_mmap.rst): one packet
socket carries two rings of fixed-size slots in one mmap'ed area, RX first,
then TX. Every slot starts with a `struct tpacket2_hdr` whose `tp_status`
word is the hand-over flag between the kernel and us:

- RX: the kernel fills a slot and sets TP_STATUS_USER; we copy the frame
  out as bytes (requests and ACKs are small, and the stack turns every frame
  into bytes anyway: slicing and summing bytes is cheaper in CPython than a
  memoryview) and give the slot back at once by writing TP_STATUS_KERNEL
  (the whole 32-bit word: the kernel compares for equality). The loop
  blocks (poll) only after a scan found nothing; packet_poll() reports
  readable while the slot before the kernel's head is not handed back.
- TX: we copy head and payload straight into the next free slot (the one
  copy of response bytes), set TP_STATUS_SEND_REQUEST, and after the batch
  kick the kernel with one `send(fd, b"", MSG_DONTWAIT)`. The kernel walks
  the ring from its own head while it finds SEND_REQUEST slots, so we fill
  slots strictly in order and never skip one. A slot stays busy (SENDING)
  until the skb that maps its pages is freed (zero copy: the skb's fragments
  are the ring's pages); when the head slot is still busy the rest of the
  batch goes through a ring-less packet socket (copied by the kernel)
  instead of stalling the loop. When that socket is full too (ENOBUFS,
  EAGAIN) a frame is not lost: it and every frame after it wait in
  `tx_pending` and go first on the next tx_batch (the serve loop calls it on
  every pass while frames wait, and waits at most 1 ms), so a full ring is
  backpressure, not loss that TCP must repair by retransmission. Only a
  frame that cannot ever be sent (too big, a socket error other than a full
  buffer) or one beyond PENDING_MAX waiting frames is dropped and counted
  (tx_dropped_full, tx_dropped_error). Big frames (GSO super-frames of at least
  DIRECT_MIN bytes) take that socket too, by choice: a ring slot's skb is
  zero-copy, and the kernel copies it anyway when it leaves for another
  namespace (veth) or a device that cannot map it, so for 16-64 KB the ring
  costs two copies of the payload where one sendmsg straight from the
  store costs one (plus one system call, small next to 16 KB of copying).

PACKET_VNET_HDR puts a 10-byte `struct virtio_net_hdr` in front of every
frame in both rings. On TX it asks the device (or the kernel's software
fallback) to complete the TCP checksum (NEEDS_CSUM) and to cut TCPv4
super-frames of up to 64 KB (GSO); a TX slot is therefore ~64 KB when TSO is
usable. On RX it is how the kernel tells us a frame from a local sender still
has a partial checksum (CHECKSUM_PARTIAL, TP_STATUS_CSUMNOTREADY). Such a
frame never crossed a wire, and one with TP_STATUS_CSUM_VALID was checked by
the NIC or kernel: with `trust_csum` the ring reports both per frame
(`rx_csum_ok`) so the stack skips summing them; otherwise it finishes partial
checksums so the stack can verify every frame the same way.
PACKET_QDISC_BYPASS sends straight to the driver (no qdisc, no taps).
TPACKET_V2 is used because the kernel refuses PACKET_VNET_HDR with a V3 TX
ring. Offloads are read from the interface with the ethtool ioctl (the image
has no ethtool binary). With `fanout`, several sockets (one per worker
process) share the interface with PACKET_FANOUT_HASH (a flow hash keeps a TCP
connection on one worker); ARP is not a flow, so each worker then also has a
small RX-only ring bound to ETH_P_ARP that sees every ARP frame.

With `syn_port`, pure SYNs (IPv4 TCP, SYN without ACK or RST, to that port,
or to any of a tuple of ports: HTTP and HTTPS; IPv6 ones too where the
kernel gate can be loaded) get their own small RX-only ring: a classic BPF filter (SO_ATTACH_FILTER) on
each socket sends them there and everything else to the main ring, so a SYN
flood can neither fill the main ring (the kernel then drops established
connections' segments with the flood's) nor queue ahead of its frames.
Without a flood rx_batch reads the SYN ring after the main ring like any
other (a connection-per-request load pays nothing more for it). Under
pressure (`syn_gate.pressure`, set by the serve loop while the stack's SYN
backlog overflows) the SYN socket's filter becomes the kernel gate
(rings/ebpf.py, `kernel_gate`; the classic filter again when the flood is
over), which sheds in the kernel what Python would have shed, and
rx_batch empties the SYN ring on every call (when the mmap says a frame
waits: no system call) and hands over, after the main ring's frames,
what it holds (all: the kernel's buckets bound it). Where the kernel refuses the gate, the
SYN gate in Python (`syn_gate`, rings/base.py SynGate) chooses from the
ring instead: every SYN of a source that completed a handshake before,
every retransmission of a SYN it shed (within a bucket), and of the
others a budget (up to SYN_MIN when the read took nothing else, else one
per 64 main-ring frames plus 500/s), evenly drawn so that each has the
same odds (rx_syn_shed counts the rest; the kernel drops, counted as
kernel_syn_drops, only what arrives while the SYN ring is full). The loop
waits on every socket's fd in one poll (`filenos`), not on the epoll fd
around them (`fileno`), which costs a nested wake-up per frame. With
`fanout` the SYN sockets form a second PACKET_FANOUT_HASH group; every worker
joins both groups inside one lock (an abstract Unix socket name), so both
groups list the workers in the same order and a flow's SYN and its later
segments (a cookie's ACK) reach the same worker.
"""
from __future__ import annotations

import array
import errno
import fcntl
import mmap
import operator
import select
import socket
import struct
import time
from itertools import islice

from ..wire import csum
from .base import TRUSTED_BPF, Offload, SynGate
from .ebpf import COUNTERS as KGATE_COUNTERS, KernelSynGate
from .ebpf import unavailable as kernel_gate_unavailable

__all__ = ["TpacketDevice", "TpacketError", "InterfaceInfo", "interface_info", "read_offload"]

# <linux/if_packet.h>, <linux/if_ether.h>, <linux/sockios.h>, <linux/ethtool.h>
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_ALLMULTI = 2
PACKET_MR_UNICAST = 3
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_LOSS = 14
PACKET_TX_RING = 13
PACKET_VNET_HDR = 15
PACKET_FANOUT = 18
PACKET_QDISC_BYPASS = 20
PACKET_IGNORE_OUTGOING = 23
TPACKET_V2 = 1
PACKET_FANOUT_HASH = 0
SO_ATTACH_FILTER = 26
SYN_FRAMES = 4096                 # SYN ring slots: ~60 ms of a 65k SYN/s flood between two reads (a busy host)
SYN_FRAME = 512                   # holds any SYN (at most 134 bytes of headers) after the tpacket header
SYN_QUOTA = 256                   # SYNs kept per rx_batch at most (SynGate.quota)
SYN_MIN = 2                       # untrusted SYNs kept by a read without main-ring frames (SynGate.idle)
KGATE_TRUSTED = 16384 + TRUSTED_BPF   # the kernel gate's trusted sources: the stack's syn_trusted (TRUSTED_MAX)
KGATE_LINGER = 30.0               # s the kernel gate stays (passing every SYN) after a flood
KGATE_RETRY = 30.0                # s before another try when its maps could not be made
PACKET_OUTGOING = 4
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_LOSING = 4
TP_STATUS_CSUMNOTREADY = 8
TP_STATUS_CSUM_VALID = 0x80
TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 1
TP_STATUS_WRONG_FORMAT = 4

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_TCPV4 = 1       # (GSO.gso_type carries it: 4 for TCPV6)
VNET_HDR_LEN = 10                 # struct virtio_net_hdr (no num_buffers)

TPACKET2_HDR = struct.Struct("=IIIHH")   # tp_status, tp_len, tp_snaplen, tp_mac, tp_net
TPACKET2_DATA = 32                # TX data offset: tp_hdrlen - sizeof(sockaddr_ll)
SLL_PKTTYPE = 32 + 10             # sockaddr_ll.sll_pkttype follows the aligned header
VNET = struct.Struct("=BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
REQ = struct.Struct("=IIII")      # struct tpacket_req
STATUS = struct.Struct("=I")
STATUS_LEN = struct.Struct("=II")
MAC_OFF = struct.Struct("=H")     # tp_mac, at 12 in the tpacket2_hdr
ZERO_VNET = bytes(VNET_HDR_LEN)
ZERO4 = bytes(4)
_FIRST = operator.itemgetter(0)
BE16 = struct.Struct("!H")

SIOCGIFFLAGS = 0x8913
SIOCGIFADDR = 0x8915
SIOCGIFMTU = 0x8921
SIOCGIFHWADDR = 0x8927
SIOCETHTOOL = 0x8946
IFF_UP = 0x1
ETHTOOL_GTXCSUM = 0x16
ETHTOOL_GTSO = 0x1E
ETHTOOL_GGSO = 0x23

PAGE = mmap.PAGESIZE
RX_FRAME = 8192                   # an MTU frame, and GRO/GSO aggregates of up to 5 segments
RX_BLOCK = 1 << 17
SNDBUF = 8 << 20                  # the direct socket's send buffer
DIRECT_MIN = 16384                # bytes: a frame this big is sent by sendmsg, not through the ring
TX_FRAME_GSO = 65536 + 512        # a 64 KB GSO super-frame + virtio header + tpacket header
TX_BLOCK_GSO = 1 << 20            # 15 such frames per MiB block
TX_FRAME_SMALL = 2048
TX_BLOCK_SMALL = 1 << 16
PENDING_MAX = 4096                # frames waiting for room before new ones are dropped
_FULL = (errno.ENOBUFS, errno.EAGAIN, errno.EWOULDBLOCK)


class TpacketError(OSError):
    """The interface cannot be opened as a packet ring; the message says why."""


class InterfaceInfo:
    def __init__(self, name, index, mtu, mac, up, ipv4):
        self.name, self.index, self.mtu, self.mac, self.up, self.ipv4 = name, index, mtu, mac, up, ipv4


def _ifreq(name: str, tail: bytes = b"") -> bytes:
    raw = name.encode()
    if not raw or len(raw) > 15:
        raise TpacketError(errno.EINVAL, f"bad interface name {name!r}")
    return struct.pack("16s", raw) + tail.ljust(24, b"\0")


def interface_info(name: str) -> InterfaceInfo:
    """Index, MTU, MAC, up flag and kernel IPv4 address of an interface (ioctls).

    Raises TpacketError naming the interface if it does not exist.
    """
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        raise TpacketError(errno.ENODEV, f"interface {name!r} does not exist") from None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fd = s.fileno()
        flags = struct.unpack_from("=H", fcntl.ioctl(fd, SIOCGIFFLAGS, _ifreq(name)), 16)[0]
        mtu = struct.unpack_from("=i", fcntl.ioctl(fd, SIOCGIFMTU, _ifreq(name)), 16)[0]
        mac = fcntl.ioctl(fd, SIOCGIFHWADDR, _ifreq(name))[18:24]
        try:
            addr = fcntl.ioctl(fd, SIOCGIFADDR, _ifreq(name))
            ipv4 = socket.inet_ntoa(addr[20:24])
        except OSError:               # EADDRNOTAVAIL: no IPv4 address
            ipv4 = None
    return InterfaceInfo(name, index, mtu, bytes(mac), bool(flags & IFF_UP), ipv4)


def _ethtool_value(fd: int, name: str, cmd: int) -> bool:
    # struct ethtool_value {u32 cmd; u32 data}; ifr_data points at it. An
    # array's buffer_info gives its address without ctypes.
    buf = array.array("I", [cmd, 0])
    fcntl.ioctl(fd, SIOCETHTOOL, _ifreq(name, struct.pack("P", buf.buffer_info()[0])))
    return bool(buf[1])


def read_offload(name: str) -> Offload:
    """What the interface can complete for us: TX checksum, and TSO/GSO.

    tso means "a GSO_TCPV4 super-frame will be segmented": by the device (TSO)
    or by the kernel's software GSO, which is still far cheaper than
    segmenting in Python. It needs csum (Linux requires NEEDS_CSUM for GSO).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            csum = _ethtool_value(s.fileno(), name, ETHTOOL_GTXCSUM)
            tso = _ethtool_value(s.fileno(), name, ETHTOOL_GTSO) or \
                _ethtool_value(s.fileno(), name, ETHTOOL_GGSO)
        except OSError:               # EOPNOTSUPP: a driver without ethtool ops
            return Offload(False, False)
    return Offload(csum, csum and tso)


def _syn_filter(port, syn: bool, no_arp: bool = False, trusted=(), ipv6: bool = False) -> bytes:
    """A classic BPF program (struct sock_filter[]) over the Ethernet frame:
    accept (whole frame) an IPv4 TCP segment to `port` (an int, or a tuple of
    them: HTTP and HTTPS) with SYN and neither ACK nor RST, first fragment,
    any IHL, or with `ipv6` such an IPv6 segment (TCP the first next header:
    one behind extension headers stays with the others), if `syn`;
    otherwise accept exactly the other frames (but ARP, with
    `no_arp`: a fanout ring of all protocols beside the ARP ring; `port` None:
    no SYN ring, only that). A SYN from one of the `trusted` IPv4 sources
    (4-byte addresses, up to 2 x TRUSTED_BPF) counts as another frame: it goes
    to the main ring, ahead of a flood, and never waits in a full SYN ring."""
    yes, no = (0x40000, 0) if syn else (0, 0x40000)
    if port is None:
        ins = [(0x28, 0, 0, 12), (0x15, 0, 1, 0x0806), (0x06, 0, 0, 0), (0x06, 0, 0, 0x40000)]
        return b"".join(struct.pack("=HBBI", *i) for i in ins)
    ports = (port,) if isinstance(port, int) else tuple(port)
    # jump targets by label ("no", "flags", "drop"), resolved to relative offsets below
    ins = [(0x28, 0, 0, 12)]                                # ldh [12]            ethertype
    if no_arp:
        ins.append((0x15, "drop", 0, 0x0806))               # jeq #ARP, drop
    ins += [(0x15, 0, "v6" if ipv6 else "no", 0x0800),      # jeq #IPv4, , v6|no
            (0x30, 0, 0, 23),                               # ldb [23]            protocol
            (0x15, 0, "no", 6),                             # jeq #TCP, , no
            (0x28, 0, 0, 20),                               # ldh [20]            fragment offset
            (0x45, "no", 0, 0x1FFF),                        # jset #0x1fff, no
            (0xB1, 0, 0, 14),                               # ldxb 4*([14]&0xf)   IHL
            (0x48, 0, 0, 16)]                               # ldh [x+16]          destination port
    ins += [(0x15, "flags", 0, p) for p in ports[:-1]]      # jeq #port, flags
    ins += [(0x15, 0, "no", ports[-1]),                     # jeq #port, , no
            ("flags", 0x50, 0, 0, 27),                      # ldb [x+27]          flags
            (0x54, 0, 0, 0x16),                             # and #(ACK|RST|SYN)
            (0x15, 0, "no", 0x02),                          # jeq #SYN, , no
            (0x30, 0, 0, 41)]                               # ldb [41]: the end of the key the kernel
                                                            # gate reads (IHL < 5: drop, as it does)
    if trusted:
        ins.append((0x20, 0, 0, 26))                        # ld [26]             source address
        assert len(trusted) <= 2 * TRUSTED_BPF          # (a jump reaches 255 instructions at most)
        ins += [(0x15, "no", 0, int.from_bytes(a, "big")) for a in trusted]    # jeq #src, no
    if ipv6:
        ins += [(0x05, 0, 0, "yes"),                        # ja yes
                ("v6", 0x15, 0, "no", 0x86DD),              # jeq #IPv6, , no
                (0x30, 0, 0, 20),                           # ldb [20]            next header
                (0x15, 0, "no", 6),                         # jeq #TCP, , no
                (0x28, 0, 0, 56)]                           # ldh [56]            destination port
        ins += [(0x15, "flags6", 0, p) for p in ports[:-1]]
        ins += [(0x15, 0, "no", ports[-1]),
                ("flags6", 0x30, 0, 0, 67),                 # ldb [67]            flags
                (0x54, 0, 0, 0x16),
                (0x15, 0, "no", 0x02)]
    ins += [("yes", 0x06, 0, 0, yes),                       # ret #yes
            ("no", 0x06, 0, 0, no)]                         # ret #no
    if no_arp:
        ins.append(("drop", 0x06, 0, 0, 0))
    at = {}
    for k, i in enumerate(ins):
        if isinstance(i[0], str):
            at[i[0]] = k
            ins[k] = i[1:]
    out = []
    for k, (code, jt, jf, v) in enumerate(ins):
        jt = at[jt] - k - 1 if isinstance(jt, str) else jt
        jf = at[jf] - k - 1 if isinstance(jf, str) else jf
        v = at[v] - k - 1 if isinstance(v, str) else v      # (ja's target)
        out.append(struct.pack("=HBBI", code, jt, jf, v))
    return b"".join(out)


def _attach_filter(s, prog: bytes) -> None:
    # struct sock_fprog {unsigned short len; struct sock_filter *filter}; the
    # kernel copies the program, so the buffer only has to live through the call.
    buf = array.array("B", prog)
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HP", len(prog) // 8, buf.buffer_info()[0]))


class _FanoutLock:
    """A lock shared by the workers of one fanout group: an abstract Unix
    socket name can be bound by one socket at a time (no file, no cleanup)."""

    def __init__(self, group: int):
        self.name = b"\0haboob-fanout-%d" % group
        self.sock = None

    def __enter__(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 10
        while True:
            try:
                s.bind(self.name)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    s.close()
                    raise TpacketError(e.errno, f"fanout group {self.name[1:].decode()}: {e.strerror}") from None
                time.sleep(0.001)
        self.sock = s
        return self

    def __exit__(self, *exc):
        self.sock.close()


def _ring(frames: int, frame_size: int, block_size: int) -> tuple:
    per_block = block_size // frame_size
    blocks = max(1, -(-frames // per_block))
    return block_size, blocks, frame_size, blocks * per_block


def _slots(base: int, req: tuple) -> list:
    """Offsets of the ring's slots: a slot never straddles a block, so a
    block's tail beyond its last whole slot is unused."""
    block_size, blocks, frame_size, _ = req
    per_block = block_size // frame_size
    return [base + b * block_size + k * frame_size for b in range(blocks) for k in range(per_block)]


class _RxRing:
    """One RX ring (slots of `size` bytes at `base` in an mmap)."""

    def __init__(self, mm, base, req, runs: bool = False):
        self.mm = mm
        self.slots = _slots(base, req)
        self.nr = len(self.slots)
        self.mv = memoryview(mm)
        self.head = 0                 # next slot to look at
        self.st = None
        if runs:
            # (the SYN ring) slots back to back, a block holding whole slots: the
            # tp_status words are read and handed back a run at a time, through a
            # u32 view, in C rather than a slot at a time (see _take_syns)
            self.stride = size = req[2]
            if self.slots != list(range(base, base + self.nr * size, size)) or (base | size | len(mm)) % 4:
                raise ValueError(f"ring of {size}-byte slots: not back to back")
            self.st = self.mv.cast("I")
            self.zeros = memoryview(array.array("I", bytes(4 * self.nr)))
            self.key_st = None        # (offset, struct) of the SYN keys, once a frame told tp_mac

    def release(self):
        for v in (self.st, self.mv):
            if v is not None:
                try:
                    v.release()
                except BufferError:
                    pass


class TpacketDevice:
    """A Device (rings.base) on a Linux interface through TPACKET_V2 rings.

    Counters (`counters`, a dict) say what the ring did: frames in and out,
    frames dropped because truncated (tp_snaplen < tp_len) or our own
    outgoing ones, kicks, waits for a free TX slot, and kernel drops.
    """

    def __init__(self, iface: str, *, rx_frames: int = 1024, tx_frames: int = 120,
                 vnet: bool = True, qdisc_bypass: bool = True, fanout: int | None = None,
                 offload: Offload | None = None, unicast: bytes | None = None,
                 syn_port: int | tuple | None = None, syn_quota: int = SYN_QUOTA, allmulti: bool = False,
                 kernel_gate: bool | dict = True):
        info = interface_info(iface)
        self.iface = iface
        self.ifindex = info.index
        self.mac = info.mac
        self.mtu = info.mtu
        self.counters = dict(rx_frames=0, rx_truncated=0, rx_outgoing=0, rx_csum_completed=0, rx_syn_shed=0,
                             rx_syn_retransmits=0, rx_trusted_bpf_updates=0, rx_kernel_gates=0,
                             rx_kernel_gate_errors=0,
                             tx_frames=0, tx_bytes=0, tx_kicks=0, tx_kick_errors=0, tx_ring_waits=0,
                             tx_copied=0, tx_dropped_full=0, tx_dropped_error=0, tx_oversize=0, tx_direct=0,
                             tx_direct_full=0, tx_deferred=0)
        # Frames the kernel had no room for yet, in order: sent first by the next tx_batch.
        self.tx_pending = []
        # Frames of at least this many bytes (GSO super-frames) bypass the ring: see tx_batch.
        self.direct_min = DIRECT_MIN
        want = read_offload(iface) if offload is None else offload
        self._socks = []
        self._kstats = [0, 0, 0, 0]  # PACKET_STATISTICS summed over reads (see kernel_stats)
        self._syn_sock = None
        self._syn_ring = None
        # which SYNs a read keeps (rings/base.py); serve binds its `trusted` to the stack's table
        self.syn_gate = SynGate(quota=syn_quota, idle=SYN_MIN)
        # under pressure, the SYN ring's filter is an eBPF program that sheds in the
        # kernel (rings/ebpf.py); False: the classic filter and the Python gate only;
        # a dict: KernelSynGate's keyword arguments (tests: other budgets)
        self.kernel_gate = bool(kernel_gate)
        self._kgate_args = kernel_gate if isinstance(kernel_gate, dict) else {}
        self._kgate = None
        self.kernel_gate_error = None
        self._kgate_on = False        # the kernel gate exists and gates (under pressure)
        self._kgate_fresh = False     # just swapped in: what the ring held before goes through syn_gate
        self._kgate_off_t = 0.0       # when the last flood ended (the gate lingers KGATE_LINGER)
        self._kgate_retry = 0.0       # after a failed swap, not before this
        self._syn6 = False            # IPv6 SYNs take the SYN ring too (see _open)
        self._kstats_gate = {}        # the counters of the kernel gates closed so far
        self._rx = []
        self._rx_calm = []            # _rx and the SYN ring: what rx_batch reads when not under pressure
        self._mm = []
        self._epoll = None
        self._csock = None
        # trust_csum: instead of completing partial checksums, report per frame
        # in rx_csum_ok (parallel to the last rx_batch) whether the kernel
        # vouches for it, for a stack whose receive() takes csum_ok.
        self.trust_csum = False
        self.rx_csum_ok = []
        # IPv6 (allmulti) with a fanout: the main ring takes every protocol but ARP
        # (the ARP ring has it), not IPv4 only
        self._all_protocols = allmulti and fanout is not None
        try:
            self._open(rx_frames, tx_frames, vnet, qdisc_bypass, fanout, want, syn_port)
            if unicast is not None and bytes(unicast) != self.mac:
                # The stack answers for another MAC than the interface's: add it to
                # the NIC's unicast filter (a driver without one goes promiscuous by
                # itself). Dropped by the kernel when the socket closes.
                self.sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
                                     struct.pack("=iHH8s", self.ifindex, PACKET_MR_UNICAST, 6, bytes(unicast)))
            if allmulti:
                # IPv6: our solicited-node groups are joined by MLD from user space, which
                # the NIC's multicast filter (a real NIC's, QEMU virtio-net's) never hears
                # of; all multicast, released by the kernel when the socket closes.
                self.sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
                                     struct.pack("=iHH8s", self.ifindex, PACKET_MR_ALLMULTI, 0, b""))
        except BaseException:
            self.close()
            raise

    # -- set-up ---------------------------------------------------------

    def _open(self, rx_frames, tx_frames, vnet, qdisc_bypass, fanout, want, syn_port):
        proto = ETH_P_ALL if fanout is None or self._all_protocols else ETH_P_IP
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError:
            raise TpacketError(errno.EPERM, "AF_PACKET sockets need root (CAP_NET_RAW)") from None
        self._socks.append(s)
        self.sock = s
        s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        self.vnet = False
        if vnet:
            try:
                s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
                self.vnet = True
            except OSError:
                pass
        self.offload = want if self.vnet else Offload(False, False)
        if qdisc_bypass:
            try:
                s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            except OSError:           # before Linux 3.14
                pass
        try:
            s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        except OSError:               # before 4.20; we also check sll_pkttype
            pass
        # A malformed TX slot is skipped (set AVAILABLE) instead of stalling the ring.
        s.setsockopt(SOL_PACKET, PACKET_LOSS, 1)
        # RX slots: room for 5 MTU-sized segments (a jumbo MTU gets bigger slots)
        frame = RX_FRAME
        while frame < 5 * (self.mtu + 18) + 128 and frame < 65536 + 4096:
            frame *= 2
        rx = _ring(rx_frames, frame, max(RX_BLOCK, frame))
        if self.offload.tso:
            tx = _ring(tx_frames, TX_FRAME_GSO, TX_BLOCK_GSO)
        else:                         # MTU-sized frames only (a jumbo MTU gets bigger slots)
            small = TX_FRAME_SMALL
            while small < self.mtu + 14 + 4 + 128:
                small *= 2
            tx = _ring(max(tx_frames, 256), small, max(TX_BLOCK_SMALL, small))
        s.setsockopt(SOL_PACKET, PACKET_RX_RING, REQ.pack(*rx))
        s.setsockopt(SOL_PACKET, PACKET_TX_RING, REQ.pack(*tx))
        rx_len, tx_len = rx[0] * rx[1], tx[0] * tx[1]
        mm = mmap.mmap(s.fileno(), rx_len + tx_len, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._mm.append(mm)
        self.mm = mm
        self._rx.append(_RxRing(mm, 0, rx))
        self.tx_slots = _slots(rx_len, tx)
        self.tx_size, self.tx_nr = tx[2], len(self.tx_slots)
        self.tx_head = 0
        # Largest frame (without virtio header) a TX slot holds.
        self.max_frame = self.tx_size - TPACKET2_DATA - VNET_HDR_LEN
        if syn_port is None:
            self.kernel_gate = False
            if self._all_protocols:
                _attach_filter(s, _syn_filter(None, False, True))
            s.bind((self.iface, proto))
            if fanout is not None:
                # The kernel adds a socket to a fanout group only once it is bound
                # and running (fanout_add checks PACKET_SOCK_RUNNING), so after bind.
                s.setsockopt(SOL_PACKET, PACKET_FANOUT, (fanout & 0xFFFF) | (PACKET_FANOUT_HASH << 16))
        else:
            self._syn_ports, self._bpf_trusted = syn_port, ()
            if self.kernel_gate:      # can this kernel load the gate? (its maps are made under pressure only)
                self.kernel_gate_error = kernel_gate_unavailable()
                self.kernel_gate = self.kernel_gate_error is None
            # IPv6 SYNs take the SYN ring too where the kernel gate sheds them (the
            # Python gate keys SYNs by IPv4 offsets only)
            self._syn6 = self.kernel_gate and proto == ETH_P_ALL
            _attach_filter(s, self._filter(False))       # before bind: no SYN lands here
            y = self._syn_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self._socks.append(y)
            y.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            if self.vnet:             # rx_batch reads the virtio header of a partial checksum
                y.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            try:
                y.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            except OSError:
                pass
            _attach_filter(y, self._filter(True))
            yrx = _ring(SYN_FRAMES, SYN_FRAME, 1 << 16)
            y.setsockopt(SOL_PACKET, PACKET_RX_RING, REQ.pack(*yrx))
            ymm = mmap.mmap(y.fileno(), yrx[0] * yrx[1], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._mm.append(ymm)
            self._syn_ring = _RxRing(ymm, 0, yrx, runs=True)
            if fanout is None:
                y.bind((self.iface, proto))          # the SYN ring first: a SYN is never missed
                s.bind((self.iface, proto))
            else:
                # Both groups must list the workers in one order (the kernel picks
                # member hash % n of each): join them under the workers' lock.
                with _FanoutLock(fanout & 0xFFFF):
                    y.bind((self.iface, proto))
                    y.setsockopt(SOL_PACKET, PACKET_FANOUT, ((fanout ^ 0x8000) & 0xFFFF) | (PACKET_FANOUT_HASH << 16))
                    s.bind((self.iface, proto))
                    s.setsockopt(SOL_PACKET, PACKET_FANOUT, (fanout & 0xFFFF) | (PACKET_FANOUT_HASH << 16))
        if fanout is not None:
            a = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self._socks.append(a)
            a.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            if self.vnet:
                a.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            arx = _ring(32, 4096, 1 << 16)
            a.setsockopt(SOL_PACKET, PACKET_RX_RING, REQ.pack(*arx))
            amm = mmap.mmap(a.fileno(), arx[0] * arx[1], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._mm.append(amm)
            self._rx.append(_RxRing(amm, 0, arx))
            a.bind((self.iface, ETH_P_ARP))
            self._epoll = select.epoll()
            self._epoll.register(s.fileno(), select.EPOLLIN)
            self._epoll.register(a.fileno(), select.EPOLLIN)
        self._rx_calm = self._rx + ([self._syn_ring] if self._syn_ring is not None else [])
        if syn_port is not None:
            if self._epoll is None:
                self._epoll = select.epoll()
                self._epoll.register(s.fileno(), select.EPOLLIN)
            self._epoll.register(y.fileno(), select.EPOLLIN)

    # -- Device ---------------------------------------------------------

    def _filter(self, syn: bool, trusted=()) -> bytes:
        """The classic filter of the SYN ring (`syn`) or of the main ring."""
        return _syn_filter(self._syn_ports, syn, not syn and self._all_protocols, trusted, self._syn6)

    def fileno(self) -> int:
        return self._epoll.fileno() if self._epoll is not None else self.sock.fileno()

    def trust_sources(self, sources) -> bool:
        """Send the SYNs of these IPv4 sources (4-byte addresses, the first
        TRUSTED_BPF: the serve loop passes the stack's most recent syn_trusted
        during a flood) to the main ring instead of the SYN ring: a client that
        connects again and again (a connection-per-request load) is then read
        before the flood and never lost when the SYN ring is full, and costs
        the gate nothing. Both filters are replaced (SO_ATTACH_FILTER swaps a
        program atomically), in an order that can duplicate a SYN in the swap
        (the stack answers a duplicate) but never drop one. True if changed."""
        if self._syn_sock is None:
            return False
        new = tuple(sources)[:TRUSTED_BPF]
        old = self._bpf_trusted
        if set(new) == set(old):          # (the same sources in another order: the same filters)
            if self._kgate is not None:
                self._kgate_trust(new)    # (those that connected since)
            return False
        both = tuple(dict.fromkeys(old + new))
        main = self._socks[0]
        _attach_filter(main, self._filter(False, both))
        if self._kgate is not None:       # (its trusted map: entries come and go one by one)
            self._kgate_trust(new)
        else:
            _attach_filter(self._syn_sock, self._filter(True, new))
        _attach_filter(main, self._filter(False, new))
        self._bpf_trusted = new
        self.counters["rx_trusted_bpf_updates"] += 1
        return True

    def filenos(self) -> list:
        """The fds of every RX ring (main, SYN, ARP), for one poll(): cheaper than
        polling the epoll fd that fileno() gives (a second wake-up per frame)."""
        return [s.fileno() for s in self._socks if s is not self._csock]     # (it receives nothing)

    def rx_batch(self, max_frames: int = 256) -> list:
        """Frames in the RX ring(s), as bytes.

        Each frame is copied out of its slot (one small copy: requests and
        ACKs; the stack works on bytes anyway, slicing and summing bytes is
        cheaper than a memoryview) and the slot goes back to the kernel at
        once. Truncated frames (larger than a slot) and our own outgoing ones
        are counted and dropped; partial checksums are completed, or vouched
        for in rx_csum_ok with trust_csum. Runs once per wake-up: locals only.
        The SYN ring (syn_port) is read last: without pressure like the
        others, within max_frames; under pressure (a flood: syn_gate.pressure)
        it is emptied and adds what the gate keeps (see _take_syns) on top
        of max_frames: a flood never takes the main ring's share.
        """
        zero = ZERO4
        out = []
        append = out.append
        oks = self.rx_csum_ok
        oks.clear()
        ok_append = oks.append
        trust = self.trust_csum
        unpack = TPACKET2_HDR.unpack_from
        left = max_frames
        ncsum = 0
        syn = self._syn_ring
        # no flood: the SYN ring is read like the others, slot by slot (a connection-
        # per-request load pays nothing for it); under pressure the gate chooses (_take_syns)
        calm = syn is not None and not self.syn_gate.pressure
        if self.kernel_gate and calm is self._kgate_on:               # a flood began or ended
            self._turn_gate(not calm)
        for ring in (self._rx_calm if calm else self._rx):
            mm, mv, slots, nr = ring.mm, ring.mv, ring.slots, ring.nr
            i = ring.head
            taken = 0
            while taken < left:
                off = slots[i]
                status, length, snap, mac, _ = unpack(mm, off)
                if not status & TP_STATUS_USER:
                    break
                taken += 1
                i = i + 1 if i + 1 < nr else 0
                if snap < length or mm[off + SLL_PKTTYPE] == PACKET_OUTGOING:
                    self._odd_frame(snap < length)
                    mm[off:off + 4] = zero
                    continue
                st = off + mac
                if trust:
                    # The kernel vouches for the checksum: validated (CSUM_VALID),
                    # or partial from a local sender that never crossed a wire.
                    ok_append(status & (TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID) != 0)
                elif status & TP_STATUS_CSUMNOTREADY:
                    ncsum += self._complete_csum(mm, mv, st, snap)
                append(mm[st:st + snap])
                mm[off:off + 4] = zero    # TP_STATUS_KERNEL: the slot is the kernel's again
            ring.head = i
            left -= taken
        if syn is not None and not calm and syn.mm[syn.slots[syn.head]] & TP_STATUS_USER:   # SYNs waiting
            ncsum += self._take_syns(out, max_frames - left)
        c = self.counters
        c["rx_frames"] += len(out)
        if ncsum:
            c["rx_csum_completed"] += ncsum
        return out

    def _take_syns(self, out, others: int) -> int:
        """Empty the SYN ring; append to `out` the SYNs the gate lets through
        (SynGate, rings/base.py: every SYN of a trusted source, and within the
        budget for `others` main-ring frames an even draw of the rest, each
        with the same odds whatever its place: the kernel's tail drop,
        reading only the first few, would keep whichever burst comes right
        after a read, a flood's burst far more often than a client's lone
        SYN). The others are counted (rx_syn_shed) and their slots handed
        back unread. Returns how many partial checksums were completed."""
        ring = self._syn_ring
        mm, nr, st, stride = ring.mm, ring.nr, ring.st, ring.stride
        q = stride >> 2
        # the runs of slots the kernel filled, from the head: tp_status is 0
        # (TP_STATUS_KERNEL, as we hand it back) or TP_STATUS_USER with flags
        spans = []
        i = ring.head
        n = 0
        while n < nr:
            end = min(nr, i + 256, i + nr - n)          # a chunk, never past the ring's end
            lst = st[i * q:end * q:q].tolist()
            m = lst.index(0) if 0 in lst else len(lst)
            if m:
                spans.append((i, m))
                n += m
            i = i + m if i + m < nr else 0
            if m < len(lst):                            # a slot the kernel still owns
                break
        ring.head = i
        if not n:
            return 0
        gate = self.syn_gate
        if self._kgate_on and not self._kgate_fresh:
            # the kernel chose (rings/ebpf.py), within its buckets: all of it (a
            # retransmission it let through is answered once, so none is shed here)
            return self._hand_syns(ring, spans, [k for i0, m in spans for k in range(i0, i0 + m)], out)
        self._kgate_fresh = False         # (the SYNs queued before the kernel gate came: this gate's)
        now = time.monotonic()
        allow = gate.allow(others, now)
        if n > allow:
            # the SYNs' keys (IPv4 addresses, ports, ISN), a run at a time in C: every
            # frame here passed the filter (Ethernet, no VLAN tag), so the link header
            # is 14 bytes and tp_mac the same in every slot
            a = MAC_OFF.unpack_from(mm, spans[0][0] * stride + 12)[0] + 26
            ks = ring.key_st
            if ks is None or ks[0] != a:
                ks = ring.key_st = (a, struct.Struct(f"{a}x16s{stride - a - 16}x"))
            keys = []
            mv = ring.mv
            for i0, m in spans:
                keys += map(_FIRST, ks[1].iter_unpack(mv[i0 * stride:(i0 + m) * stride]))
            slots = [k for i0, m in spans for k in range(i0, i0 + m)]
            keep = [slots[k] for k in gate.pick(keys, allow, now)]
            c = self.counters
            c["rx_syn_shed"] += n - len(keep)
            c["rx_syn_retransmits"] = gate.retransmits
        else:
            gate.spend(n)
            keep = [k for i0, m in spans for k in range(i0, i0 + m)]
        return self._hand_syns(ring, spans, keep, out)

    def _hand_syns(self, ring, spans, keep, out) -> int:
        """Append the SYNs of slots `keep` to `out`, hand every slot of `spans` back."""
        mm, st, stride = ring.mm, ring.st, ring.stride
        q = stride >> 2
        ncsum = 0
        trust = self.trust_csum
        unpack = TPACKET2_HDR.unpack_from
        for k in keep:
            off = k * stride
            status, length, snap, mac, _ = unpack(mm, off)
            if snap < length or mm[off + SLL_PKTTYPE] == PACKET_OUTGOING:
                self._odd_frame(snap < length)
                continue
            s0 = off + mac
            if trust:
                self.rx_csum_ok.append(status & (TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID) != 0)
            elif status & TP_STATUS_CSUMNOTREADY:
                ncsum += self._complete_csum(mm, ring.mv, s0, snap)
            out.append(mm[s0:s0 + snap])
        zeros = ring.zeros
        for i0, m in spans:               # TP_STATUS_KERNEL, a run at a time
            st[i0 * q:(i0 + m) * q:q] = zeros[:m]
        return ncsum

    def _kgate_trust(self, main) -> None:
        """The kernel gate's trusted map: `main` (the main ring's filter has them)
        and the most recent others of syn_gate.trusted (the stack's syn_trusted)."""
        keep = islice(reversed(self.syn_gate.trusted), KGATE_TRUSTED - TRUSTED_BPF)
        try:
            self._kgate.set_trusted(main, keep)
        except OSError as e:              # (a full map cannot happen by construction; never stop the loop)
            self.kernel_gate_error = str(e)
            self.counters["rx_kernel_gate_errors"] += 1

    def _turn_gate(self, on: bool) -> None:
        """A flood began (`on`) or ended. The SYN ring's filter becomes the kernel
        gate (rings/ebpf.py) with fresh maps (~25 MB: a flood's only), or the
        gate there starts gating again; after the flood it passes every SYN, and
        housekeep() puts the classic filter back KGATE_LINGER later (so that a
        flood that comes and goes keeps its maps and its memory of SYNs).
        SO_ATTACH_BPF swaps a filter atomically, and both programs leave the
        same trusted sources to the main ring: no SYN is lost or doubled."""
        g = self._kgate
        if not on:
            g.set_pressure(False)
            self._kgate_on = False
            self._kgate_off_t = time.monotonic()
            return
        if g is not None:
            g.set_pressure(True)
            self._kgate_on = True
            self._kgate_fresh = self._syn_waiting()   # (let in while it passed every SYN)
            return
        now = time.monotonic()
        if now < self._kgate_retry:
            return
        try:
            g = KernelSynGate(self._syn_ports, **{"trusted_max": KGATE_TRUSTED, "ipv6": self._syn6,
                                                  **self._kgate_args})
        except (OSError, ValueError) as e:    # (out of memory, say): the Python gate, and again later
            self.kernel_gate_error = str(e)
            self.counters["rx_kernel_gate_errors"] += 1
            self._kgate_retry = now + KGATE_RETRY
            if self._syn6:                    # IPv6 SYNs back to the main ring (the Python gate keys
                self._syn6 = False            # IPv4 offsets), the main ring first: never lost
                _attach_filter(self._socks[0], self._filter(False, self._bpf_trusted))
                _attach_filter(self._syn_sock, self._filter(True, self._bpf_trusted))
            return
        self._kgate = g
        self._kgate_trust(self._bpf_trusted)
        g.attach(self._syn_sock)
        self._kgate_fresh = self._syn_waiting()       # SYNs the classic filter let in: the Python gate's
        self._kgate_on = True
        self.counters["rx_kernel_gates"] += 1

    def _syn_waiting(self) -> bool:
        ring = self._syn_ring
        return bool(ring.mm[ring.slots[ring.head]] & TP_STATUS_USER)

    def housekeep(self) -> None:
        """Once a second (the serve loop): the kernel gate goes KGATE_LINGER after a
        flood, its maps freed, and the classic filter is back."""
        g = self._kgate
        if g is None or self._kgate_on or time.monotonic() - self._kgate_off_t < KGATE_LINGER:
            return
        self._kgate = None
        _attach_filter(self._syn_sock, self._filter(True, self._bpf_trusted))
        self._close_gate(g)

    def _close_gate(self, g) -> None:
        k = self._kstats_gate
        try:
            for name, v in g.stats().items():
                k[name] = k.get(name, 0) + v
        finally:
            g.close()

    def _odd_frame(self, truncated: bool):
        self.counters["rx_truncated" if truncated else "rx_outgoing"] += 1

    def _complete_csum(self, mm, mv, start, length) -> int:
        """CHECKSUM_PARTIAL (a local sender; for a stack that does not take
        csum_ok): the TCP/UDP checksum field holds the folded pseudo-header sum;
        store the checksum from csum_start to the end (RFC 1071). Where that is
        comes from the virtio header, or without one from the IPv4 header.
        Returns 1 if done."""
        if self.vnet:
            fl, _, _, _, cs, co = VNET.unpack_from(mm, start - VNET_HDR_LEN)
            if not fl & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                return 0
        else:
            if length < 34 or mv[start + 12] != 8 or mv[start + 13] != 0:
                return 0
            cs = 14 + (mv[start + 14] & 15) * 4
            co = 16 if mv[start + 23] == 6 else 6
        if cs + co + 2 > length:
            return 0
        BE16.pack_into(mv, start + cs + co, csum(mv[start + cs:start + length]))
        return 1

    def tx_batch(self, frames) -> int:
        """Copy each Frame (head, payload, gso) into the TX ring, then one kick.

        Frames still waiting in `tx_pending` go first. Returns how many of
        `frames` were accepted: sent, or queued in `tx_pending` because the
        kernel has no room now (backpressure, see below). A frame too large
        for a slot is counted (tx_oversize) and skipped. The kernel frees a
        slot only when the skb that maps its pages is freed; on veth that is
        when the receiving application has read the data, so a slow reader
        can hold the slot at the ring's head. Rather than stall every
        connection behind it, the rest of the batch is then sent through an
        ordinary packet socket (one copy and one system call per frame,
        counted as tx_copied). If that socket's buffer is full too, the rest
        waits in `tx_pending` (counted tx_deferred) for the next call.
        Frames of at least `direct_min` bytes always take that socket
        (tx_direct), after a kick for the slots filled before them so that
        frames leave in order; if its buffer is full they use the ring.
        """
        given = len(frames)
        pend = self.tx_pending
        if pend:
            frames = pend + list(frames)    # the waiting frames keep their place in front
            pend.clear()
        mm = self.mm
        slots, nr = self.tx_slots, self.tx_nr
        i = self.tx_head
        vnet = self.vnet
        status_of = STATUS.unpack_from
        pack_vnet = VNET.pack_into
        pack_sl = STATUS_LEN.pack_into
        limit = self.max_frame
        data0 = TPACKET2_DATA + VNET_HDR_LEN if vnet else TPACKET2_DATA
        sent = nbytes = lost = 0
        rest = None
        direct_min = self.direct_min
        queued = 0                    # slots filled since the last kick
        for k, (head, payload, gso) in enumerate(frames):
            hl = len(head)
            total = hl + (len(payload) if payload is not None else 0)
            if total > limit:
                self.counters["tx_oversize"] += 1
                lost += 1
                continue
            if total >= direct_min and payload is not None:
                # A big super-frame: one system call and one copy (the kernel's,
                # straight from the store) instead of ours into the slot plus the
                # kernel's own copy of a ring slot's pages when the skb leaves
                # for another namespace (zero-copy skbs are orphaned there).
                # Slots filled so far go first: a connection's order is kept.
                if queued:
                    self._kick()
                    queued = 0
                if self._send_direct(head, payload, gso):
                    sent += 1
                    nbytes += total
                    continue
                # socket buffer full (a slow real NIC): this one goes through the ring
            off = slots[i]
            if mm[off]:               # not TP_STATUS_AVAILABLE (TX states all fit the low byte)
                self.counters["tx_ring_waits"] += 1
                # Kick: frames queued earlier (also by a kick that failed) go
                # out, and completions they allow free the slot.
                self._kick()
                if status_of(mm, off)[0] == TP_STATUS_WRONG_FORMAT:
                    STATUS.pack_into(mm, off, TP_STATUS_AVAILABLE)
                if status_of(mm, off)[0] != TP_STATUS_AVAILABLE:
                    rest = k
                    break
            d = off + data0
            mm[d:d + hl] = head
            if payload is not None:
                mm[d + hl:d + total] = payload
            if vnet:
                # hdr_len = the whole frame: the kernel copies it into the skb's
                # linear part instead of pointing the skb at the slot's pages,
                # which veth would copy again (onto a fresh page) for the peer.
                # Not for GSO super-frames: up to 64 KB in one linear allocation
                # (high-order pages) can fail where page-sized frags do not, and
                # did, stalling a transfer through the impairment forwarder.
                if gso is None:
                    pack_vnet(mm, off + TPACKET2_DATA, 0, 0, total, 0, 0, 0)
                elif not gso[2]:
                    pack_vnet(mm, off + TPACKET2_DATA, VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, total, 0, gso[0], gso[1])
                else:
                    pack_vnet(mm, off + TPACKET2_DATA, VIRTIO_NET_HDR_F_NEEDS_CSUM, gso[4],
                              gso[3], gso[2], gso[0], gso[1])
                pack_sl(mm, off, TP_STATUS_SEND_REQUEST, total + VNET_HDR_LEN)
            else:
                pack_sl(mm, off, TP_STATUS_SEND_REQUEST, total)
            i = i + 1 if i + 1 < nr else 0
            sent += 1
            queued += 1
            nbytes += total
        self.tx_head = i
        c = self.counters
        if queued:
            self._kick()
        if sent:
            c["tx_frames"] += sent
            c["tx_bytes"] += nbytes
        if rest is not None:
            done, dropped = self._copy_send(frames, rest)
            lost += dropped
            if done < len(frames):
                # No room anywhere: backpressure. These frames (in order) wait
                # for the next pass instead of being lost to a retransmission.
                wait = frames[done:]
                if len(wait) > PENDING_MAX:
                    c["tx_dropped_full"] += len(wait) - PENDING_MAX
                    lost += len(wait) - PENDING_MAX
                    del wait[PENDING_MAX:]
                c["tx_deferred"] += len(wait)
                pend.extend(wait)
        return max(0, given - lost)

    def _send_direct(self, head, payload, gso) -> int:
        """One frame through the ring-less packet socket; 1 if sent."""
        s = self._csock or self._open_csock()
        try:
            s.sendmsg(self._sock_parts(head, payload, gso), [], socket.MSG_DONTWAIT)
        except OSError:               # EAGAIN/ENOBUFS: the caller uses the ring instead
            self.counters["tx_direct_full"] += 1
            return 0
        self.counters["tx_direct"] += 1
        return 1

    def _sock_parts(self, head, payload, gso) -> list:
        """A Frame as sendmsg's buffers on the ring-less socket: the virtio header
        (with the socket's PACKET_VNET_HDR), the head, the payload."""
        parts = [head] if payload is None else [head, payload]
        if self.vnet:
            parts.insert(0, ZERO_VNET if gso is None else VNET.pack(
                VIRTIO_NET_HDR_F_NEEDS_CSUM, gso[4] if gso[2] else 0,
                gso[3], gso[2], gso[0], gso[1]))
        return parts

    def _open_csock(self):
        s = self._csock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self._socks.append(s)
        if self.vnet:
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        try:
            s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        except OSError:
            pass
        s.bind((self.iface, 0))       # protocol 0: this socket receives nothing
        for opt in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
            try:                      # room for a batch of super-frames until the NIC frees them
                s.setsockopt(socket.SOL_SOCKET, opt, SNDBUF)
                break
            except OSError:
                pass
        return s

    def _copy_send(self, frames, start: int = 0) -> tuple:
        """Send frames[start:] through a ring-less packet socket (the kernel copies
        them) until its buffer is full. Returns (index of the first frame not
        sent, frames dropped for an error other than a full buffer)."""
        s = self._csock or self._open_csock()
        c = self.counters
        n = dropped = 0
        k = start
        end = len(frames)
        while k < end:
            try:
                c["tx_bytes"] += s.sendmsg(self._sock_parts(*frames[k]), [], socket.MSG_DONTWAIT)
            except OSError as e:
                if e.errno in _FULL:  # no room now: the caller keeps frames[k:] for later
                    break
                c["tx_dropped_error"] += 1  # EMSGSIZE and the like: this frame can never go
                dropped += 1
                k += 1
                continue
            n += 1
            k += 1
        c["tx_copied"] += n
        c["tx_frames"] += n
        return k, dropped

    def _kick(self):
        self.counters["tx_kicks"] += 1
        try:
            self.sock.send(b"", socket.MSG_DONTWAIT)
        except OSError:               # ENOBUFS and the like: the slots stay queued for the next kick
            self.counters["tx_kick_errors"] += 1

    # -- the rest -------------------------------------------------------

    def kernel_stats(self) -> dict:
        """PACKET_STATISTICS (packets seen, dropped for lack of a free RX slot)
        since the device was opened: the main and ARP rings, and apart
        (kernel_syn_*) the SYN ring. The kernel resets them on every read, so
        they are summed here: live counters may ask as often as they like."""
        k = self._kstats
        for s in self._socks:
            try:
                p, d = struct.unpack("=II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
            except OSError:
                continue
            j = 2 if s is self._syn_sock else 0
            k[j] += p
            k[j + 1] += d
        out = {"kernel_rx_packets": k[0], "kernel_rx_drops": k[1]}
        if self._syn_sock is not None:
            out["kernel_syn_packets"], out["kernel_syn_drops"] = k[2], k[3]
            live = self._kgate.stats() if self._kgate is not None else {}
            for name in KGATE_COUNTERS:       # (the kernel gate's: those it shed never reached the ring)
                out[name] = self._kstats_gate.get(name, 0) + live.get(name, 0)
        return out

    def close(self):
        if self._kgate is not None:
            self._kgate.close()
            self._kgate = None
        for r in self._rx:
            r.release()
        self._rx = []
        self._rx_calm = []
        if self._syn_ring is not None:
            self._syn_ring.release()
            self._syn_ring = None
        for mm in self._mm:
            try:
                mm.close()
            except BufferError:       # a frame view still alive somewhere; the GC will unmap
                pass
        self._mm = []
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        for s in self._socks:
            s.close()
        self._socks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

