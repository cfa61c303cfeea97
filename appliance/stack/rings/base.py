"""The Device interface between the stack and a NIC ring, and the Frame type.

Theory of operation: the stack never performs I/O. It consumes received
frames (bytes-like, usually memoryviews into a ring) and produces `Frame`
tuples in `Stack.txq`; a backend moves them in batches (one wake-up per
batch). A Frame is

    (head, payload, gso)

- `head`: the Ethernet+IPv4+TCP headers, possibly followed by the first bytes
  of the TCP payload (e.g. the patched HTTP header block), or a whole small
  frame. Always a bytes-like object owned by the frame.
- `payload`: None, or a bytes-like (usually a memoryview slice of the content
  store's blob) that the device appends after `head`: this is the one copy of
  response bytes, into the ring.
- `gso`: None when the frame is complete (all checksums filled). Otherwise a
  `GSO` tuple and the device must prepend a virtio_net_hdr (PACKET_VNET_HDR):
  flags VIRTIO_NET_HDR_F_NEEDS_CSUM with `csum_start`/`csum_offset` (the TCP
  checksum field then holds the folded, *not* complemented, pseudo-header sum
  including the TCP length of the whole frame, as Linux expects for
  CHECKSUM_PARTIAL), and when `gso_size` > 0, `gso_type` (TCPV4, or TCPV6
  for IPv6 frames) with `hdr_len`
  (the length of Ethernet+IP+TCP headers): a super-frame of up to 64 KB that
  the kernel or NIC cuts into `gso_size` payloads (IP id incremented per
  segment, PSH/FIN only on the last one, as Linux's tcp_gso_segment does;
  for IPv6 the payload length per segment, there is no id or header checksum).

`Offload` says what the device can do; the stack only emits gso frames for
capabilities that are set (csum for NEEDS_CSUM, tso for gso_size > 0).
"""
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["Offload", "GSO", "Frame", "Device", "NO_OFFLOAD", "frame_bytes"]


class Offload(NamedTuple):
    csum: bool = False      # the device completes TCP checksums (NEEDS_CSUM)
    tso: bool = False       # the device segments TCPv4 super-frames (GSO_TCPV4); implies csum


NO_OFFLOAD = Offload(False, False)


class GSO(NamedTuple):
    csum_start: int         # offset of the TCP header in the frame
    csum_offset: int        # offset of the checksum field from csum_start (16 for TCP)
    gso_size: int           # payload bytes per segment; 0 = checksum offload only
    hdr_len: int            # Ethernet+IP+TCP header length (for GSO)
    gso_type: int = 1       # virtio_net_hdr gso_type: 1 TCPV4, 4 TCPV6


Frame = tuple  # (head: bytes-like, payload: bytes-like | None, gso: GSO | None)


def frame_bytes(frame) -> bytes:
    """The frame's bytes as the device would put them in the ring (without virtio header)."""
    head, payload, _ = frame
    return bytes(head) + bytes(payload) if payload is not None else bytes(head)


@runtime_checkable
class Device(Protocol):
    mtu: int                # IP MTU (1500 on Ethernet)
    offload: Offload        # what is actually usable on this device
    mac: bytes              # 6 bytes

    def fileno(self) -> int:
        """A file descriptor for poll/select; -1 for in-memory devices."""

    def rx_batch(self, max_frames: int = 256) -> list:
        """Frames received (bytes-like), valid until the next rx_batch call."""

    def tx_batch(self, frames: list) -> int:
        """Send `Frame` tuples; returns how many were sent (the rest may be retried)."""
