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

`SynGate` is the SYN-flood budget shared by the TPACKET SYN ring (where the
kernel refuses its eBPF gate, rings/ebpf.py, which applies the same policy
in front of the ring) and the serve loop's overloaded passes: which pure
SYNs of a read are handed to the stack and which are shed (see its
docstring).
"""
import random
from operator import itemgetter
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["Offload", "GSO", "Frame", "Device", "NO_OFFLOAD", "frame_bytes", "SynGate"]

_SRC = itemgetter(slice(0, 4))      # a SYN key's IPv4 source
TRUSTED_BPF = 64                    # trusted sources a SYN ring's filters send to the main ring (tpacket)


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


def _refill(tokens: float, t, now: float, rate: float, burst: float) -> float:
    """A token bucket's tokens at `now`, last filled at `t` (None: never)."""
    if t is not None and now > t:
        tokens += (now - t) * rate
        if tokens > burst:
            tokens = burst
    return tokens


class SynGate:
    """How many pure SYNs of one read the stack may answer, and which (RFC 4987).

    Answering a SYN (a cookie and a SYN-ACK, ~5 µs of Python) costs as much
    as serving several segments of an established connection, so a flood the
    core cannot absorb must not get the core. Without `pressure` (the serve
    loop sets it while the stack's SYN backlog has overflowed recently, see
    Stack.under_pressure) every SYN is kept, up to `quota` a read. Under
    pressure, per read, with `others` frames of known connections
    (everything that is not a pure SYN) taken in it:

    - SYNs from a trusted source are all kept (at most `quota`): `trusted` is
      the stack's table of sources that completed a handshake
      (Stack.syn_trusted; this gate keys IPv4 SYNs only, so its 4-byte
      entries). A spoofed source never does: it cannot see our
      SYN-ACK. So clients that connected before, a connection-per-request
      load above all, are not shed with a flood. (An attacker who knows a
      client's address can spoof it and get `quota` SYNs per read through.)
    - A SYN that repeats one seen 1-4 s before (the same addresses, ports
      and ISN: a client's retransmission after its initial RTO, 1 s by
      RFC 6298 §2, 3 s on older stacks) is kept too, once in 4 s, within a
      token bucket of its own (`retry_rate` a second): a first-time client
      is in on its first retransmission whatever the flood, while a random
      flood's SYNs never repeat, and one that replays them gets at most
      `retry_rate` answers a second. The memory: the keys of the SYNs seen
      under pressure, in generations of GEN_S (1 s) or GEN_MAX keys,
      whichever ends first; a repeat counts when its key is in one of the
      GENS older generations (not the current one: a copy sent at once is
      no retransmission, unless a generation ended between the two). Set
      operations, so a SYN costs a few hash probes in C; at most
      (GENS + 1) x GEN_MAX keys (~85 bytes each: 22 MB) are held, and
      beyond GEN_MAX SYN/s the generations are shorter, so the oldest
      repeats are missed first (a 1 s one is still found up to ~190,000
      SYN/s).
    - Other SYNs get a budget: `idle` when the read had nothing else (the
      core has nothing better to do, so an idle server answers a flood at
      full speed), else one per `share` frames of known connections (a
      share of the busy core's work) plus a token bucket of `rate` per
      second (a floor for new clients whatever the load). Beyond the budget
      they are shed, each with the same odds (budget / such SYNs of the
      read): an evenly spaced comb from a random offset, so neither the
      flood's bursts nor a lone client's place in the ring decides.

    `pick` takes each SYN's `key`, its bytes 26-42 (IPv4 source and
    destination, ports, sequence number); `now` is passed in (the ring reads
    the monotonic clock, tests a fake one). `retransmits` counts the SYNs
    kept as retransmissions.
    """

    GEN_S = 1.0                      # a generation of remembered SYNs lasts at most 1 s,
    GEN_MAX = 65536                  # and holds at most this many keys
    GENS = 3                         # older generations a repeat is looked up in

    def __init__(self, quota: int = 256, idle: int = 2, share: int = 64, rate: float = 500.0,
                 burst: int = 16, retry_rate: float = 4000.0, retry_burst: int = 64, rng=None):
        self.quota, self.idle, self.share, self.rate, self.burst = quota, idle, share, rate, burst
        self.retry_rate, self.retry_burst = retry_rate, retry_burst
        self.trusted = {}           # IPv4 source (4 bytes) -> None; Stack.syn_trusted once the loop binds it
                                    # (which also holds IPv6 /64s, 8 bytes: for the kernel gate)
        self.pressure = False       # a flood: the budget applies (set by the serve loop every pass)
        self.rng = rng or random.Random()
        self.retransmits = 0
        self._tokens = 0.0
        self._t = None
        self._base = 0
        self._cur = set()           # keys of the SYNs seen in this generation
        self._cur_t = None          # when it began
        self._old = []              # the GENS generations before, newest first
        self._done = set()          # keys answered as retransmissions in this generation
        self._done_old = []         # and in the GENS before
        self._rtokens = float(retry_burst)
        self._rt = None

    def allow(self, others: int, now: float) -> int:
        """The untrusted SYNs this read may keep; then spend() what was kept."""
        if not self.pressure:
            self._base = self.quota
            return self.quota
        tok = self._tokens = _refill(self._tokens, self._t, now, self.rate, self.burst)
        self._t = now
        base = self._base = self.idle if others <= 0 else others // self.share
        a = base + int(tok)
        return a if a < self.quota else self.quota

    def spend(self, kept: int) -> None:
        over = kept - self._base
        if over > 0:
            self._tokens -= over

    def _turn(self, now: float) -> None:
        """A new generation when the current one is GEN_S old or GEN_MAX full;
        everything is forgotten after GENS + 1 generations without a flood."""
        t = self._cur_t
        if t is not None and now - t < self.GEN_S and len(self._cur) < self.GEN_MAX:
            return
        if t is None or now - t >= (self.GENS + 1) * self.GEN_S:
            self._old = []
            self._done_old = []
        else:
            self._old = [self._cur] + self._old[:self.GENS - 1]
            self._done_old = [self._done] + self._done_old[:self.GENS - 1]
        self._cur = set()
        self._done = set()
        self._cur_t = now

    def sample(self, items: list, take: int) -> list:
        """`take` of `items` (take < len), evenly spaced from a random offset, in order."""
        n = len(items)
        step = n / take
        start = self.rng.random() * n
        return [items[k] for k in sorted({int(start + j * step) % n for j in range(take)})]

    def forget(self, now: float) -> None:
        """Drop the memory of SYNs once a flood is over (the serve loop calls
        this once a second: pick() alone only turns generations while SYNs come)."""
        t = self._cur_t
        if t is not None and now - t >= (self.GENS + 1) * self.GEN_S:
            self._cur, self._old, self._done, self._done_old = set(), [], set(), []
            self._cur_t = None

    def pick(self, keys: list, allow: int, now: float = 0.0) -> list:
        """Indices (in order) of the SYNs to keep, from their keys (arrival
        order) when there are more than `allow`: every trusted one and every
        retransmission (up to quota, the latter within their bucket), and
        `allow` of the others evenly drawn. Spends."""
        n = len(keys)
        trusted = self.trusted
        tf = list(map(trusted.__contains__, map(_SRC, keys))) if trusted else ()
        if True in tf:
            keep = [k for k in range(n) if tf[k]]
            other = [k for k in range(n) if not tf[k]]
            ukeys = [keys[k] for k in other]
        else:
            keep = []
            other = list(range(n))
            ukeys = keys
        self._turn(now)
        hits = None
        for g in self._old:
            h = g.intersection(ukeys)
            if h:
                hits = h if hits is None else hits | h
        self._cur.update(ukeys)
        if hits:
            done = self._done
            hits -= done
            for d in self._done_old:
                hits -= d
        if hits:
            rtok = _refill(self._rtokens, self._rt, now, self.retry_rate, self.retry_burst)
            self._rt = now
            hj = [j for j, key in enumerate(ukeys) if key in hits]
            m = len(hj)
            take = min(m, int(rtok))
            if take:
                if take < m:            # an even draw here too: a replaying flood's place decides nothing
                    hj = self.sample(hj, take)
                self._rtokens = rtok - len(hj)
                self.retransmits += len(hj)
                done.update(ukeys[j] for j in hj)
                keep += [other[j] for j in hj]
                hs = set(hj)
                other = [o for j, o in enumerate(other) if j not in hs]
            else:
                self._rtokens = rtok
        if len(keep) > self.quota:
            keep = keep[:self.quota]
        if len(other) > allow:
            other = self.sample(other, allow) if allow > 0 else []
        self.spend(len(other))
        keep += other
        keep.sort()
        return keep
