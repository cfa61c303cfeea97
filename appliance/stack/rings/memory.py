"""An in-memory Device pair for tests: what one end transmits, the other receives.

Theory of operation: `MemoryLink(offload=...)` has two ends. `link.dev` is the
Device the stack's loop uses; `link.peer` is the test's end of the wire
(`send(bytes)`, `recv() -> list[bytes]`). Frames the device transmits with a
GSO descriptor are completed exactly as the kernel would for a packet socket
with PACKET_VNET_HDR (`virtio_complete`): the checksum is finished from
`csum_start`, and GSO super-frames are cut into `gso_size` segments with
per-segment IP total length, IP id, IP checksum, TCP sequence number, flags
and checksum. So the peer always sees ordinary wire frames, and tests can
check every one of them; `link.dev.raw` keeps what the stack actually handed
to the device.
"""
import struct
from collections import deque

from .base import Offload, frame_bytes

__all__ = ["MemoryLink", "MemoryDevice", "virtio_complete"]


def _csum(data) -> int:
    if len(data) & 1:
        data = bytes(data) + b"\0"
    return (-int.from_bytes(data, "big")) % 0xFFFF


def _finish(buf: bytearray, start: int, offset: int) -> None:
    """NEEDS_CSUM: sum from `start` to the end (field holds the pseudo sum) and store the complement."""
    c = _csum(buf[start:])
    buf[start + offset:start + offset + 2] = c.to_bytes(2, "big")


def virtio_complete(frame) -> list:
    """The wire frames a Linux packet socket produces from one `Frame` (see base.py)."""
    head, payload, gso = frame
    data = bytearray(frame_bytes(frame))
    if gso is None:
        return [bytes(data)]
    if not gso.gso_size:
        _finish(data, gso.csum_start, gso.csum_offset)
        return [bytes(data)]
    # GSO TCPv4 (Linux tcp_gso_segment / inet_gso_segment): the super-frame's
    # TCP checksum field holds the pseudo sum for its whole length; each
    # segment gets its own.
    ip = 14
    hl = gso.hdr_len
    tcp = gso.csum_start
    thl = hl - tcp
    src, dst = bytes(data[ip + 12:ip + 16]), bytes(data[ip + 16:ip + 20])
    ip_id = struct.unpack_from("!H", data, ip + 4)[0]
    seq = struct.unpack_from("!I", data, tcp + 4)[0]
    flags = data[tcp + 13]
    body = data[hl:]
    out = []
    chunks = [body[i:i + gso.gso_size] for i in range(0, len(body), gso.gso_size)] or [b""]
    v6 = data[12:14] == b"\x86\xdd"
    if v6:                      # GSO TCPv6 (tcp6_gso_segment): payload length per segment
        src, dst = bytes(data[ip + 8:ip + 24]), bytes(data[ip + 24:ip + 40])
    for i, chunk in enumerate(chunks):
        seg = bytearray(data[:hl]) + chunk
        last = i == len(chunks) - 1
        if v6:
            struct.pack_into("!H", seg, ip + 4, hl - tcp + len(chunk))
        else:
            struct.pack_into("!HH", seg, ip + 2, hl - ip + len(chunk), (ip_id + i) & 0xFFFF)
            seg[ip + 10:ip + 12] = b"\0\0"
            seg[ip + 10:ip + 12] = _csum(seg[ip:tcp]).to_bytes(2, "big")
        struct.pack_into("!I", seg, tcp + 4, (seq + i * gso.gso_size) & 0xFFFFFFFF)
        f = flags
        if not last:
            f &= ~0x09          # FIN and PSH only on the last segment
        if i:
            f &= ~0x80          # CWR only on the first
        seg[tcp + 13] = f
        pseudo = int.from_bytes(src + dst, "big") + 6 + thl + len(chunk)
        seg[tcp + 16:tcp + 18] = b"\0\0"
        c = (-(pseudo + int.from_bytes(bytes(seg[tcp:]) + (b"\0" if len(seg[tcp:]) & 1 else b""), "big"))) % 0xFFFF
        seg[tcp + 16:tcp + 18] = c.to_bytes(2, "big")
        out.append(bytes(seg))
    return out


class MemoryDevice:
    """The stack's end of a MemoryLink (implements rings.base.Device)."""

    def __init__(self, link, mac: bytes, mtu: int, offload: Offload):
        self.mac = mac
        self.mtu = mtu
        self.offload = offload
        self._link = link
        self.raw = []            # every Frame handed to tx_batch, as given (tests inspect them)
        self.keep_raw = True

    def fileno(self) -> int:
        return -1

    def rx_batch(self, max_frames: int = 256) -> list:
        q = self._link.to_dev
        n = min(max_frames, len(q))
        return [memoryview(q.popleft()) for _ in range(n)]

    def tx_batch(self, frames: list) -> int:
        out = self._link.to_peer
        for fr in frames:
            if self.keep_raw:
                self.raw.append((bytes(fr[0]), None if fr[1] is None else bytes(fr[1]), fr[2]))
            gso = fr[2]
            if gso is not None and ((gso.gso_size and not self.offload.tso) or not self.offload.csum):
                raise ValueError(f"frame needs offload {gso} the device does not have {self.offload}")
            out.extend(virtio_complete(fr))
        return len(frames)


class Peer:
    """The test's end of a MemoryLink."""

    def __init__(self, link):
        self._link = link

    def send(self, frame) -> None:
        self._link.to_dev.append(bytes(frame))

    def recv(self) -> list:
        q = self._link.to_peer
        out = list(q)
        q.clear()
        return out


class MemoryLink:
    def __init__(self, mac: bytes = b"\x02\x00\x00\x00\x00\x01", mtu: int = 1500,
                 offload: Offload = Offload()):
        self.to_dev = deque()
        self.to_peer = deque()
        self.dev = MemoryDevice(self, mac, mtu, offload)
        self.peer = Peer(self)
