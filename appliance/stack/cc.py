"""Congestion control: slow start, congestion avoidance, fast retransmit and
NewReno fast recovery (RFC 5681, RFC 6582), initial window per RFC 6928.

Theory of operation: the connection calls `on_ack(acked, flight, snd_una)`
for every ACK of new data, `on_dupack(flight)` for every duplicate ACK and
`on_timeout(flight)` when the retransmission timer fires; the return values
tell it what to retransmit. All quantities are bytes; `mss` is SMSS.
Growth uses byte counting (RFC 3465) in both phases, so that stretch ACKs
(one ACK per GRO/LRO super-frame, common on veth and real NICs) do not slow
slow start to linear growth; see on_ack.
"""

__all__ = ["NewReno", "initial_window"]

from .seq import HALF, MASK


def initial_window(mss: int, segments: int = 10) -> int:
    """RFC 6928 §2: min(10*MSS, max(2*MSS, 14600)) (generalized to `segments`)."""
    return min(segments * mss, max(2 * mss, 14600)) if segments == 10 else segments * mss


class NewReno:
    __slots__ = ("mss", "cwnd", "ssthresh", "dupacks", "recover", "in_recovery", "bytes_acked", "iw")

    def __init__(self, mss: int, iw_segments: int = 10, snd_una: int = 0):
        self.mss = mss
        self.cwnd = self.iw = initial_window(mss, iw_segments)
        self.ssthresh = 0x7FFFFFFF          # RFC 5681 §3.1: arbitrarily high
        self.dupacks = 0
        self.recover = snd_una              # RFC 6582 §3.2 step 1 (initialized to ISS)
        self.in_recovery = False
        self.bytes_acked = 0                # congestion avoidance byte counter (RFC 3465)

    def on_ack(self, acked: int, flight: int, ack: int) -> bool:
        """New data acked (`flight` = bytes outstanding before this ACK).
        Returns True when the first unacked segment must be retransmitted
        (a partial ACK in fast recovery, RFC 6582 §3.2 step 5)."""
        self.dupacks = 0
        mss = self.mss
        if self.in_recovery:
            if ((ack - self.recover) & MASK) < HALF:
                # full acknowledgment (step 4): deflate, option (1)
                self.cwnd = min(self.ssthresh, max(flight - acked, mss) + mss)
                self.in_recovery = False
                return False
            # partial acknowledgment (step 5): deflate by the amount acked,
            # add back one SMSS if that was at least one SMSS
            self.cwnd = max(self.cwnd - acked + (mss if acked >= mss else 0), mss)
            return True
        self.grow(acked)
        return False

    def grow(self, acked: int) -> None:
        """New data acked outside fast recovery: the window grows (on_ack's common
        case; Conn's pure-ACK fast path calls it directly)."""
        self.dupacks = 0
        cwnd = self.cwnd
        if cwnd < self.ssthresh:
            # slow start with byte counting (RFC 3465): grow by what was acked. RFC 5681
            # (2) recommends at most SMSS per ACK, but receivers behind GRO/LRO (veth,
            # most NICs) send one stretch ACK per super-frame; like Linux we count
            # every acked byte so that slow start stays exponential, capped at ssthresh
            self.cwnd = min(cwnd + acked, max(self.ssthresh, cwnd + self.mss))
        else:
            # congestion avoidance with byte counting (RFC 3465 §2.1, RFC 5681 §3.1):
            # one SMSS per cwnd of acked bytes, whatever the ACK pattern
            self.bytes_acked += acked
            if self.bytes_acked >= cwnd:
                self.bytes_acked -= cwnd
                self.cwnd = cwnd + self.mss

    def on_dupack(self, flight: int, snd_una: int, snd_max: int) -> bool:
        """A duplicate ACK (RFC 5681 §2 definition, checked by the caller).
        Returns True when a fast retransmit of the first unacked segment is due."""
        self.dupacks += 1
        if self.in_recovery:
            self.cwnd += self.mss                           # RFC 6582 step 3: inflate
            return False
        if self.dupacks == 3:
            # RFC 6582 §3.2 step 2: only if the ACK covers more than `recover`
            # (avoids a second reduction for losses of the same window)
            if not 0 < ((snd_una - self.recover) & MASK) < HALF:
                return False
            self.ssthresh = max(flight // 2, 2 * self.mss)  # RFC 5681 (4)
            self.recover = snd_max
            self.cwnd = self.ssthresh + 3 * self.mss
            self.in_recovery = True
            return True
        return False

    def on_timeout(self, flight: int, snd_max: int, first: bool) -> None:
        """RTO expired (RFC 5681 §3.1 (4) and loss window; RFC 6582 §4)."""
        if first:
            self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss
        self.dupacks = 0
        self.in_recovery = False
        self.recover = snd_max
