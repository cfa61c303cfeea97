"""The peer's receive window bounds every segment we send (RFC 9293 §3.8.6), in memory, fake clock.

`Peer` is a client with a receive buffer and an application that reads when
the test says so. It keeps its own record of the right edges it advertised
(SEG.ACK + SEG.WND of each segment it sent) and checks EVERY data segment the
stack emits, whether a segment, a timer or a retransmission made it, against

- the right edge of the newest of its segments that carries a window the
  sender must take: one whose ACK advances SND.UNA (as Linux's
  tcp_may_update_window), or whose SEQ/ACK is newest (RFC 9293 §3.10.7.4,
  SND.WL1/SND.WL2);
- with `strict` (the scripted tests), also the edge of the very last segment
  it sent, whatever its kind: the right edge it advertised most recently;
- the largest right edge it ever advertised.

The one exception is a window probe (RFC 9293 §3.8.6.1): exactly one byte at
SND.UNA when the window is zero. Frames are parsed by scapy (Client.collect).
"""
import random

import pytest
from scapy.layers.inet import TCP

from tests.stack_support import Client, assemble, expected, make_stack, make_store

M = 0xFFFFFFFF
H = 0x80000000


def le(a, b):
    return ((b - a) & M) < H


def lt(a, b):
    return a != b and le(a, b)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("window"))


def conn_of(c):
    (conn,) = [x for x in c.st.conns.values() if x.peer_port == c.port]
    return conn


class Peer(Client):
    """A client with a `buf`-byte receive buffer whose right edge never moves left
    (RFC 9293 §3.8.6: a receiver SHOULD NOT shrink the window) unless the test
    shrinks it (`shrink`). Data beyond the edge it advertised is dropped."""

    def __init__(self, stack, buf, strict=True, **kw):
        super().__init__(stack, wscale=None, window=buf, **kw)
        self.buf = self.buf0 = buf
        self.unread = 0                 # in-order bytes not yet read by the application
        self.adv_edge = None            # our receive window's right edge, as advertised
        self.stream = {}                # seq -> payload accepted in order
        self.lose = lambda p: False     # a test's loss model for server data segments
        # the sender's view of our window, as the rules oblige it to be
        self.edge = None                # right edge it must respect
        self.max_edge = None            # the largest right edge we ever advertised
        self.una = self.wl1 = self.wl2 = None
        self.strict = strict
        self.last_edge = None           # the right edge of our last segment
        self.taken = self.stale = 0     # our ACK segments whose window must / need not be taken
        self.violations = []
        self.probes = []
        self.data_frames = []

    # what we advertise
    def window_now(self):
        """The window for the next segment: buffer space, the right edge never moving left."""
        e = (self.ack + self.buf - self.unread) & M
        if self.adv_edge is None or lt(self.adv_edge, e):
            self.adv_edge = e
        return (self.adv_edge - self.ack) & M

    def shrink(self, edge):
        """Retract our right edge to `edge` (>= our ACK): the buffer shrinks (a receiver
        that breaks the SHOULD NOT; RFC 9293 §3.8.6: the sender MUST be robust)."""
        self.adv_edge = edge
        self.buf = ((edge - self.ack) & M) + self.unread

    def read(self, n=None):
        self.unread -= self.unread if n is None else min(n, self.unread)

    # the wire, both ways
    def deliver(self, pkt):
        t = pkt[TCP]
        if "A" in t.flags and "S" not in t.flags and self.una is not None:
            seq, ack, edge = t.seq, t.ack, (t.ack + t.window) & M
            self.last_edge = edge
            if self.max_edge is None or lt(self.max_edge, edge):
                self.max_edge = edge
            if lt(self.una, ack) or lt(self.wl1, seq) or (seq == self.wl1 and le(self.wl2, ack)):
                self.edge, self.una, self.wl1, self.wl2 = edge, ack, seq, ack
                self.taken += 1
            else:
                self.stale += 1
        return super().deliver(pkt)

    def collect(self):
        out = super().collect()
        for p in out:
            t = p[TCP]
            if "S" in t.flags:
                # the window of our SYN (never scaled) opens at SND.UNA = ISS
                self.una = self.wl2 = t.seq
                self.wl1 = (self.seq - 1) & M
                self.edge = self.max_edge = self.adv_edge = self.last_edge = (t.seq + 1 + self.buf) & M
            n = len(t.payload)
            if not n:
                continue
            self.data_frames.append(p)
            end = (t.seq + n) & M
            if n == 1 and t.seq == self.edge == self.una:
                self.probes.append(p)                                   # a zero-window probe
            elif not (le(end, self.edge) and le(end, self.max_edge)
                      and (not self.strict or le(end, self.last_edge))):
                self.violations.append((t.seq, n, self.edge, self.max_edge))
            if self.lose(p):
                continue
            # our receiver: in-order bytes inside our advertised window
            off = (self.ack - t.seq) & M
            room = (self.adv_edge - self.ack) & M if self.adv_edge is not None else 0
            if off < n and room < H:
                take = bytes(t.payload)[off:off + room]
                if take:
                    self.stream[self.ack] = take
                    self.ack = (self.ack + len(take)) & M
                    self.unread += len(take)
        return out

    def send_ack(self, seq=None, data=b""):
        """An ACK with our current window; `seq` older than ours: a retransmission."""
        w = self.window_now()
        return self.send("PA" if data else "A", data=data, window=w,
                         **({} if seq is None else {"seq": seq}))

    def send_ahead(self, ack):
        """Request bytes beyond a hole (SEG.SEQ > RCV.NXT: queued out of order, and
        SND.WL1 moves there), with an older ACK and the window that goes with it."""
        self.window_now()
        return self.send("PA", data=b"GET /x", seq=(self.seq + 10) & M, ack=ack, advance=False,
                         window=(self.adv_edge - ack) & M)

    def received(self, start):
        return assemble(self.stream, start)


def connect(st, buf, strict=True):
    c = Peer(st, buf, strict)
    c.connect(options=[("MSS", 1460)])
    return c, (c.server_isn + 1) & M


class Pipeliner:
    """A client that writes `n` GETs at once, two per segment, and then retransmits
    what the server has not acknowledged (the server stops taking request bytes
    while `max_queued` replies wait): the retransmissions carry older SEQs than
    its newest segments, with the newest ACK and its current window."""

    def __init__(self, peer, path, n):
        self.p = peer
        reqs = [peer.request(path) for _ in range(n)]
        segs = [b"".join(reqs[i:i + 2]) for i in range(0, n, 2)]
        self.base = peer.seq
        self.segs = {}                  # offset -> segment: the server takes or refuses whole ones
        off = 0
        for s in segs:
            self.segs[off] = s
            off += len(s)
            peer.send_ack(data=s)

    def retransmit(self):
        """The oldest request segment the server has not taken, or a pure ACK."""
        conn = conn_of(self.p)
        s = self.segs.get((conn.rcv_nxt - self.base) & M)
        if s is None:
            return self.p.send_ack()
        return self.p.send_ack(seq=conn.rcv_nxt, data=s)


def pipelined_stream(store, path, n):
    return expected(store, path) * n


@pytest.mark.parametrize("updates", [True, False], ids=["window-updates", "retransmissions-only"])
def test_pipelining_slow_reader_with_old_seq_retransmissions(store, updates):
    """The trace of issue 10: replies queued up to max_queued, the client's request
    bytes refused, its retransmissions (SEG.SEQ < SND.WL1) carry a new ACK and a
    smaller window. That window must be taken (the ACK advances SND.UNA), so no
    segment goes past the right edge the client advertised last. With `updates`
    the reader's window updates are pure ACKs at its newest SEQ (as Linux sends
    them); without, its only ACKs are the retransmissions, and a window the
    server once saw closed reopens only through an ACK that advances SND.UNA."""
    st = make_stack(store, max_queued=4)
    c, start = connect(st, 6000)
    pl = Pipeliner(c, "/odd.txt", 24)
    want = pipelined_stream(store, "/odd.txt", 24)
    for step in range(3000):
        if len(c.received(start)) >= len(want):
            break
        if step % 3 == 2:
            c.read(2500)                  # the application reads slowly
            if updates:
                c.send_ack()
        pl.retransmit()
        c.advance(0.01)
    assert c.violations == [], c.violations[:5]
    assert c.received(start) == want
    assert c.stale > 0 and st.counters["tcp_rx_backpressure"] > 0
    assert st.counters["tcp_tx_window_stale"] == 0 and st.counters["drop_internal_error"] == 0


def test_old_seq_ack_window_is_taken_in_the_general_path(store):
    """A pure ACK older than SND.WL1 (an out-of-order request segment set it) that
    advances SND.UNA carries the window to use from now on: with the edge unmoved
    nothing new may be sent."""
    st = make_stack(store)
    c, start = connect(st, 4 * 1460)
    first = c.send_ack(data=c.request("/big.bin"))
    assert sum(len(p[TCP].payload) for p in first) == 4 * 1460
    c.send_ahead(start)                           # SND.WL1 moves ahead
    conn = conn_of(c)
    assert conn.ooo and c.unread == 4 * 1460
    out = c.send_ack()                            # acks 4 segments, window 0 (nothing read)
    assert conn.snd_una == c.ack and conn.snd_wnd == 0
    assert [p for p in out if len(p[TCP].payload)] == [] and c.violations == []
    c.read()
    c.send_ack()
    assert c.violations == [] and len(c.received(start)) == 8 * 1460


def test_old_seq_pure_ack_window_is_taken_in_the_fast_path(store):
    """The same in header prediction: the server refused a request segment (backpressure),
    which moved SND.WL1 past RCV.NXT; a pure in-order ACK (SEG.SEQ = RCV.NXT < SND.WL1)
    of new data brings a zero window, and nothing more may be sent."""
    st = make_stack(store, max_queued=1)
    c, start = connect(st, 4 * 1460)
    first = c.send_ack(data=c.request("/big.bin"))
    assert sum(len(p[TCP].payload) for p in first) == 4 * 1460
    conn = conn_of(c)
    rn = conn.rcv_nxt
    # sent before the data arrived: a request (refused, one reply is queued), then an ACK
    c.send("PA", data=c.request("/odd.txt"), ack=start, window=4 * 1460)
    c.send("A", ack=start, window=4 * 1460)
    assert conn.rcv_nxt == rn and st.counters["tcp_rx_backpressure"] == 1 and lt(rn, conn.wl1)
    out = c.send_ack(seq=rn)                      # acks 4 segments, window 0
    assert conn.snd_una == c.ack and conn.snd_wnd == 0 and conn.wl1 == rn
    assert [p for p in out if len(p[TCP].payload)] == [] and c.violations == []


def test_zero_window_probes_and_their_acks(store):
    """RFC 9293 §3.8.6.1: into a zero window only 1-byte probes at SND.UNA, however
    many probe ACKs come back (RFC 5681 §2: they are not duplicate ACKs: the
    probe's ACK is not a sign of loss); the transfer completes byte-exact when
    the window opens."""
    st = make_stack(store)
    c, start = connect(st, 3 * 1460)
    c.send_ack(data=c.request("/big.bin"))
    assert c.unread == 3 * 1460
    c.send_ack()                                  # window 0: the buffer is full
    conn = conn_of(c)
    assert conn.persist
    n = 0
    for _ in range(200):
        before = len(c.probes)
        c.now = st.poll(c.now)
        c.advance(0)
        if len(c.probes) > before:
            n += 1
            c.send_ack()                          # the probe's byte is dropped: same ACK, window 0
        if n == 5:
            break
    assert n == 5 and len(c.data_frames) == 3 + 5
    assert all(len(p[TCP].payload) == 1 and p[TCP].seq == c.ack for p in c.probes)
    assert st.counters["tcp_fast_retransmit"] == 0 and c.violations == []
    c.buf = 64000
    c.read()
    for _ in range(100):                          # window open: ACK as data arrives
        if len(c.received(start)) == len(expected(store, "/big.bin")):
            break
        c.read()
        c.send_ack()
        c.advance(0.01)
    assert c.received(start) == expected(store, "/big.bin")
    assert c.violations == [] and st.counters["drop_internal_error"] == 0


def test_rto_retransmission_respects_a_shrunken_window(store):
    """RFC 9293 §3.8.6: the peer took back part of its window (an ACK that advances
    SND.UNA, older SEQ than SND.WL1): the retransmission after the RTO fits the
    new right edge; a zero window leads to probing, not to a full segment."""
    st = make_stack(store)
    c, start = connect(st, 6 * 1460)
    lost = []
    c.lose = lambda p: p[TCP].seq != start and p[TCP].seq != (start + 1460) & M and not lost.append(p)
    c.send_ack(data=c.request("/big.bin"))
    assert len(lost) == 4                         # segments 3-6 lost, 1-2 received
    c.lose = lambda p: False
    c.send_ahead(start)
    c.shrink((c.ack + 1000) & M)                  # the peer takes its window back
    c.send_ack()
    conn = conn_of(c)
    assert conn.snd_una == c.ack
    out = c.run_until(c.now + 1.5)                # the RTO
    data = [p for p in out if len(p[TCP].payload)]
    assert st.counters["tcp_rto"] >= 1 and data
    assert [len(p[TCP].payload) for p in data][:1] == [1000] and c.violations == []
    c.shrink(c.ack)                               # and now all of it
    c.send_ack()
    c.run_until(c.now + 10)
    assert c.violations == [] and c.probes and all(len(p[TCP].payload) == 1 for p in c.probes)


def test_fast_retransmit_respects_a_shrunken_window(store):
    """RFC 5681 §3.2 fast retransmit (and RFC 6582 partial ACKs, the same routine)
    resends at SND.UNA, but never past the right edge: a window shrunk to 500
    bytes gets 500 bytes (counted), a zero window nothing."""
    st = make_stack(store)
    c, start = connect(st, 64000)
    c.lose = lambda p: p[TCP].seq == start        # the first segment is lost
    out = c.send_ack(data=c.request("/big.bin"))
    assert len([p for p in out if len(p[TCP].payload)]) == 10 and c.ack == start
    c.lose = lambda p: False
    c.shrink((c.ack + 500) & M)                   # a changed window: not a duplicate ACK
    c.send_ack()
    for _ in range(3):
        c.send_ack()                              # three duplicate ACKs
    assert st.counters["tcp_fast_retransmit"] == 1
    retx = [p for p in c.data_frames if p[TCP].seq == start]
    assert [len(p[TCP].payload) for p in retx] == [1460, 500]
    assert c.violations == [] and st.counters["tcp_tx_window_clamped"] == 1
    c.lose = lambda p: p[TCP].seq == start
    c.shrink(c.ack)                               # zero window, recovery goes on
    for _ in range(5):
        out = c.send_ack()
    assert c.violations == [] and [p for p in out if len(p[TCP].payload)] == []


@pytest.mark.parametrize("seed", range(8))
def test_random_peer_never_sees_a_segment_beyond_its_window(store, seed):
    """A peer model that pipelines, reads at random, loses segments, retransmits old
    request bytes with new ACKs, sometimes takes its window back (to zero, too),
    and lets time pass so that RTO, persist and delayed ACK timers fire: the
    window invariant holds on every frame, and the data arrive byte-exact."""
    rnd = random.Random(seed)
    st = make_stack(store, max_queued=rnd.choice([2, 4, 256]))
    c, start = connect(st, rnd.choice([1460, 3000, 5000, 12000]), strict=False)
    c.lose = lambda p: rnd.random() < 0.08
    n = rnd.choice([6, 10])
    path = rnd.choice(["/odd.txt", "/index.html", "/big.bin"])
    pl = Pipeliner(c, path, n)
    want = pipelined_stream(store, path, n)
    for step in range(1500):
        if len(c.received(start)) >= len(want):
            break
        r = rnd.random()
        if r < 0.3:
            c.read(rnd.choice([500, 1460, 4000, None]))
        elif r < 0.36:
            c.shrink((c.ack + rnd.choice([0, 0, 100, 1460])) & M)
        if rnd.random() < 0.5:
            pl.retransmit()
        else:
            c.send_ack()
        c.advance(rnd.choice([0.0, 0.001, 0.05, 0.3, 1.0]))
    for _ in range(400):                          # then a reader that keeps up
        if len(c.received(start)) >= len(want):
            break
        c.lose = lambda p: False
        c.buf = c.buf0
        c.read()
        pl.retransmit()
        c.advance(0.3)
    assert c.violations == [], c.violations[:5]
    assert c.received(start) == want
    assert st.counters["drop_internal_error"] == 0 and st.counters["tcp_tx_window_stale"] == 0


def test_a_window_smaller_than_a_segment_with_nothing_in_flight(store):
    """RFC 9293 §3.8.6.2.1: with nothing in flight, a window smaller than a segment is
    filled (no SWS stall), counted as a clamp (tcp_tx_window_clamped); the rest of
    that stored segment goes next, so the stream is back on the stored boundaries.
    Neither can use the stored payload sums: two software checksums per clamp."""
    st = make_stack(store)
    c, start = connect(st, 1000)
    c.send_ack(data=c.request("/big.bin"))
    assert [len(p[TCP].payload) for p in c.data_frames] == [1000]
    assert st.counters["tcp_tx_window_clamped"] == 1
    c.read()
    c.send_ack()
    assert [len(p[TCP].payload) for p in c.data_frames] == [1000, 460]
    assert st.counters["tcp_tx_window_clamped"] == 1
    assert st.counters.get("tcp_tx_sw_csum", 0) <= 2 * st.counters["tcp_tx_window_clamped"]
    c.read()
    c.send_ack()
    assert [len(p[TCP].payload) for p in c.data_frames] == [1000, 460, 1000]
    assert c.violations == [] and st.counters["tcp_tx_window_clamped"] == 2
