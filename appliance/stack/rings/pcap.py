"""A Device wrapper that records every frame crossing any backend to a pcap file.

Theory of operation: `PcapDevice(dev, path)` is itself a Device. It forwards
rx_batch/tx_batch to `dev` and appends each frame to a classic pcap file
(libpcap format 2.4, LINKTYPE_ETHERNET, microsecond timestamps) that
tcpdump, Wireshark and scapy read. Transmitted frames that carry a GSO
descriptor are recorded as the wire will see them: checksum completed and
super-frames cut into segments (rings.memory.virtio_complete, the same
rules as Linux), so a capture never shows "bad checksum" artefacts of
offloading. Recording costs a copy per frame; it is a debugging aid, off by
default. Frames are written through a buffered file and flushed on close;
the header is written first so a capture of a run that crashed is still
readable up to its last flush.
"""
import struct
import time

from .memory import virtio_complete

__all__ = ["PcapDevice", "PcapWriter"]

LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
_GLOBAL = struct.Struct("=IHHiIII")
_RECORD = struct.Struct("=IIII")


class PcapWriter:
    """Append Ethernet frames to a pcap file."""

    def __init__(self, path: str):
        self._f = open(path, "wb")
        self._f.write(_GLOBAL.pack(0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        self.frames = 0

    def write(self, frame, ts: float) -> None:
        n = len(frame)
        sec = int(ts)
        f = self._f
        f.write(_RECORD.pack(sec, int((ts - sec) * 1e6), min(n, SNAPLEN), n))
        f.write(frame[:SNAPLEN] if n > SNAPLEN else frame)
        self.frames += 1

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class PcapDevice:
    """Wraps a Device; records what it receives and transmits to `path`."""

    def __init__(self, dev, path: str):
        self.dev = dev
        self.writer = PcapWriter(path)

    # Device attributes are the wrapped device's.
    def __getattr__(self, name):
        return getattr(self.dev, name)

    @property
    def mtu(self):
        return self.dev.mtu

    @property
    def offload(self):
        return self.dev.offload

    @property
    def mac(self):
        return self.dev.mac

    @property
    def trust_csum(self):
        return self.dev.trust_csum

    @trust_csum.setter
    def trust_csum(self, on):
        self.dev.trust_csum = on

    def fileno(self) -> int:
        return self.dev.fileno()

    def rx_batch(self, max_frames: int = 256) -> list:
        frames = self.dev.rx_batch(max_frames)
        if frames:
            ts = time.time()
            w = self.writer.write
            for f in frames:
                w(f, ts)
        return frames

    def tx_batch(self, frames) -> int:
        frames = list(frames)
        n = self.dev.tx_batch(frames)
        if n:
            ts = time.time()
            w = self.writer.write
            for fr in frames[:n]:
                for seg in virtio_complete(fr):
                    w(seg, ts)
        return n

    def close(self) -> None:
        self.writer.close()
        close = getattr(self.dev, "close", None)
        if close:
            close()
