"""The retransmission timeout estimator (RFC 6298).

Theory of operation: one RTT sample at a time (no timestamps option), Karn's
algorithm (RFC 6298 §3: no sample from a retransmitted segment; the caller
stops timing on retransmission). RTO = SRTT + max(G, 4*RTTVAR), clamped to
[rto_min, rto_max]. RFC 6298 (2.4) asks for a 1 s minimum; like Linux we
default to 200 ms (configurable) because our peers are on the same link or
close to it. Backoff doubles the RTO up to rto_max (§5.5); a new sample
after the backoff recomputes it (§5.7 keeps the backed-off value until then).
"""

__all__ = ["RttEstimator"]

_G = 0.001          # clock granularity: time is a float, so effectively 1 ms


class RttEstimator:
    __slots__ = ("srtt", "rttvar", "rto", "rto_min", "rto_max")

    def __init__(self, initial: float = 1.0, rto_min: float = 0.2, rto_max: float = 60.0):
        self.srtt = 0.0             # 0: no sample yet
        self.rttvar = 0.0
        self.rto = initial          # (2.1) initial RTO
        self.rto_min = rto_min
        self.rto_max = rto_max

    def sample(self, r: float) -> None:
        if r < 0:
            return
        if not self.srtt:           # (2.2) first measurement
            self.srtt = r or _G
            self.rttvar = r / 2
        else:                       # (2.3) beta = 1/4, alpha = 1/8
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        rto = self.srtt + max(_G, 4 * self.rttvar)
        self.rto = min(max(rto, self.rto_min), self.rto_max)

    def backoff(self) -> None:
        self.rto = min(self.rto * 2, self.rto_max)
