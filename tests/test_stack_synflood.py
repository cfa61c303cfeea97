"""A SYN flood the core cannot absorb, through the serve loop, with a fake clock (issue 10 item 3).

The model. `FloodWire` plays the kernel's side of the RX ring and all the
peers: the ring has RING slots and, like packet_rcv, drops whatever arrives
while it is full. The serve loop reads the clock once per pass; each read is
one pass interval (DT of fake time) during which FLOOD spoofed SYNs (new
4-tuples from 240 sources, valid checksums) arrive, interleaved with the
frames of established keep-alive clients (each sends its next request once
it has the previous reply) and, behind the burst, the SYNs of a few new
clients (each retransmits its SYN every RETX passes until a SYN-ACK comes).
FLOOD per pass is more than one batch: without shedding and draining the
ring overflows, as a real flood does to a core that answers every SYN.
Returning clients (connection per request, each connected once before the
flood) close every connection and open the next. What is measured is per
pass, not wall time: replies delivered to each established client, SYN-ACKs
sent against established frames served (the gate's budget, rings/base.py
SynGate), SYN attempts a new or a returning client needs.
"""
import random
import struct
import sys

from appliance.stack import serve
from appliance.stack.rings.memory import MemoryLink
from appliance.stack.rings.base import SynGate
from appliance.stack.serve import DRAIN, BATCH, parse_mac, run_loop
from appliance.stack.wire import csum

from .stack_support import SERVER_IP, SERVER_MAC, make_stack, make_store

RING = 1024          # the default TPACKET RX ring (rings/tpacket.py)
FLOOD = 400          # spoofed SYNs per pass: more than a batch, less than a drained ring
DT = 0.01            # fake seconds per pass
RETX = 2             # passes between a new client's SYN retransmissions
KEEPALIVE = 6
NEW = 4
PASSES = 200         # 2 s of flood

SMAC = parse_mac(SERVER_MAC)
SIP = bytes(int(x) for x in SERVER_IP.split("."))
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
REQUEST = b"GET /index.html HTTP/1.1\r\nHost: t\r\n\r\n"


def frame(src_ip: bytes, src_mac: bytes, sport: int, seq: int, ack: int, flags: int, data: bytes = b"",
          opts: bytes = b"") -> bytes:
    tcp = _TCP.pack(sport, 80, seq, ack, (20 + len(opts)) << 2, flags, 64240, 0, 0) + opts + data
    ck = csum(tcp, int.from_bytes(src_ip + SIP, "big") + 6 + len(tcp))
    tcp = tcp[:16] + ck.to_bytes(2, "big") + tcp[18:]
    ip = bytearray(_IP.pack(0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src_ip, SIP))
    ip[10:12] = csum(ip).to_bytes(2, "big")
    return SMAC + src_mac + b"\x08\x00" + bytes(ip) + tcp


MSS = b"\x02\x04\x05\xb4"


class Peer:
    """A client at 198.18.0.(10+i): a keep-alive client (`connected`) or a new one."""

    def __init__(self, i: int, close: bool = False):
        self.close = close          # connection per request: RST after each reply, then a new SYN
        self.conns = 0              # connections that carried a reply
        self.ip = bytes([198, 18, 0, 10 + i])
        self.mac = bytes([2, 0, 0, 0, 1, i])
        self.port = 40000 + i
        self.isn = 1000 + 7919 * i
        self.seq = self.isn + 1
        self.ack = 0
        self.state = "syn"          # syn -> est (request sent, waiting) -> ...
        self.attempts = 0
        self.replies = []           # pass numbers at which a complete reply arrived
        self.out = []               # frames to send in the next interval

    def syn(self):
        self.attempts += 1
        return frame(self.ip, self.mac, self.port, self.isn, 0, 0x02, opts=MSS)

    def on_frame(self, seq, ack, flags, data, now_pass):
        if self.state == "syn" and flags & 0x12 == 0x12:
            self.ack = (seq + 1) & 0xFFFFFFFF
            self.out.append(frame(self.ip, self.mac, self.port, self.seq, self.ack, 0x18, REQUEST))
            self.seq += len(REQUEST)
            self.state = "wait"
        elif self.state == "wait" and data and seq == self.ack:
            self.ack = (seq + len(data)) & 0xFFFFFFFF
            self.buf = getattr(self, "buf", b"") + data
            if b"\r\n\r\n" in self.buf:
                head, _, body = self.buf.partition(b"\r\n\r\n")
                n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                if len(body) >= n:
                    assert head.startswith(b"HTTP/1.1 200") and len(body) == n
                    self.buf = b""
                    self.replies.append(now_pass)
                    if self.close:
                        self.out.append(frame(self.ip, self.mac, self.port, self.seq, self.ack, 0x14))   # RST|ACK
                        self.conns += 1
                        self.port += 1              # the next connection: a new 4-tuple, a new ISN
                        self.isn = (self.isn + 104729) & 0xFFFFFFFF
                        self.seq = self.isn + 1
                        self.state = "syn"
                        self.out.append(self.syn())
                        return
                    self.out.append(frame(self.ip, self.mac, self.port, self.seq, self.ack, 0x18, REQUEST))
                    self.seq += len(REQUEST)


class FloodWire:
    def __init__(self, link, stack, peers, new_peers, seed=1):
        self.link = link
        self.st = stack
        self.now = 1000.0
        self.passes = 0
        self.flooding = False
        self.peers = {p.ip: p for p in peers + new_peers}
        self.new = new_peers
        self.rng = random.Random(seed)
        self.ring_drops = 0
        self.answered = []          # SYNs answered (cookie or half-open), per pass
        self.others = []            # frames of connections (not pure SYNs) arriving, per pass
        self._answered = 0

    def deliver(self):
        """What the stack sent since the last pass goes to the peers."""
        c = self.st.counters
        n = c["tcp_syncookies_sent"] + c["tcp_syn_received"]
        self.answered.append(n - self._answered)
        self._answered = n
        for f in self.link.peer.recv():
            if f[12:14] != b"\x08\x00" or f[23] != 6:
                continue
            ihl = (f[14] & 15) * 4
            t = 14 + ihl
            tl = (f[16] << 8) | f[17]
            dport = (f[t + 2] << 8) | f[t + 3]
            seq, ack = struct.unpack_from("!II", f, t + 4)
            flags = f[t + 13]
            data = f[t + ((f[t + 12] >> 4) << 2):14 + tl]
            p = self.peers.get(f[30:34])
            if p is not None and dport == p.port:
                p.on_frame(seq, ack, flags, data, self.passes)

    def clock(self):
        """The serve loop reads the clock once per pass: one interval of arrivals."""
        self.deliver()
        self.passes += 1
        self.now += DT
        arrivals = []
        if self.flooding:
            r = self.rng
            for _ in range(FLOOD):
                src = bytes([198, 19, r.randrange(240), r.randrange(1, 255)])
                arrivals.append(frame(src, b"\x02\x66" + src, r.randrange(1024, 65536), r.randrange(1 << 32), 0,
                                      0x02, opts=MSS))
        for p in self.peers.values():
            for f in p.out:
                arrivals.insert(self.rng.randrange(len(arrivals) + 1), f)
            p.out.clear()
        for p in self.new:          # behind the burst: a retransmitted SYN of a client that waits
            if p.state == "syn" and self.passes % RETX == 0:
                arrivals.append(p.syn())
        self.others.append(sum(1 for f in arrivals if f[47] & 0x16 != 0x02))   # frames of connections
        q = self.link.to_dev
        for f in arrivals:
            if len(q) >= RING:
                self.ring_drops += 1        # the kernel's drop: the ring is full
                continue
            q.append(f)
        return self.now


def _run(wire, passes):
    n = {"left": passes}

    def stop():
        n["left"] -= 1
        return n["left"] < 0
    run_loop(wire.st, wire.link.dev, stop, clock=wire.clock)
    wire.deliver()


def _flood(tmp_path, monkeypatch, keepalive=KEEPALIVE, returning=0, new=NEW, passes=PASSES):
    """Connect `keepalive` + `returning` clients, then flood for `passes` with `new`
    clients trying to get in. Returns (stack, wire, keep-alive, returning, new, first flood pass)."""
    monkeypatch.setattr(serve, "_RNG", random.Random(3))       # which SYNs are kept: repeatable
    st = make_stack(make_store(tmp_path), syn_backlog=128)
    link = MemoryLink(mac=SMAC)
    link.dev.keep_raw = False
    est = [Peer(i) for i in range(keepalive)]
    ret = [Peer(50 + i, close=True) for i in range(returning)]
    wire = FloodWire(link, st, est + ret, [])
    for p in est + ret:                 # connect before the flood
        link.peer.send(p.syn())
    _run(wire, 3)
    assert all(p.replies for p in est + ret), [p.state for p in est + ret]
    fresh = [Peer(100 + i) for i in range(new)]
    for p in fresh:
        wire.peers[p.ip] = p
    wire.new = fresh
    wire.flooding = True
    start = wire.passes
    for p in ret:
        p.attempts = p.conns = 0
    _run(wire, passes)
    c = st.counters
    assert c["drop_internal_error"] == 0 and c["loop_stack_errors"] == 0, st.last_error
    return st, wire, est, ret, fresh, start


def test_syn_flood_keeps_established_clients_served_every_pass_and_lets_new_ones_in(tmp_path, monkeypatch):
    st, wire, est, _, new, start = _flood(tmp_path, monkeypatch)
    end = wire.passes
    c = st.counters
    assert c["tcp_syncookies_sent"] > 0 and c["loop_syn_shed"] > 0
    # established clients: a complete reply in every pass of the flood, none lost in the ring
    # (each request arrives in one pass and is answered in it; the next one leaves after)
    for p in est:
        got = set(p.replies)
        missing = [k for k in range(start + 2, end) if k not in got]
        assert not missing, (p.port, len(missing), wire.ring_drops)
    assert c["tcp_rto"] == 0
    # once the first pass of the flood has filled the backlog (pressure), the flood's work
    # per pass stays within the gate's budget: one SYN per `share` frames of connections
    # in the pass, plus the token bucket (`rate` per second, at most `burst`)
    # (answered[k + 1]: what the pass that took others[k]'s arrivals answered)
    assert st.under_pressure(wire.now) and wire.answered[start + 2] > 128
    g = SynGate()
    per_pass = [a - g.burst - o // g.share for a, o in zip(wire.answered[start + 3:], wire.others[start + 2:])]
    assert max(per_pass) <= 0, per_pass
    assert sum(wire.answered[start + 3:]) <= sum(wire.others[start + 2:]) // g.share + g.rate * PASSES * DT + g.burst
    # every new client, its SYN always behind the burst, gets in: each attempt is kept
    # with probability budget / SYNs of the pass (~16/410: 26 attempts on average)
    assert FLOOD <= DRAIN * BATCH
    assert all(p.replies for p in new), [(p.port, p.attempts, p.state) for p in new]
    assert max(p.attempts for p in new) <= 100, [p.attempts for p in new]
    # after the flood: the half-open entries of spoofed sources go within seconds
    # (pressure: one SYN-ACK retransmission), not after syn_retries' ~63 s
    assert c["tcp_conns_open"] > KEEPALIVE + NEW
    t_end = wire.now
    t = t_end
    while t < t_end + 4.0:
        t += 0.05
        st.poll(t)
        st.txq.clear()
    assert st.n_synrcvd == 0
    assert c["tcp_conns_open"] == KEEPALIVE + NEW, c["tcp_conns_open"]


def test_syn_flood_answers_every_syn_of_a_returning_client_and_only_a_share_of_the_rest(tmp_path, monkeypatch):
    """Connection-per-request clients that connected before the flood (their
    sources are in the stack's syn_trusted) get a SYN-ACK to every SYN in the
    pass it arrives, whatever the flood, so each pass serves them a request;
    the spoofed SYNs get at most one per 8 frames of connections plus the
    token bucket, so the flood's cost stays a share of the work served."""
    st, wire, est, ret, _, start = _flood(tmp_path, monkeypatch, keepalive=24, returning=8, new=0, passes=100)
    assert st.counters["loop_syn_shed"] > 80 * FLOOD
    for p in ret:
        assert p.conns >= 100 // 3 - 1, (p.conns, p.attempts)         # SYN, request, reply: one per 3 passes
        assert p.attempts == p.conns + (p.state == "syn"), (p.conns, p.attempts)    # no SYN was shed
    served = sum(wire.others[start + 2:])             # from the second pass: under pressure
    answered = sum(wire.answered[start + 3:]) - sum(p.attempts for p in ret)
    g = SynGate()
    assert answered <= served // g.share + g.rate * 100 * DT + g.burst, (answered, served)
    assert answered < served * 2 // 3            # (an equal share by count before: >= served)


def test_cookie_synack_is_a_valid_frame_that_carries_a_valid_cookie(tmp_path):
    """The flat cookie SYN-ACK (sums added up from the fields, not summed over
    the bytes): scapy recomputes both checksums; the cookie decodes to the
    peer's MSS rounded down to the table; ack = ISN + 1; MSS option ours."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from appliance.stack.isn import MSS_TABLE
    from .stack_support import check_frame
    st = make_stack(make_store(tmp_path), syncookies="always")
    r = random.Random(9)
    linux = b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + bytes(8) + b"\x01\x03\x03\x07"
    for k in range(300):
        src = bytes([198, 19, r.randrange(256), r.randrange(256)])
        sport, isn = r.randrange(1, 65536), r.choice((0, 0xFFFFFFFF, r.randrange(1 << 32)))
        mss = r.choice((536, 1220, 1460, 1400, 9000, 600))
        opts = r.choice((b"\x02\x04" + mss.to_bytes(2, "big"), b"", linux))
        if opts is linux:
            mss = 1460
        elif not opts:
            mss = 536
        st.receive(frame(src, b"\x02\x66" + src[2:] + b"\0\0", sport, isn, 0, 0x02, opts=opts), 1000.0 + k)
        (out,) = st.txq
        st.txq.clear()
        p = check_frame(out[0])
        assert p[IP].src == SERVER_IP and p[IP].dst == ".".join(map(str, src)) and p[IP].flags == "DF"
        assert p[TCP].sport == 80 and p[TCP].dport == sport and p[TCP].flags == "SA"
        assert p[TCP].ack == (isn + 1) & 0xFFFFFFFF and p[TCP].options == [("MSS", 1460)]
        assert p[Ether].dst == "02:66:" + ":".join(f"{b:02x}" for b in src[2:]) + ":00:00"
        want = max(m for m in MSS_TABLE if m <= min(mss, 1460))
        assert st.isn.check_cookie(src + SIP + struct.pack("!HH", sport, 80), isn, p[TCP].seq, 1000.0 + k) == want
    assert st.counters["tcp_syncookies_sent"] == 300 and not st.conns


def test_syn_gate_budget():
    """SynGate (rings/base.py): idle reads keep `idle`; busy ones one per `share`
    frames plus the token bucket; trusted sources always (up to quota), and
    the untrusted ones drawn evenly."""
    g = SynGate(idle=8, share=8, rate=2000.0, burst=16, rng=random.Random(1))
    assert g.allow(0, 10.0) == g.quota                 # no flood: every SYN (up to quota)
    g.pressure = True
    assert g.allow(0, 10.0) == g.idle                  # nothing else in the read, no tokens yet
    assert g.allow(80, 10.0) == 10                     # 80 frames: 10 SYNs
    g.spend(10)
    assert g.allow(80, 10.0 + 2 ** -8) == 10 + 7       # 3.9 ms of 2000/s: 7.8 tokens
    g.spend(17)
    assert g.allow(80, 10.0 + 2 ** -8) == 10           # spent
    assert g.allow(80, 20.0) == 10 + g.burst           # the bucket holds at most `burst`
    srcs = [bytes([198, 19, 0, k % 250]) for k in range(400)]
    g.trusted[bytes([198, 19, 0, 7])] = None
    keep = g.pick(srcs, 26)
    trusted = [k for k in range(400) if k % 250 == 7]
    assert set(trusted) <= set(keep) and len(keep) == len(trusted) + 26 and keep == sorted(keep)
    others = [k for k in keep if k not in trusted]
    gaps = {(b - a) % 400 for a, b in zip(others, others[1:] + others[:1])}
    assert max(gaps) - min(gaps) <= 2, gaps            # evenly spaced over the read
    assert g.allow(80, 20.0) == 10                     # the 16 tokens went to those beyond the share
    g.quota = 1
    assert g.pick(srcs, 0) == [7]                       # at most quota trusted SYNs a read


def test_syn_flood_lets_a_new_client_in_on_its_first_retransmission(tmp_path, monkeypatch):
    """With no budget at all for first SYNs (no share, no tokens, none when
    idle), new clients that retransmit their SYN after 1 s as RFC 6298 §2
    says (the same addresses, ports and ISN) are each answered on that
    retransmission, and the flood's own SYNs, never repeated, never are."""
    class NoBudget(SynGate):
        def __init__(self, **kw):
            super().__init__(idle=0, share=1 << 30, rate=0.0, burst=0, **kw)
    monkeypatch.setattr(serve, "SynGate", NoBudget)
    monkeypatch.setattr(sys.modules[__name__], "RETX", 100)   # 100 passes of DT: 1 s
    st, wire, est, _, new, start = _flood(tmp_path, monkeypatch, passes=250)
    c = st.counters
    assert c["loop_syn_shed"] > 200 * FLOOD
    assert all(p.replies for p in new), [(p.attempts, p.state) for p in new]
    assert [p.attempts for p in new] == [2] * NEW                  # the first SYN shed, the second kept
    assert c["loop_syn_retransmits"] == NEW
    # under pressure nothing but the retransmissions (and known connections) got an answer
    assert sum(wire.answered[start + 3:]) == NEW


def test_syn_gate_retransmissions():
    """SynGate's memory of the SYNs it saw: a repeat 1-4 s later (an older
    generation) is kept whatever the budget, once, within retry_rate a second;
    a copy at once or after the memory is gone is not; a trusted source needs
    no memory."""
    g = SynGate(retry_rate=100.0, retry_burst=4, rng=random.Random(2))
    g.pressure = True
    key = bytes([198, 18, 0, 9]) + SIP + struct.pack("!HHI", 40000, 80, 12345)
    assert g.pick([key, key], 0, 10.0) == []                       # shed, and the copy too
    assert g.pick([key], 0, 10.2) == []                            # 0.2 s: the same generation
    assert g.pick([b"x" * 16, key], 0, 11.2) == [1] and g.retransmits == 1     # 1.2 s: kept
    assert g.pick([key], 0, 12.4) == []                            # answered once: not again
    assert g.pick([b"y" * 16], 0, 13.0) == []
    assert g.pick([b"y" * 16], 0, 20.0) == []                      # 7 s without a read: all forgotten
    assert g.pick([b"y" * 16], 0, 21.0) == [0] and g.retransmits == 2     # (seen at 20.0: 1 s before)
    # a flood that replays its SYNs every second: retry_burst (4) of each replay get in,
    # min(retry_rate x 1 s, retry_burst), drawn evenly, each key once; the rest are shed
    flood = [bytes([198, 19, k >> 8, k & 255]) + SIP + struct.pack("!HHI", k, 80, k) for k in range(1000)]
    assert g.pick(flood, 0, 40.0) == []
    got = [g.pick(flood, 0, 41.0 + j) for j in range(20)]
    assert [len(k) for k in got] == [4] * 20 and g.retransmits == 2 + 80
    # never the same SYN twice within 4 s (GENS + 1 generations)
    assert all(len(set(got[j] + got[j + 1] + got[j + 2] + got[j + 3])) == 16 for j in range(17))
    # memory stays bounded: at most GEN_MAX keys a generation, GENS + 1 generations
    g.GEN_MAX = 500
    for j in range(10):
        g.pick([bytes([198, 20, j, k & 255, k >> 8]) + bytes(11) for k in range(400)], 0, 70.0 + j * 0.01)
    assert len(g._cur) <= 500 + 400 and len(g._old) <= g.GENS
    assert all(len(o) <= 500 + 400 for o in g._old)
    g.forget(70.5)
    assert g._cur and g._old                                       # a flood may still be on
    g.forget(74.1)
    assert not g._cur and not g._old and g._cur_t is None          # 4 s on: forgotten
    g.trusted[key[:4]] = None                                      # a source that completed a handshake
    assert g.pick([key, key], 0, 90.0) == [0, 1]
