"""One TCP connection of the server (RFC 9293 §3.10), sending from the content store.

Theory of operation. A `Conn` exists from SYN-RECEIVED to LAST-ACK; LISTEN,
SYN cookies and TIME-WAIT live in the Stack (iface.py), which owns the
connection table and calls `segment()` for every segment of this connection
and `on_timer()` when `deadline()` has passed. The peer is a client: we
never open connections and we only read request bytes. TCP over IPv6 is
`Conn6` (conn6.py), which changes only the frames built; HTTPS is tls.py's
TLS mixin on either.

Send side (the Sandstorm data path). Each HTTP Reply becomes an *item* of
the send queue, a tuple

    (start, end, length, hdr, hl, body, sums, sum0)

`start`/`end` are sequence numbers; `hdr` is the response's header block
with Date and Connection patched (cached per second by the Stack), `hl` its
length, `body` a memoryview of the body in Store.blob, `sums` the stored
per-MSS segment sums and `sum0` the first segment's sum after patching. Any
byte range of the reply can be rebuilt from the item: that is how segments
are sent *and* retransmitted (RFC 9293 allows any resegmentation); there is
no retransmission queue of bytes. Items leave the queue when fully acked.
A segment is a Frame (see rings/base.py): a copy of the connection's
54-byte header template (+ the patched header bytes for the first segment)
with seq/ack/flags/window/lengths/checksums packed in, and the payload as a
memoryview slice of the blob. Checksums (mode 0, no offload) are computed
without touching payload bytes: the TCP sum is congruent mod 0xFFFF to the
sum of the 32-bit header words, so it is `const + seq + ack + flags/window
+ length + stored payload sum`. When the cut does not match the stored
sums (peer MSS below the store's, partial acks, window probes, dynamic
replies) the payload is summed in software and counted
(`tcp_tx_sw_csum`). Mode 1 (csum offload) sends NEEDS_CSUM frames with the
pseudo-header sum; mode 2 (TSO) sends GSO super-frames of up to `tso_max`.

Receive side: in-order data goes to the HTTP layer at once. Out-of-order
segments are kept in a small queue (`ooo`, at most `cfg.ooo_limit` bytes
in `cfg.ooo_segments` segments; beyond it they are dropped, RFC 9293 §3.10.7.4 allows both) and answered
with an immediate duplicate ACK (RFC 5681 §4.2); when the hole is filled the
queued bytes follow. Requests are small, so the limit is a few segments. Data is handed to the HTTPConnection; the ACK rides on the
response (lazy ACK), or is sent after `delack` when no response results, or
at once for every second full segment, a FIN or an out-of-order segment.
The peer's FIN goes to the HTTP layer too (`eof()`): a request it left
incomplete gets its 400 before our FIN.

The peer's window. RFC 9293 §3.10.7.4 takes SEG.WND "If (SND.WL1 < SEG.SEQ or
(SND.WL1 = SEG.SEQ and SND.WL2 =< SEG.ACK))". That alone is not enough here:
a pipelining client whose request bytes we refused (backpressure) has moved
SND.WL1 past RCV.NXT with its newer segments, and its retransmissions of the
refused bytes (SEG.SEQ < SND.WL1) carry newer ACKs with smaller windows; a
window ignored while SND.UNA advances, measured from the new SND.UNA, runs
past the edge the client advertised. So, like Linux (tcp_may_update_window),
every acceptable ACK that advances SND.UNA also updates the window; otherwise
the RFC rule applies; an ACK below SND.UNA never does ("If SND.UNA =< SEG.ACK
=< SND.NXT, the send window should be updated"). The update records the right
edge `snd_edge` = SEG.ACK + SEG.WND, and every send path is bounded by it,
not by SND.WND: output() (new data and the go-back after an RTO),
_retransmit_first (fast retransmit, NewReno partial ACKs), window probes
(`tcp_tx_window_stale` counts an output() that found SND.WND beyond the
edge, i.e. a path that moved SND.UNA without the window: it stays 0).
The edge moves left only if the peer shrinks its window ("a sending TCP peer
MUST be robust against window shrinking", §3.8.6): then retransmissions are
cut to it (`tcp_tx_window_clamped`) and a zero window is probed with one byte
at SND.UNA (§3.8.6.1), the only byte ever sent past the edge. While probing,
the probes' ACKs are not duplicate ACKs (RFC 5681 §2 asks for outstanding
data and an unchanged window; the probe's byte is outstanding only
nominally) and never trigger a fast retransmit.

Congestion control is NewReno (cc.py), the RTO estimator RFC 6298
(timers.py). RFC 5961: RSTs must match RCV.NXT exactly (else challenge ACK),
SYNs in synchronized states get a challenge ACK, ACKs older than
SND.UNA - MAX.SND.WND get a challenge ACK (§5.2).

Timers: `t_rtx` (retransmission, or persist when `persist` is set), `t_ack`
(delayed ACK), `t_req` (a request started but not complete), and the idle
limit `last_act + idle_timeout` (no progress in either direction: a quiet
keep-alive connection is closed with a FIN; one that is stuck with data
outstanding or in a closing state is aborted with a RST). Every new
deadline goes to `st.arm`, which moves the connection's entry in the
Stack's timer wheel (`sched`) only when the deadline is earlier: when the
entry comes due, the Stack asks `deadline()` again.
"""
import struct

from .cc import NewReno
from .seq import HALF, MASK
from .tcp import ACK, FIN, PSH, RST, SYN
from .timers import RttEstimator

__all__ = ["Conn", "SYN_RCVD", "ESTABLISHED", "FIN_WAIT_1", "FIN_WAIT_2", "CLOSE_WAIT", "CLOSING",
           "LAST_ACK", "TIME_WAIT", "CLOSED", "STATE_NAMES"]

SYN_RCVD, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT, CLOSING, LAST_ACK, TIME_WAIT, CLOSED = range(1, 10)
STATE_NAMES = {SYN_RCVD: "SYN-RECEIVED", ESTABLISHED: "ESTABLISHED", FIN_WAIT_1: "FIN-WAIT-1",
               FIN_WAIT_2: "FIN-WAIT-2", CLOSE_WAIT: "CLOSE-WAIT", CLOSING: "CLOSING", LAST_ACK: "LAST-ACK",
               TIME_WAIT: "TIME-WAIT", CLOSED: "CLOSED"}
_RX_DATA = (ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2)

_EMPTY = memoryview(b"")
_ip_pack = struct.Struct("!HHHBBH").pack_into        # at 16: total length, id, flags/frag, ttl, proto, csum
_tcp_pack = struct.Struct("!IIHHH").pack_into        # at 38: seq, ack, offset/flags, window, csum
_tcp_unpack = struct.Struct("!IIBBH").unpack_from    # at 38: seq, ack, offset, flags, window


class _HttpDone:
    """The HTTP state of a connection whose one request was answered from the
    reply cache and closed it (Conn._deliver): later data is ignored."""
    __slots__ = ()
    closed = True


_HTTP_DONE = _HttpDone()


class Conn:
    __slots__ = ("st", "key", "state", "peer_mac", "peer_ip", "peer_port",
                 "tmpl", "ip_const", "pseudo", "tcp_const", "ctl_tmpl", "mode", "mss", "aligned", "tso_max", "rwnd",
                 "iss", "irs", "snd_una", "snd_nxt", "snd_max", "snd_wnd", "snd_edge", "snd_ws", "max_snd_wnd",
                 "wl1", "wl2", "rcv_nxt", "rcv_unacked", "ws_ok",
                 "cc", "rtt", "rtt_t", "rtt_seq", "q", "data_end", "fin_pending", "fin_seq",
                 "http", "date_gen", "t_rtx", "persist", "persist_iv", "t_ack", "t_req", "last_act",
                 "retries", "ack_now", "gso", "sched", "ooo", "ooo_bytes", "qh", "last_tx")

    def __init__(self, st, key: bytes, peer_mac: bytes, peer_ip: bytes, peer_port: int,
                 iss: int, irs: int, peer_mss, peer_ws, peer_wnd: int, now: float, state: int = SYN_RCVD,
                 lport: int = 0):
        # lport: our port when it is not the site's cfg.port (HTTPS, the metrics port)
        cfg = st.cfg
        self.st = st
        self.key = key
        self.state = state
        self.peer_mac = peer_mac
        self.peer_ip = peer_ip
        self.peer_port = peer_port
        self.tmpl, self.ip_const, self.pseudo, self.tcp_const, self.ctl_tmpl = st.template(peer_mac, peer_ip,
                                                                                           peer_port, lport)
        self.mode = st.mode
        # SMSS from the peer's MSS option, our MTU and the store's MSS (Stack.mss_params)
        self.mss, self.aligned, self.tso_max, self.gso = st.mss_params(peer_mss)
        self.rwnd = cfg.rcv_wnd
        self.iss = iss
        self.irs = irs
        self.snd_una = iss
        self.snd_nxt = self.snd_max = (iss + 1) & MASK
        self.ws_ok = peer_ws is not None
        self.snd_ws = peer_ws or 0          # RFC 7323 §2.2: only when both sides sent the option
        self.snd_wnd = peer_wnd             # the window of a SYN is never scaled (RFC 7323 §2.2)
        self.max_snd_wnd = peer_wnd
        self.snd_edge = (iss + peer_wnd) & MASK   # right edge: SEG.ACK + SEG.WND of the last window update
        self.wl1 = irs
        self.wl2 = iss
        self.rcv_nxt = (irs + 1) & MASK
        self.rcv_unacked = 0
        self.cc = NewReno(self.mss, cfg.iw_segments, iss)
        self.rtt = RttEstimator(cfg.rto_initial, cfg.rto_min, cfg.rto_max)
        self.rtt_t = 0.0
        self.rtt_seq = 0
        self.q = []
        self.qh = 0                         # hint: index in q of the item last sent from
        self.data_end = self.snd_nxt
        self.fin_pending = False
        self.fin_seq = 0
        self.http = None
        self.date_gen = -1
        self.t_rtx = 0.0
        self.persist = False
        self.persist_iv = 0.0
        self.t_ack = 0.0
        self.t_req = 0.0
        self.last_act = now
        self.last_tx = now
        self.retries = 0
        self.ack_now = False
        self.sched = 0.0                    # time of our live entry in the Stack's timer wheel (0: none)
        self.ooo = {}                       # out-of-order data: seq -> (bytes, FIN flag)
        self.ooo_bytes = 0

    def __repr__(self):
        return (f"Conn({STATE_NAMES[self.state]} {'.'.join(map(str, self.peer_ip))}:{self.peer_port} "
                f"una={self.snd_una} nxt={self.snd_nxt} max={self.snd_max} end={self.data_end} "
                f"rcv_nxt={self.rcv_nxt} cwnd={self.cc.cwnd} wnd={self.snd_wnd})")

    # ------------------------------------------------------------------ input

    def segment(self, f, end: int, now: float) -> None:
        """Process one segment (RFC 9293 §3.10.7.4) of a frame whose TCP header is at 34
        and whose IP datagram ends at `end`; the TCP checksum was verified.

        The hot path first: ESTABLISHED, SEG.SEQ == RCV.NXT, flags ACK (+PSH) only, no
        options, and an ACK that is new or changes nothing. Then the segments of a
        connection-per-request's handshake and teardown (`_closing_fast`). Every
        other segment, and duplicate ACKs, take the general path (`_segment`),
        which follows the RFC's order of checks step by step."""
        seq, ack, off, flags, win = _tcp_unpack(f, 38)
        if self.state != ESTABLISHED:
            if (end == 54 and off == 0x50 and flags & 0x16 == 0x10 and seq == self.rcv_nxt
                    and ack == self.snd_max and not self.ooo and self._closing_fast(seq, ack, flags, win, now)):
                return
            self._segment(seq, ack, off, flags, win, f, end, now)
            return
        if end == 54 and flags == 0x10 and off == 0x50 and seq == self.rcv_nxt:
            # Header prediction (RFC 9293 §3.10.7.4; Van Jacobson's BSD fast path): a pure
            # in-order ACK of new data, outside fast recovery and persist. An ACK that
            # advances SND.UNA always updates the window (see _window_update). The same
            # steps as _new_ack (_acked + NewReno.on_ack) + _window_update, written out.
            una = self.snd_una
            d = (ack - una) & MASK
            cc = self.cc
            if (d and d <= ((self.snd_max - una) & MASK) and not cc.in_recovery and not self.persist
                    and not self.ooo):
                self._acked(ack, now)
                self.st.counters["tcp_bytes_acked"] += d
                cc.grow(d)                                  # NewReno.on_ack outside recovery
                self.t_rtx = 0.0 if ack == self.snd_max else now + self.rtt.rto   # RFC 6298 (5.2), (5.3)
                wnd = win << self.snd_ws
                self.snd_wnd = wnd
                self.snd_edge = (ack + wnd) & MASK
                self.wl1 = seq
                self.wl2 = ack
                if wnd > self.max_snd_wnd:
                    self.max_snd_wnd = wnd
                if self.snd_nxt != self.data_end or self.ack_now:
                    self.output(now)
                return
        if seq == self.rcv_nxt and flags & 0x17 == 0x10 and off == 0x50 and not self.ooo:
            una = self.snd_una
            d = (ack - una) & MASK
            wnd = win << self.snd_ws
            if d and d <= ((self.snd_max - una) & MASK):
                self._new_ack(ack, d, now)
            elif d or (end == 54 and wnd == self.snd_wnd and self.snd_max != una):
                self._segment(seq, ack, off, flags, win, f, end, now)
                return
            if d or seq != self.wl1 or ack != self.wl2 or wnd != self.snd_wnd or self.persist:
                self._window_update(seq, ack, wnd, d)
            if end > 54:
                if len(self.q) >= self.st.cfg.max_queued:
                    self._segment(seq, ack, off, flags, win, f, end, now)   # backpressure
                    return
                plen = end - 54
                self.rcv_nxt = (seq + plen) & MASK
                self.last_act = now
                self.rcv_unacked += plen
                if self._deliver(f[54:end], now):
                    pass                                    # the ACK rides on the reply
                elif self.rcv_unacked >= 2 * self.mss:
                    self.ack_now = True
                elif not self.t_ack:
                    st = self.st
                    t = self.t_ack = now + st.cfg.delack
                    st.arm(self, t)
            self.output(now)
            return
        self._segment(seq, ack, off, flags, win, f, end, now)

    def _handshake_done(self, seq, ack, win, now) -> None:
        """SYN-RECEIVED -> ESTABLISHED on an acceptable ACK (RFC 9293 §3.10.7.4, fifth)."""
        self.state = ESTABLISHED
        self.snd_una = (self.snd_una + 1) & MASK            # our SYN is acknowledged
        self.snd_wnd = wnd = win << self.snd_ws
        self.snd_edge = (self.snd_una + wnd) & MASK
        if wnd > self.max_snd_wnd:
            self.max_snd_wnd = wnd
        self.wl1 = seq
        self.wl2 = ack
        self.t_rtx = 0.0
        self.retries = 0
        if self.rtt_t:
            self.rtt.sample(now - self.rtt_t)
            self.rtt_t = 0.0
        self.st.established(self)

    def _closing_fast(self, seq, ack, flags, win, now) -> bool:
        """The connection-per-request handshake and teardown without the general path:
        in SYN-RECEIVED the handshake's ACK; in FIN-WAIT-1/2, once our FIN was sent,
        the ACK of everything (-> FIN-WAIT-2) and the peer's FIN (ACK it, ->
        TIME-WAIT). The caller checked: no options or data, SEG.SEQ = RCV.NXT,
        SEG.ACK = SND.MAX, ACK set, no SYN/RST. The same steps as _segment for
        exactly these segments, flat; False (nothing done) for anything else."""
        state = self.state
        if state == SYN_RCVD:
            if flags != ACK or self.fin_pending:
                return False
            self._handshake_done(seq, ack, win, now)
            if self.q or self.ack_now:
                self.output(now)
            return True
        if (state != FIN_WAIT_1 and state != FIN_WAIT_2) or ack != ((self.fin_seq + 1) & MASK):
            return False
        st = self.st
        una = self.snd_una
        if ack != una:
            # Everything up to our FIN is acknowledged (SEG.ACK = SND.MAX = FIN + 1):
            # nothing will be sent on this connection again, so the queue goes at
            # once and there is no RTT sample, window or cwnd left worth updating.
            st.counters["tcp_bytes_acked"] += (ack - una) & MASK
            self.snd_una = self.snd_nxt = ack
            self.q.clear()
            self.qh = 0
            self.retries = 0
            self.last_act = now
            self.t_rtx = 0.0
            self.persist = False
        self.state = FIN_WAIT_2                             # our FIN is acknowledged
        if flags & FIN:
            self.rcv_nxt = (seq + 1) & MASK
            st.counters["tcp_fin_received"] += 1
            self._ctl(self.snd_nxt, ACK)
            st.time_wait(self, now)
        return True

    def _segment(self, seq, ack, off, flags, win, f, end, now):
        hl = (off >> 4) << 2
        st = self.st
        if hl < 20 or 34 + hl > end:
            st.counters["drop_tcp_bad_offset"] += 1
            return
        p = 34 + hl
        plen = end - p
        rn = self.rcv_nxt
        state = self.state
        # first: sequence number acceptability (RCV.WND > 0 always here)
        if seq != rn:
            if state == SYN_RCVD and flags & SYN and seq == self.irs and not flags & (ACK | RST):
                st.counters["tcp_syn_retransmitted"] += 1       # our SYN-ACK was lost
                st.send_synack(self)
                return
            d = (seq - rn) & MASK
            slen = plen + (flags & FIN) + ((flags & SYN) >> 1)
            if not (d < self.rwnd or (slen and ((seq + slen - 1 - rn) & MASK) < self.rwnd)):
                if d >= HALF:
                    st.counters["tcp_rx_duplicate"] += 1
                else:
                    st.counters["drop_tcp_out_of_window"] += 1
                if not flags & RST:
                    self._ctl(self.snd_nxt, ACK)                # RFC 9293: send an ACK, drop
                return
        # second: RST (RFC 5961 §3.2)
        if flags & RST:
            if seq == rn:
                st.counters["tcp_rst_received"] += 1
                st.remove(self)
            else:
                st.counters["tcp_rst_in_window"] += 1
                self._challenge(now)
            return
        # fourth: SYN in a synchronized state (RFC 5961 §4.2: challenge ACK)
        if flags & SYN:
            st.counters["tcp_syn_in_window"] += 1
            self._challenge(now)
            return
        # fifth: ACK
        if not flags & ACK:
            st.counters["drop_tcp_no_ack"] += 1
            return
        una = self.snd_una
        if state == SYN_RCVD:
            if not (0 < ((ack - una) & MASK) <= ((self.snd_max - una) & MASK)):
                st.counters["tcp_rst_sent_bad_ack"] += 1
                self._ctl(ack, RST)
                return
            self._handshake_done(seq, ack, win, now)
            state = ESTABLISHED
            una = self.snd_una
        wnd = win << self.snd_ws
        adv = 0
        if ack != una:
            d = (ack - una) & MASK
            if d <= ((self.snd_max - una) & MASK):
                self._new_ack(ack, d, now)
                adv = d
            elif d >= HALF:
                if ((una - ack) & MASK) > self.max_snd_wnd:
                    st.counters["tcp_ack_too_old"] += 1         # RFC 5961 §5.2
                    self._challenge(now)
                    return
                adv = -1        # an old duplicate ACK: its window is stale; go on with the text
            else:
                st.counters["drop_tcp_ack_unsent"] += 1         # acks something not yet sent
                self._ctl(self.snd_nxt, ACK)
                return
        elif (not plen and not flags & FIN and wnd == self.snd_wnd and self.snd_max != una
              and wnd and not self.persist and state != SYN_RCVD):
            # RFC 5681 §2 duplicate ACK. Not while probing a zero window: the probe's
            # byte is outstanding and every probe is answered by the same ACK with the
            # same (zero) window, which is not a sign of loss.
            self._dupack(now)
        if adv >= 0:                                            # RFC 9293: SND.UNA =< SEG.ACK
            self._window_update(seq, ack, wnd, adv)
        if self.state == CLOSED:
            return
        # our FIN acknowledged?
        if self.fin_pending and self.snd_una == ((self.fin_seq + 1) & MASK):
            if state == FIN_WAIT_1:
                self.state = state = FIN_WAIT_2
            elif state == CLOSING:
                st.time_wait(self, now)
                return
            elif state == LAST_ACK:
                st.counters["tcp_closed"] += 1
                st.remove(self)
                return
        # seventh: segment text
        if plen or flags & FIN:
            if seq != rn:
                if ((seq - rn) & MASK) < HALF:
                    # out of order: keep it if small (the dup ACK asks for the hole)
                    # (bounded in bytes and in segments: tiny segments would cost ~150 bytes each)
                    if (state in _RX_DATA and self.ooo_bytes + plen <= st.cfg.ooo_limit
                            and (len(self.ooo) < st.cfg.ooo_segments or seq in self.ooo)):
                        st.counters["tcp_rx_out_of_order_queued"] += 1
                        old = self.ooo.get(seq)
                        if old is not None:                 # a retransmitted copy replaces it
                            self.ooo_bytes -= len(old[0])
                        self.ooo[seq] = (f[p:p + plen], flags & FIN)
                        self.ooo_bytes += plen
                    else:
                        st.counters["tcp_rx_out_of_order_dropped"] += 1
                    self.ack_now = True
                    self.output(now)
                    return
                skip = (rn - seq) & MASK
                p += skip
                plen -= skip
                if plen < 0:                                    # only the FIN is new
                    plen = 0
            if plen > self.rwnd:                                # beyond the window: cut, FIN with it
                plen = self.rwnd
                flags &= ~FIN
            if plen and state not in _RX_DATA:
                st.counters["tcp_rx_data_after_fin"] += 1       # after the peer's FIN: not data
                self.ack_now = True
                plen = 0
            elif plen and len(self.q) >= st.cfg.max_queued:
                # a client pipelining requests without reading the replies: take no
                # more (in-window data may be dropped; it will be sent again)
                st.counters["tcp_rx_backpressure"] += 1
                self.ack_now = True
                self.output(now)
                return
            if plen:
                self.rcv_nxt = rn = (rn + plen) & MASK
                data = f[p:p + plen]
                if self.ooo:
                    if flags & FIN:
                        self.ooo.clear()                        # nothing can follow the FIN
                        self.ooo_bytes = 0
                    else:
                        more, fin = self._drain_ooo()
                        data += more
                        plen += len(more)
                        flags |= fin
                        self.ack_now = True                     # RFC 5681 §4.2: a gap was filled
                self.last_act = now
                self.rcv_unacked += plen
                if self._deliver(data, now):
                    pass                                        # the ACK rides on the reply
                elif self.rcv_unacked >= 2 * self.mss:
                    self.ack_now = True                         # RFC 9293 §3.8.6.3: every 2nd full segment
                elif not self.t_ack:
                    t = self.t_ack = now + st.cfg.delack
                    st.arm(self, t)
            if flags & FIN and self.state not in (CLOSE_WAIT, CLOSING, LAST_ACK):
                self.rcv_nxt = (self.rcv_nxt + 1) & MASK
                self.ack_now = True
                st.counters["tcp_fin_received"] += 1
                s = self.state
                if s == ESTABLISHED:
                    self.state = CLOSE_WAIT
                    http = self.http
                    if http is not None and not http.closed:
                        self._deliver(None, now)                # the end of the requests: a partial one gets 400
                    self.close()                                # answer what was asked, then FIN
                elif s == FIN_WAIT_1:
                    if self.snd_una == ((self.fin_seq + 1) & MASK):
                        self._ctl(self.snd_nxt, ACK)
                        st.time_wait(self, now)
                        return
                    self.state = CLOSING
                elif s == FIN_WAIT_2:
                    self._ctl(self.snd_nxt, ACK)
                    st.time_wait(self, now)
                    return
            elif flags & FIN:
                self.ack_now = True                             # a retransmitted FIN: ACK again
        self.output(now)

    def _window_update(self, seq: int, ack: int, wnd: int, adv) -> None:
        """Take the peer's window (SND.UNA =< SEG.ACK; `adv`: the ACK advanced SND.UNA)
        by the rule of the theory of operation: from every ACK that advances SND.UNA,
        else by SND.WL1/SND.WL2 (RFC 9293 §3.10.7.4). The right edge SEG.ACK + SEG.WND
        becomes the limit of every send path; a window that opens ends the persist
        state. (The pure-ACK fast path in segment() inlines this on purpose.)"""
        if adv or (((seq - self.wl1) & MASK) < HALF and (seq != self.wl1 or ((ack - self.wl2) & MASK) < HALF)):
            self.snd_wnd = wnd
            self.snd_edge = (ack + wnd) & MASK
            self.wl1 = seq
            self.wl2 = ack
            if wnd > self.max_snd_wnd:
                self.max_snd_wnd = wnd
            if wnd and self.persist:
                self.persist = False
                self.t_rtx = 0.0

    def _drain_ooo(self):
        """Queued out-of-order bytes that RCV.NXT has now reached: (bytes, FIN flag).
        Advances RCV.NXT over them (the caller delivers them)."""
        out = b""
        ooo = self.ooo
        progress = True
        while progress and ooo:
            progress = False
            for s, (d, fin) in list(ooo.items()):
                off = (self.rcv_nxt - s) & MASK
                if off >= HALF:
                    continue                                    # still beyond RCV.NXT
                del ooo[s]
                self.ooo_bytes -= len(d)
                if off < len(d):
                    out += d[off:]
                    self.rcv_nxt = (s + len(d)) & MASK
                    progress = True
                if fin and off <= len(d):
                    ooo.clear()
                    self.ooo_bytes = 0
                    return out, FIN
        return out, 0

    def _deliver(self, data, now: float) -> bool:
        """In-order request bytes to the HTTP layer; queue the replies (True if any).
        `data` None: the peer's FIN (HTTPConnection.eof), only once `http` exists."""
        http = self.http
        st = self.st
        if http is None:
            # The first data of the connection. One whole request is answered from
            # the shared reply cache (what a fresh HTTPConnection would answer);
            # one that ends the connection (Connection: close) needs no HTTP
            # connection object at all.
            first = st.http_first
            r = first(data) if first is not None else None
            if r is not None:
                replies = (r,)
                self.http = _HTTP_DONE if r.close else st.http_factory()
            else:
                http = self.http = st.http_factory()
                replies = None
        elif http.closed:
            st.counters["tcp_rx_data_ignored"] += 1
            return False
        else:
            replies = None
        if replies is None:
            if self.date_gen != st.date_gen and st.date is not None:
                http.now(st.date)
                self.date_gen = st.date_gen
            replies = http.receive(bytes(data)) if data is not None else http.eof()
        if not replies:
            if not self.t_req and data is not None:             # a request has started
                t = self.t_req = now + st.cfg.request_timeout
                st.arm(self, t)
            return False
        self.t_req = 0.0
        st.counters["http_replies"] += len(replies)
        if st.obs is not None:
            st.obs.replies(self, data, replies, now)            # access log / metrics (appliance/obs)
        q = self.q
        start = self.data_end
        for r in replies:
            resp = r.response
            n = r.length
            e = (start + n) & MASK
            if resp is not None:
                hdr, sum0, body = st.patched(resp, r.close)
                q.append((start, e, n, hdr, resp.header_len, body, resp.sums, sum0))
            else:
                hdr = r.header
                q.append((start, e, n, hdr, len(hdr), r.body if r.body is not None else _EMPTY, None, 0))
            start = e
            if r.close:
                self.data_end = start
                self.close()
                break
        self.data_end = start
        return True

    def _new_ack(self, ack: int, acked: int, now: float) -> None:
        st = self.st
        una = self.snd_una
        flight = (self.snd_max - una) & MASK
        self._acked(ack, now)
        st.counters["tcp_bytes_acked"] += acked
        if self.cc.on_ack(acked, flight, ack):
            st.counters["tcp_newreno_partial_ack"] += 1
            self._retransmit_first(now)
        if self.persist:
            pass                                                # the persist timer keeps running
        elif ack == self.snd_max:
            self.t_rtx = 0.0                                    # RFC 6298 (5.2)
        else:
            self.t_rtx = now + self.rtt.rto                     # RFC 6298 (5.3)

    def _acked(self, ack: int, now: float) -> None:
        """SND.UNA moves to SEG.ACK (new data acknowledged): the RTT sample if the
        timed segment is covered (RFC 6298 §3; Karn: retransmits are not timed),
        and the queue items the ACK covers entirely leave (the send hint follows)."""
        self.snd_una = ack
        if ((self.snd_nxt - ack) & MASK) >= HALF:
            self.snd_nxt = ack                                  # acked beyond snd_nxt (after go-back)
        self.retries = 0
        self.last_act = now
        if self.rtt_t and ((ack - self.rtt_seq) & MASK) < HALF:
            self.rtt.sample(now - self.rtt_t)
            self.rtt_t = 0.0
        q = self.q
        if q and ((ack - q[0][1]) & MASK) < HALF:
            k = 1
            while k < len(q) and ((ack - q[k][1]) & MASK) < HALF:
                k += 1
            del q[:k]
            self.qh = self.qh - k if self.qh > k else 0

    def _dupack(self, now: float) -> None:
        if self.cc.on_dupack((self.snd_max - self.snd_una) & MASK, self.snd_una, self.snd_max):
            self.st.counters["tcp_fast_retransmit"] += 1
            self._retransmit_first(now)

    def _retransmit_first(self, now: float) -> None:
        """Resend the first unacknowledged segment (fast retransmit, partial ACK)."""
        una = self.snd_una
        if una == self.data_end:
            if self.fin_pending and ((self.snd_max - una) & MASK):
                self._ctl(una, ACK | FIN)
                self.st.counters["tcp_retransmits"] += 1
            return
        it, o = self._find(una)
        n = min(it[2] - o, self.mss - (o % self.mss if self.aligned else 0))
        wlim = (self.snd_edge - una) & MASK
        if wlim < n or wlim >= HALF:
            # the window shrank below the segment: send what fits, nothing into a zero
            # window (the RTO / persist timer goes on)
            self.st.counters["tcp_tx_window_clamped"] += 1
            if wlim == 0 or wlim >= HALF:
                return
            n = wlim
        fl = ACK
        if n == it[2] - o:
            fl |= PSH
            if self.fin_pending and ((una + n) & MASK) == self.fin_seq:
                fl |= FIN
        self.rtt_t = 0.0
        self.st.counters["tcp_retransmits"] += 1
        self.st.counters["tcp_retransmit_bytes"] += n
        self._xmit(una, fl, it, o, n, 1 if self.mode else 0)

    def _challenge(self, now: float) -> None:
        """A challenge ACK (RFC 5961 §3.2, §4.2, §5.2), rate-limited per Stack (§7)."""
        if self.st.challenge_ok(now):
            self.st.counters["tcp_challenge_acks"] += 1
            self._ctl(self.snd_nxt, ACK)
        else:
            self.st.counters["tcp_challenge_acks_limited"] += 1

    def close(self) -> None:
        """Send a FIN after everything queued (RFC 9293 §3.10.4 CLOSE)."""
        if self.fin_pending:
            return
        self.fin_pending = True
        self.fin_seq = self.data_end
        if self.state == ESTABLISHED or self.state == SYN_RCVD:
            self.state = FIN_WAIT_1
        elif self.state == CLOSE_WAIT:
            self.state = LAST_ACK

    def abort(self, reason: str) -> None:
        """Send a RST and forget the connection (RFC 9293 §3.10.5 ABORT)."""
        self.st.counters[reason] += 1
        if self.state != SYN_RCVD:
            self._ctl(self.snd_max, RST | ACK)
        self.st.remove(self)

    # ----------------------------------------------------------------- output

    def _find(self, seq: int):
        """The queue item holding `seq` and the offset in it; starts at the hint `qh`
        (sending moves forward through the queue), so a deep pipeline costs no scan."""
        q = self.q
        n = len(q)
        h = self.qh if self.qh < n else 0
        for i in range(h, n):
            it = q[i]
            o = (seq - it[0]) & MASK
            if o < it[2]:
                self.qh = i
                return it, o
        for i in range(h):
            it = q[i]
            o = (seq - it[0]) & MASK
            if o < it[2]:
                self.qh = i
                return it, o
        raise LookupError(f"sequence number {seq} is not in the send queue")

    def output(self, now: float) -> None:
        """Send what the congestion and receive windows allow, a FIN when due, and a
        pending immediate ACK if no segment carried it."""
        nxt = self.snd_nxt
        end = self.data_end
        if nxt == end and not self.ack_now and not self.fin_pending:
            return                                          # the common ACK: nothing to do
        sent = False
        if 0 < ((end - nxt) & MASK) < HALF and self.state != SYN_RCVD:
            una = self.snd_una
            cc = self.cc
            if nxt == una and now - self.last_tx > self.rtt.rto and cc.cwnd > cc.iw:
                cc.cwnd = cc.iw                     # RFC 5681 §4.1: restart window after idle
                self.st.counters["tcp_cwnd_restarts"] += 1
            counters = self.st.counters
            # the usable window ends at the right edge the peer advertised last, and
            # nowhere else (see the theory of operation)
            wlim = (self.snd_edge - una) & MASK
            if wlim >= HALF:
                wlim = 0                                    # the peer shrank its window behind SND.UNA
            if wlim < self.snd_wnd:
                counters["tcp_tx_window_stale"] += 1       # a path moved SND.UNA without the window
            wnd = cc.cwnd if cc.cwnd < wlim else wlim
            smax = self.snd_max
            mss = self.mss
            mode = self.mode
            q = self.q
            while nxt != end:
                inflight = (nxt - una) & MASK
                avail = wnd - inflight
                if avail <= 0:
                    break
                h = self.qh
                it = q[h] if h < len(q) else q[0]
                o = (nxt - it[0]) & MASK
                if o >= it[2]:
                    it, o = self._find(nxt)
                left = it[2] - o
                if mode == 2:
                    want = left if left < self.tso_max else self.tso_max
                    if want > avail and avail >= mss:
                        want = avail - avail % mss
                elif self.aligned:
                    want = mss - o % mss
                    if left < want:
                        want = left
                else:
                    want = left if left < mss else mss
                n = want if want < avail else avail
                if n < want:
                    if inflight:
                        break                               # SWS avoidance (RFC 9293 §3.8.6.2.1)
                    counters["tcp_tx_window_clamped"] += 1  # nothing in flight: what the window allows
                fl = ACK
                e = (nxt + n) & MASK
                if n == left:
                    fl = ACK | PSH
                    if e == end and self.fin_pending:
                        fl = ACK | PSH | FIN
                if ((nxt - smax) & MASK) >= HALF:           # below snd_max: a retransmission
                    counters["tcp_retransmits"] += 1
                    counters["tcp_retransmit_bytes"] += n
                    if self.rtt_t and ((self.rtt_seq - nxt) & MASK) < HALF:
                        self.rtt_t = 0.0                    # Karn
                elif not self.rtt_t:
                    self.rtt_t = now
                    self.rtt_seq = e
                self._xmit(nxt, fl, it, o, n, mode)
                sent = True
                if fl & FIN:
                    nxt = (e + 1) & MASK
                    if ((smax - nxt) & MASK) >= HALF:
                        smax = nxt
                    break
                nxt = e
                if ((smax - nxt) & MASK) >= HALF:
                    smax = nxt
            self.snd_nxt = nxt
            self.snd_max = smax
            if sent:
                self.last_tx = now
            if not sent and nxt == una and wlim < mss and not self.t_rtx and end != nxt:
                # zero (or tiny) window and nothing in flight: persist (RFC 9293 §3.8.6.1)
                self.persist = True
                self.persist_iv = self.rtt.rto
                self.t_rtx = t = now + self.persist_iv
                self.st.arm(self, t)
                self.st.counters["tcp_persist_entered"] += 1
        if self.fin_pending and nxt == end == self.fin_seq and self.state != SYN_RCVD:
            self._ctl(nxt, ACK | FIN)                       # a bare FIN
            self.snd_nxt = nxt = (nxt + 1) & MASK
            if ((self.snd_max - nxt) & MASK) >= HALF:
                self.snd_max = nxt
            sent = True
        if sent:
            if not self.t_rtx:
                t = self.t_rtx = now + self.rtt.rto
                self.st.arm(self, t)
        elif self.ack_now:
            self._ctl(nxt, ACK)
        elif self.rcv_unacked and not self.t_ack:
            # data received, a reply queued but not sendable (window): delayed ACK
            t = self.t_ack = now + self.st.cfg.delack
            self.st.arm(self, t)
        self.ack_now = False

    def _xmit(self, seq: int, flags: int, it, o: int, n: int, mode: int) -> None:
        """Emit bytes [o, o+n) of queue item `it` at `seq` (the Sandstorm fast path)."""
        hdr = it[3]
        hl = it[4]
        if o < hl:
            e = o + n
            if e <= hl:
                prefix = hdr if (o == 0 and e == hl) else hdr[o:e]
                rest = None
            else:
                prefix = hdr[o:] if o else hdr
                rest = it[5][:e - hl]
        else:
            prefix = b""
            rest = it[5][o - hl:o - hl + n]
        h = bytearray(self.tmpl)
        if prefix:
            h += prefix
        tl = 40 + n
        _ip_pack(h, 16, tl, 0, 0x4000, 64, 6, (-(self.ip_const + tl)) % 0xFFFF)
        rn = self.rcv_nxt
        st = self.st
        if mode == 0:
            sums = it[6]
            sm = st.smss
            if sums is not None and o % sm == 0 and (n == sm or o + n == it[2]):
                k = o // sm
                psum = sums[k] if k else it[7]
            else:
                st.counters["tcp_tx_sw_csum"] += 1
                data = bytes(prefix) + (bytes(rest) if rest is not None else b"")
                psum = int.from_bytes(data, "big") << (8 if n & 1 else 0)
            ck = (-(self.tcp_const + seq + rn + (((0x5000 | flags) << 16) | self.rwnd) + tl - 20 + psum)) % 0xFFFF
            gso = None
        else:
            ck = (self.pseudo + tl - 20) % 0xFFFF
            gso = st.gso_csum if (mode == 1 or n <= self.mss) else self.gso
        _tcp_pack(h, 38, seq, rn, 0x5000 | flags, self.rwnd, ck)
        st.txq.append((h, rest, gso))
        self.rcv_unacked = 0
        self.t_ack = 0.0
        c = st.counters
        c["tcp_out_segments"] += 1
        c["tcp_out_bytes"] += n

    def _ctl(self, seq: int, flags: int, opts: bytes = b"") -> None:
        """A segment without data (ACK, FIN, RST; SYN-ACK with `opts`, a multiple of
        4 bytes), full checksum in software. The header comes ready-made, IP length
        and checksum in place: `ctl_tmpl`, or with options from the Stack's cache
        (Stack.opts_template); only SEQ, ACK, flags and the TCP checksum are written."""
        if opts:
            st = self.st
            v = st._opts_cache.get((self.tmpl, opts))
            t, hl, osum = v if v is not None else st.opts_template(self.tmpl, self.ip_const, opts)
            h = bytearray(t)
        else:
            h = bytearray(self.ctl_tmpl)
            hl = 20
            osum = 0
        rn = self.rcv_nxt if flags & ACK else 0
        offflags = (hl << 10) | flags                   # data offset (hl / 4) in the top 4 bits
        ck = (-(self.tcp_const + seq + rn + ((offflags << 16) | self.rwnd) + hl + osum)) % 0xFFFF
        _tcp_pack(h, 38, seq & MASK, rn, offflags, self.rwnd, ck)
        self.st.txq.append((h, None, None))
        self.st.counters["tcp_out_segments"] += 1
        if flags & ACK:
            self.rcv_unacked = 0
            self.t_ack = 0.0

    # ----------------------------------------------------------------- timers

    def deadline(self) -> float:
        d = self.last_act + self.st.cfg.idle_timeout
        t = self.t_rtx
        if t and t < d:
            d = t
        t = self.t_ack
        if t and t < d:
            d = t
        t = self.t_req
        if t and t < d:
            d = t
        return d

    def on_timer(self, now: float) -> None:
        st = self.st
        cfg = st.cfg
        if self.t_ack and self.t_ack <= now:
            st.counters["tcp_delayed_acks"] += 1
            self._ctl(self.snd_nxt, ACK)
        if self.t_rtx and self.t_rtx <= now:
            self._timeout(now)
            if self.state == CLOSED:
                return
        if self.t_req and self.t_req <= now:
            self.t_req = 0.0
            st.counters["tcp_request_timeout"] += 1
            if self.state in (ESTABLISHED, CLOSE_WAIT):
                self.close()
                self.last_act = now
                self.output(now)
        if now - self.last_act >= cfg.idle_timeout:
            if self.state in (ESTABLISHED, CLOSE_WAIT) and self.snd_una == self.data_end:
                st.counters["tcp_idle_close"] += 1
                self.close()
                self.last_act = now
                self.output(now)
            else:
                self.abort("tcp_idle_abort")

    def _timeout(self, now: float) -> None:
        st = self.st
        if self.persist:
            # window probe: one byte of new data (RFC 9293 §3.8.6.1), not counted in
            # flight; if the peer takes it, its ACK moves SND.UNA past SND.NXT
            una = self.snd_una
            if 0 < ((self.snd_edge - una) & MASK) < HALF:
                self.persist = False                        # the window is open: no probe
                self.t_rtx = 0.0
                self.output(now)
                return
            st.counters["tcp_window_probes"] += 1
            if una != self.data_end:
                it, o = self._find(una)
                self._xmit(una, ACK, it, o, 1, 0 if self.mode == 0 else 1)
                e = (una + 1) & MASK
                if ((self.snd_max - e) & MASK) >= HALF:
                    self.snd_max = e
            self.persist_iv = min(self.persist_iv * 2, st.cfg.rto_max)
            self.t_rtx = now + self.persist_iv
            return
        self.retries += 1
        if self.state == SYN_RCVD:
            if self.retries > st.synack_retries(now):
                st.counters["tcp_synack_giveup"] += 1
                st.remove(self)
                return
            st.counters["tcp_synack_retransmits"] += 1
            self.rtt.backoff()
            self.rtt_t = 0.0
            st.send_synack(self)
            self.t_rtx = now + self.rtt.rto
            return
        if self.retries > st.cfg.max_retries:
            self.abort("tcp_rtx_giveup")
            return
        st.counters["tcp_rto"] += 1
        self.cc.on_timeout((self.snd_max - self.snd_una) & MASK, self.snd_max, self.retries == 1)
        self.rtt.backoff()                                  # RFC 6298 (5.5)
        self.rtt_t = 0.0
        self.snd_nxt = self.snd_una                         # go back: resend from the store
        self.t_rtx = 0.0
        self.output(now)
        self.t_rtx = now + self.rtt.rto                     # (5.6) with the backed-off value


def __getattr__(name):
    """`from .conn import Conn6` still works: TCP over IPv6 is conn6.py's (which imports
    this module, hence resolved on first use, PEP 562)."""
    if name == "Conn6":
        from .conn6 import Conn6
        return Conn6
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
