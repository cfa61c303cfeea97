"""Congestion control (cc.py) and the RTO estimator (timers.py) alone, by their RFCs."""
import pytest

from appliance.stack.cc import NewReno, initial_window
from appliance.stack.isn import MSS_TABLE, IsnGenerator
from appliance.stack.timers import RttEstimator

MSS = 1460


def test_initial_window_rfc6928():
    """RFC 6928 §2: min(10*MSS, max(2*MSS, 14600))."""
    assert initial_window(1460) == 14600
    assert initial_window(536) == 5360
    assert initial_window(8960) == 17920


def test_slow_start_doubles_per_round_trip_even_with_stretch_acks():
    """RFC 3465 byte counting: one ACK for a whole flight still doubles cwnd."""
    cc = NewReno(MSS)
    cc.on_ack(cc.cwnd, cc.cwnd, 1)
    assert cc.cwnd == 2 * 14600


def test_congestion_avoidance_grows_one_mss_per_window():
    """RFC 5681 §3.1 (3) with byte counting: +1 SMSS per cwnd of acked bytes."""
    cc = NewReno(MSS)
    cc.ssthresh = cc.cwnd = 20 * MSS
    for _ in range(20):
        cc.on_ack(MSS, cc.cwnd, 1)
    assert cc.cwnd == 21 * MSS


def test_fast_retransmit_and_newreno_recovery():
    """RFC 5681 §3.2 steps 2-3, RFC 6582 §3.2 steps 3-5."""
    cc = NewReno(MSS, snd_una=0)
    flight = 10 * MSS
    assert [cc.on_dupack(flight, 1000, 1000 + flight) for _ in range(3)] == [False, False, True]
    assert cc.ssthresh == 5 * MSS and cc.cwnd == 8 * MSS and cc.in_recovery and cc.recover == 1000 + flight
    cc.on_dupack(flight, 1000, 1000 + flight)
    assert cc.cwnd == 9 * MSS                                   # inflation
    assert cc.on_ack(2 * MSS, flight, 1000 + 2 * MSS) is True   # partial ACK: retransmit next hole
    assert cc.cwnd == 9 * MSS - 2 * MSS + MSS
    assert cc.on_ack(8 * MSS, 8 * MSS, 1000 + flight) is False  # full ACK: leave recovery
    assert not cc.in_recovery and cc.cwnd == min(cc.ssthresh, MSS + MSS)


def test_no_second_fast_retransmit_for_the_same_window():
    """RFC 6582 §3.2 step 2: after an RTO, dup ACKs below `recover` do not re-enter."""
    cc = NewReno(MSS, snd_una=0)
    cc.on_timeout(10 * MSS, 5000, True)
    assert cc.cwnd == MSS and cc.recover == 5000
    assert [cc.on_dupack(MSS, 3000, 5000) for _ in range(3)] == [False, False, False]


def test_rto_estimator_rfc6298():
    r = RttEstimator(initial=1.0, rto_min=0.2, rto_max=60)
    assert r.rto == 1.0                                         # (2.1)
    r.sample(0.1)                                               # (2.2): SRTT=R, RTTVAR=R/2
    assert r.srtt == pytest.approx(0.1) and r.rttvar == pytest.approx(0.05)
    assert r.rto == pytest.approx(0.3)
    r.sample(0.1)                                               # (2.3)
    assert r.rttvar == pytest.approx(0.75 * 0.05) and r.rto == pytest.approx(0.1 + 4 * 0.0375)
    r.sample(0.001)
    assert r.rto >= 0.2                                         # (2.4) the floor
    for _ in range(20):
        r.backoff()                                             # (5.5)
    assert r.rto == 60


def test_syn_cookie_roundtrip_and_expiry():
    """RFC 4987 §3.6: the cookie encodes the MSS; it is valid for one to two 64 s slots."""
    g = IsnGenerator(b"x" * 32)
    t4 = bytes(range(12))
    c = g.cookie(t4, 12345, 1400, 1000.0)
    assert g.check_cookie(t4, 12345, c, 1000.0) == 1400
    assert g.check_cookie(t4, 12345, c, 1000.0 + 64) == 1400
    assert g.check_cookie(t4, 12345, c, 1000.0 + 200) is None
    assert g.check_cookie(t4, 12346, c, 1000.0) is None
    assert g.check_cookie(bytes(12), 12345, c, 1000.0) is None
    assert g.check_cookie(t4, 12345, c ^ 1, 1000.0) is None
    assert g.check_cookie(t4, 1, g.cookie(t4, 1, 1000, 5.0), 5.0) == max(m for m in MSS_TABLE if m <= 1000)
    with pytest.raises(ValueError, match="secret"):
        IsnGenerator(b"short")
