"""TCP server behaviour, grouped by state (smoltcp style), in-memory with a fake clock.

Every frame the stack sends is checked by scapy (checksums recomputed) in
tests.stack_support.Client.collect; the tests assert on sequence numbers,
flags, bytes and state. Each test names the RFC section it checks.
"""
import pytest
from scapy.layers.inet import TCP

from appliance.stack.conn import CLOSING, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, LAST_ACK, SYN_RCVD
from appliance.stack.iface import imf_fixdate
from appliance.stack.rings.base import Offload
from tests.stack_support import Client, expected, make_stack, make_store

M = 0xFFFFFFFF
MODES = {"sw": Offload(), "csum": Offload(True, False), "tso": Offload(True, True)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("tcp"))


@pytest.fixture
def stack(store):
    return make_stack(store)


@pytest.fixture
def client(stack):
    c = Client(stack)
    c.connect()
    return c


def conn_of(c):
    (conn,) = [x for x in c.st.conns.values() if x.peer_port == c.port]
    return conn


def tcp(frames, flags=None):
    return [p for p in frames if TCP in p and (flags is None or str(p[TCP].flags) == flags)]


def payload_len(p):
    return len(p[TCP].payload)


# =========================================================================== LISTEN

class TestListen:
    def test_syn_gets_synack_with_mss_and_window_scale(self, stack):
        """RFC 9293 §3.10.7.2; RFC 7323 §2: Window Scale only when the SYN had it."""
        c = Client(stack)
        (sa,) = c.syn()
        assert sa[TCP].flags == "SA" and sa[TCP].ack == 1001 and sa[TCP].sport == 80 and sa[TCP].dport == 40000
        assert dict(sa[TCP].options) == {"MSS": 1460, "NOP": None, "WScale": 0}
        assert conn_of(c).state == SYN_RCVD

    def test_no_window_scale_sack_or_timestamps_unless_offered(self, stack):
        """RFC 7323 §2.2/§3.2, RFC 2018 §2: we never offer SACK-permitted or timestamps."""
        c = Client(stack)
        (sa,) = c.syn(options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (5, 0))])
        names = [o[0] for o in sa[TCP].options]
        assert names == ["MSS"]

    def test_isn_is_keyed_hash_plus_4us_clock(self, stack):
        """RFC 6528 §3: ISN = M + F(4-tuple, secret); M ticks every 4 µs."""
        key = bytes(16)[:12]
        a = stack.isn.isn(key, 100.0)
        assert (stack.isn.isn(key, 101.0) - a) & M == 250000
        assert stack.isn.isn(b"\1" * 12, 100.0) != a
        c1, c2 = Client(stack, port=1111), Client(stack, port=2222)
        s1, s2 = c1.syn()[0][TCP].seq, c2.syn()[0][TCP].seq
        assert s1 != s2

    def test_ecn_setup_syn_is_answered_without_ecn(self, stack):
        """RFC 3168 §6.1.1: a SYN-ACK without ECE declines ECN; we never mark or echo."""
        c = Client(stack)
        (sa,) = c.send("SEC", options=[("MSS", 1460)])
        assert sa[TCP].flags == "SA"

    def test_data_on_syn_is_not_acknowledged(self, stack):
        """RFC 9293 §3.10.7.2: data on a SYN may be queued; we drop it (the client resends)."""
        c = Client(stack)
        (sa,) = c.send("S", data=b"GET / HTTP/1.1\r\n\r\n", options=[("MSS", 1460)])
        assert sa[TCP].ack == 1001

    def test_connection_cap(self, store):
        st = make_stack(store, max_conns=1)
        Client(st, port=1).connect()
        assert Client(st, port=2).syn() == []
        assert st.counters["drop_tcp_conn_limit"] == 1


# =========================================================================== SYN-RECEIVED

class TestSynReceived:
    def test_lost_synack_is_retransmitted_with_backoff_then_forgotten(self, store):
        """RFC 6298 (2.1) initial RTO 1 s, (5.5) backoff; no RST when giving up."""
        stack = make_stack(store, idle_timeout=600)
        c = Client(stack)
        (sa,) = c.syn()
        times = []
        out = []
        for _ in range(16):
            d = stack.poll(c.now)
            c.now = d
            new = c.advance(0)
            if not new and not stack.conns:
                break
            if new:                     # (a timer entry may come due early: no output then)
                times.append(c.now)
            out += new
        assert [p[TCP].flags for p in out] == ["SA"] * 5
        assert all(p[TCP].seq == sa[TCP].seq for p in out)
        gaps = [round(b - a, 3) for a, b in zip([1000.0] + times, times)]
        assert gaps[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
        assert not stack.conns and stack.n_synrcvd == 0 and stack.counters["tcp_synack_giveup"] == 1

    def test_retransmitted_syn_gets_the_synack_again(self, stack):
        c = Client(stack)
        (sa,) = c.syn()
        (sa2,) = c.send("S", seq=1000, options=[("MSS", 1460)])
        assert sa2[TCP].flags == "SA" and sa2[TCP].seq == sa[TCP].seq

    def test_unacceptable_ack_gets_reset(self, stack):
        """RFC 9293 §3.10.7.4 SYN-RECEIVED: bad ACK -> <SEQ=SEG.ACK><CTL=RST>."""
        c = Client(stack)
        (sa,) = c.syn()
        (r,) = c.send("A", ack=(sa[TCP].seq + 5) & M, advance=False)
        assert r[TCP].flags == "R" and r[TCP].seq == (sa[TCP].seq + 5) & M
        assert conn_of(c).state == SYN_RCVD

    def test_rst_in_syn_received_removes_the_connection(self, stack):
        c = Client(stack)
        c.syn()
        c.send("R", ack=0)
        assert not stack.conns and stack.n_synrcvd == 0

    def test_handshake_ack_carrying_the_request(self, stack, store):
        """The third segment of the handshake may carry data (RFC 9293 §3.5)."""
        c = Client(stack)
        (sa,) = c.syn()
        c.server_isn = sa[TCP].seq
        c.ack = (sa[TCP].seq + 1) & M
        out = c.send("PA", data=c.request("/"))
        data, _ = c.fetch(out)
        assert data == expected(store, "/")
        assert conn_of(c).state == ESTABLISHED and stack.n_synrcvd == 0


# =========================================================================== ESTABLISHED

class TestEstablishedData:
    @pytest.mark.parametrize("mode", sorted(MODES))
    @pytest.mark.parametrize("path", ["/", "/big.bin", "/odd.txt", "/empty.txt", "/missing"])
    def test_get_returns_the_exact_bytes(self, store, mode, path):
        """The Sandstorm data path: prebuilt bytes, Date and Connection patched, checksums
        fixed from stored sums (RFC 1624) or offloaded; scapy checks every frame."""
        st = make_stack(store, MODES[mode])
        c = Client(st)
        c.connect()
        data, frames = c.get(path)
        assert data == expected(store, path)
        assert imf_fixdate(1764150000) in data
        assert st.counters["tcp_tx_sw_csum"] == 0
        if mode == "tso" and path == "/big.bin":
            assert any(f[2] is not None and f[2].gso_size == 1460 for f in c.raw_frames)
        if mode == "sw":
            assert all(f[2] is None for f in c.raw_frames)
            for p in tcp(frames):
                assert payload_len(p) <= 1460

    def test_payload_is_not_copied_in_python(self, store):
        """Principle 2: the body of a data segment is a memoryview of the store's blob."""
        st = make_stack(store)
        c = Client(st)
        c.connect()
        c.send("PA", data=c.request("/big.bin"))
        views = [f[1] for f in c.raw_frames if f[1] is not None]
        assert views and all(isinstance(v, memoryview) and v.obj is store.blob.obj for v in views)

    def test_first_flight_is_iw10_then_slow_start(self, client, store):
        """RFC 6928: initial window 10 segments; RFC 5681 §3.1 slow start grows it per ACK."""
        out = client.send("PA", data=client.request("/big.bin"))
        segs = tcp(out)
        assert len(segs) == 10 and sum(map(payload_len, segs)) == 14600
        assert segs[-1][TCP].ack == client.seq
        # one (stretch) ACK for two segments: byte counting (RFC 3465) grows cwnd by the
        # 2 SMSS acked: the 2 freed segments + 2 more go out
        client.ack = (segs[1][TCP].seq + 1460) & M
        more = tcp(client.send("A"))
        assert len(more) == 4
        assert conn_of(client).cc.cwnd == 12 * 1460

    def test_pure_ack_fast_path_updates_window_cwnd_and_queue(self, client, store):
        """Header prediction (RFC 9293 §3.10.7.4): a pure in-order ACK of new data does
        what the general path does: SND.UNA, the send window (SND.WL1/WL2), congestion
        avoidance by byte counting (RFC 5681 §3.1, RFC 3465), RTO timer, and frees
        the fully acknowledged reply."""
        out = client.send("PA", data=client.request("/big.bin"))
        segs = tcp(out)
        conn = conn_of(client)
        conn.cc.ssthresh = conn.cc.cwnd = 4 * 1460        # congestion avoidance from here
        conn.cc.bytes_acked = 0
        client.window = 300                               # scaled by 2**7: 38400 bytes
        client.ack = (segs[2][TCP].seq + 1460) & M
        more = tcp(client.send("A"))
        assert conn.snd_una == client.ack and conn.snd_wnd == 300 << 7
        assert conn.wl2 == client.ack and conn.wl1 == client.seq
        assert conn.cc.cwnd == 4 * 1460 and conn.cc.bytes_acked == 3 * 1460
        assert conn.t_rtx                                 # data still outstanding (RFC 6298 (5.3))
        assert more == []                                 # 7 SMSS still in flight >= cwnd
        client.ack = (segs[3][TCP].seq + 1460) & M        # 4 SMSS counted: cwnd + 1 SMSS
        client.send("A")
        assert conn.cc.cwnd == 5 * 1460 and conn.cc.bytes_acked == 0
        for _ in range(30):                               # ACK the rest: the reply leaves the queue
            if conn.snd_una == conn.data_end:
                break
            client.ack = conn.snd_max
            client.send("A")
        assert conn.q == [] and conn.snd_una == conn.snd_max and not conn.t_rtx

    def test_peer_receive_window_is_respected(self, store):
        """RFC 9293 §3.8.6: never send beyond SND.UNA + SND.WND."""
        st = make_stack(store)
        c = Client(st, wscale=None, window=2920)
        c.connect(options=[("MSS", 1460)])
        out = tcp(c.send("PA", data=c.request("/big.bin")))
        assert sum(map(payload_len, out)) == 2920

    def test_window_scale_of_the_peer_is_applied(self, store):
        """RFC 7323 §2.3: SEG.WND << Snd.Wind.Shift on every non-SYN segment."""
        st = make_stack(store)
        c = Client(st, wscale=2, window=1000)          # 4000 bytes after scaling
        c.connect()
        out = tcp(c.send("PA", data=c.request("/big.bin")))
        assert sum(map(payload_len, out)) == 2 * 1460  # 4000 -> two full segments (SWS avoidance)

    def test_pipelined_requests_get_replies_in_order(self, client, store):
        """RFC 9112 §9.3.2: pipelining; each reply starts a new segment run."""
        reqs = client.request("/") + client.request("/odd.txt") + client.request("/missing")
        out = client.send("PA", data=reqs)
        data, _ = client.fetch(out)
        assert data == expected(store, "/") + expected(store, "/odd.txt") + expected(store, "/missing")
        assert client.st.counters["http_replies"] == 3

    def test_partial_request_is_acked_after_the_delayed_ack_timeout(self, client, store):
        """RFC 9293 §3.8.6.3 delayed ACK (< 0.5 s); the ACK rides on the response otherwise."""
        req = client.request("/")
        assert client.send("PA", data=req[:10]) == []
        (a,) = client.advance(0.05)
        assert a[TCP].flags == "A" and a[TCP].ack == client.seq
        out = client.send("PA", data=req[10:])
        data, _ = client.fetch(out)
        assert data == expected(store, "/")

    def test_duplicate_request_segment_is_acked_not_answered_twice(self, client):
        """RFC 9293 §3.10.7.4: an old segment gets an ACK and is dropped."""
        req = client.request("/")
        out = client.send("PA", data=req)
        client.ack_all(out)
        (a,) = client.send("PA", data=req, seq=client.seq - len(req))
        assert a[TCP].flags == "A" and a[TCP].ack == client.seq and payload_len(a) == 0
        assert client.st.counters["http_replies"] == 1

    def test_out_of_order_data_is_queued_with_an_immediate_dup_ack(self, client, store):
        """RFC 5681 §4.2: an out-of-order segment gets an immediate ACK; it is kept and
        used once the hole is filled (RFC 9293 §3.10.7.4)."""
        req = client.request("/") + client.request("/odd.txt")
        (a,) = client.send("PA", data=req[30:], seq=client.seq + 30, advance=False)
        assert a[TCP].ack == client.seq and payload_len(a) == 0
        (a,) = client.send("PA", data=req[10:20], seq=client.seq + 10, advance=False)
        assert a[TCP].ack == client.seq
        assert client.st.counters["tcp_rx_out_of_order_queued"] == 2
        out = client.send("PA", data=req[:10], advance=False)
        assert out and out[0][TCP].ack == client.seq + 20          # 10..20 joined, 20..30 missing
        out += client.send("PA", data=req[:30])                    # the client resends from the hole
        client.seq = client.seq + len(req) - 30
        data, _ = client.fetch(out)
        assert data == expected(store, "/") + expected(store, "/odd.txt")

    def test_out_of_order_fin_is_kept(self, client, store):
        req = client.request("/")
        client.send("FA", data=req[10:], seq=client.seq + 10, advance=False)
        out = client.send("PA", data=req[:10], advance=False)
        client.seq += len(req) + 1
        assert conn_of(client).state == LAST_ACK
        data, frames = client.fetch(out)
        assert data == expected(store, "/")
        assert client.st.counters["tcp_fin_received"] == 1 and any("F" in p[TCP].flags for p in tcp(frames))

    def test_out_of_order_beyond_the_limit_is_dropped(self, store):
        st = make_stack(store, ooo_limit=8)
        c = Client(st)
        c.connect()
        c.send("PA", data=b"x" * 20, seq=c.seq + 10, advance=False)
        assert st.counters["tcp_rx_out_of_order_dropped"] == 1 and not conn_of(c).ooo

    def test_retransmitted_out_of_order_segment_is_counted_once(self, store):
        """The queue's byte count follows what it holds: a duplicate of a queued
        out-of-order segment replaces it, so the limit is not used up by copies."""
        st = make_stack(store, ooo_limit=64)
        c = Client(st)
        c.connect()
        for _ in range(5):
            c.send("PA", data=b"x" * 20, seq=c.seq + 10, advance=False)
        conn = conn_of(c)
        assert conn.ooo_bytes == 20 and len(conn.ooo) == 1
        c.send("PA", data=b"y" * 20, seq=c.seq + 40, advance=False)
        assert conn.ooo_bytes == 40 and st.counters["tcp_rx_out_of_order_dropped"] == 0

    def test_segment_overlapping_received_data_is_trimmed(self, client, store):
        """RFC 9293 §3.10.7.4: only the new part of a partly old segment is used."""
        req = client.request("/")
        client.send("PA", data=req[:10])
        out = client.send("PA", data=req, seq=client.seq - 10, advance=False)
        client.seq += len(req) - 10
        data, _ = client.fetch(out)
        assert data == expected(store, "/")

    def test_small_peer_mss_cuts_smaller_with_software_sums(self, store):
        """Peer MSS below the store's: segments of 536 bytes, sums computed in software."""
        st = make_stack(store)
        c = Client(st, mss=536)
        c.connect()
        data, frames = c.get("/odd.txt")
        assert data == expected(store, "/odd.txt")
        assert max(map(payload_len, tcp(frames))) == 536
        assert st.counters["tcp_tx_sw_csum"] > 0

    def test_no_mss_option_means_536(self, store):
        """RFC 9293 §3.7.1 / RFC 6691: without the option, SMSS is 536."""
        st = make_stack(store)
        c = Client(st)
        c.connect(options=[])
        data, frames = c.get("/odd.txt")
        assert data == expected(store, "/odd.txt") and max(map(payload_len, tcp(frames))) == 536

    def test_date_follows_set_date(self, client, store):
        client.st.set_date(1764150001)
        data, _ = client.get("/")
        assert data == expected(store, "/", date=imf_fixdate(1764150001))

    def test_keep_alive_many_requests(self, client, store):
        for path in ["/", "/odd.txt", "/big.bin", "/"] * 3:
            data, _ = client.get(path)
            assert data == expected(store, path)
        assert conn_of(client).q == []


class TestEstablishedLoss:
    def test_rto_retransmits_from_the_store_with_backoff(self, client, store):
        """RFC 6298 (5.4)-(5.6): retransmit the earliest segment, double the RTO; RFC 5681
        §3.1: cwnd falls to one segment (loss window)."""
        out = client.send("PA", data=client.request("/"))   # lost
        (orig,) = tcp(out)
        c = conn_of(client)
        rto = c.rtt.rto
        assert rto == pytest.approx(0.2)
        d = client.st.poll(client.now)
        assert d == pytest.approx(client.now + rto)
        client.now = d
        (again,) = client.advance(0)
        assert bytes(again[TCP].payload) == bytes(orig[TCP].payload) and again[TCP].seq == orig[TCP].seq
        assert c.rtt.rto == pytest.approx(0.4) and c.cc.cwnd == 1460
        assert client.st.counters["tcp_rto"] == 1 and client.st.counters["tcp_retransmits"] == 1
        data, _ = client.fetch([again])
        assert data == expected(store, "/")

    def test_fast_retransmit_after_three_dup_acks_and_newreno(self, client, store):
        """RFC 5681 §3.2: 3 dup ACKs -> retransmit, ssthresh = flight/2, cwnd = ssthresh + 3 SMSS;
        RFC 6582 §3.2: a partial ACK retransmits the next hole at once."""
        out = tcp(client.send("PA", data=client.request("/big.bin")))
        assert len(out) == 10
        first = out[0][TCP].seq
        stream = {p[TCP].seq: bytes(p[TCP].payload) for p in out}
        # segments 2 and 5 are lost; ACK segments 0-1 (cum), then dup ACKs for 3, 4
        client.ack = (first + 2 * 1460) & M
        new = tcp(client.send("A"))
        for p in new:
            stream[p[TCP].seq] = bytes(p[TCP].payload)
        c = conn_of(client)
        flight = (c.snd_max - c.snd_una) & M
        rx = []
        for _ in range(3):
            rx += tcp(client.send("A"))
        retx = [p for p in rx if p[TCP].seq == (first + 2 * 1460) & M]
        assert retx and bytes(retx[0][TCP].payload) == stream[(first + 2 * 1460) & M]
        assert c.cc.in_recovery and c.cc.ssthresh == max(flight // 2, 2 * 1460)
        assert client.st.counters["tcp_fast_retransmit"] == 1
        # partial ACK up to the second hole: it is retransmitted immediately
        client.ack = (first + 5 * 1460) & M
        part = tcp(client.send("A"))
        assert any(p[TCP].seq == client.ack for p in part)
        assert client.st.counters["tcp_newreno_partial_ack"] == 1
        data, _ = client.fetch(part + rx + new + out[5:])
        full = expected(store, "/big.bin")
        assert data == full[5 * 1460:]

    @pytest.mark.parametrize("mode", sorted(MODES))
    @pytest.mark.parametrize("seed", [7, 8])
    def test_transfer_survives_loss_reordering_and_duplication(self, store, mode, seed):
        """A lossy link both ways (20% of data segments lost, ACKs lost, duplicated and
        reordered): RTO, fast retransmit and NewReno rebuild everything from the store."""
        import random
        from tests.stack_support import assemble
        rnd = random.Random(seed)
        st = make_stack(store, MODES[mode])
        c = Client(st)
        c.connect()
        stream = {}
        start = c.ack
        full = expected(store, "/big.bin") * 3
        req = c.request("/big.bin")
        pending = tcp(c.send("PA", data=req * 3))
        acks = []
        data = b""
        for _ in range(600):
            for p in pending:
                if rnd.random() < 0.2:
                    continue                                     # lost
                if payload_len(p):
                    stream[p[TCP].seq] = bytes(p[TCP].payload)
            data = assemble(stream, start)
            if len(data) == len(full):
                break
            acks.append((start + len(data)) & M)
            if rnd.random() < 0.3:
                acks.append(acks[-1])                            # duplicated
            rnd.shuffle(acks)                                    # reordered
            pending = []
            while acks:
                a = acks.pop()
                if rnd.random() < 0.1:
                    continue                                     # lost
                c.ack = a
                pending += tcp(c.send("A"))
            if not pending:
                pending = tcp(c.run_until(c.st.poll(c.now) + 0.001))
        assert data == full
        assert st.counters["tcp_retransmits"] > 0 and st.counters["drop_internal_error"] == 0


def test_cwnd_restarts_after_idle(client):
    """RFC 5681 §4.1: after an idle period longer than the RTO, cwnd restarts at IW."""
    client.get("/big.bin")
    conn = conn_of(client)
    assert conn.cc.cwnd > conn.cc.iw
    client.now += 5
    out = tcp(client.send("PA", data=client.request("/big.bin")))
    assert sum(map(payload_len, out)) == 14600 and client.st.counters["tcp_cwnd_restarts"] == 1


class TestZeroWindow:
    def test_zero_window_persist_probe_then_resume(self, store):
        """RFC 9293 §3.8.6.1: with a zero window, probe periodically (backing off);
        resume when the window opens. RFC 1122 §4.2.2.17."""
        st = make_stack(store)
        c = Client(st, window=0, wscale=None)
        c.connect(options=[("MSS", 1460)])
        assert tcp(c.send("PA", data=c.request("/odd.txt"))) == []
        conn = conn_of(c)
        assert conn.persist
        probes, times = [], []
        for _ in range(50):                      # follow the deadlines the stack reports
            c.now = st.poll(c.now)
            for p in tcp(c.advance(0)):
                if payload_len(p):
                    probes.append(p)
                    times.append(c.now)
                    c.send("A", window=0)        # still zero window: ACK without taking the byte
            if len(probes) == 3:
                break
        assert [payload_len(p) for p in probes] == [1, 1, 1]
        assert all(p[TCP].seq == probes[0][TCP].seq for p in probes)
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert gaps[1] == pytest.approx(2 * gaps[0])   # backing off
        assert st.counters["tcp_window_probes"] == 3 and conn.state == ESTABLISHED
        out = tcp(c.send("A", window=64000))
        data, _ = c.fetch(out)
        assert data == expected(store, "/odd.txt")


class TestEstablishedSecurity:
    def test_rst_with_exact_sequence_number_resets(self, client):
        """RFC 5961 §3.2: RST with SEG.SEQ == RCV.NXT resets the connection."""
        client.send("R")
        assert not client.st.conns and client.st.counters["tcp_rst_received"] == 1

    def test_in_window_rst_gets_challenge_ack(self, client):
        """RFC 5961 §3.2: in window but not exact -> challenge ACK, connection stays."""
        (a,) = client.send("R", seq=client.seq + 100, advance=False)
        assert a[TCP].flags == "A" and a[TCP].ack == client.seq
        assert conn_of(client).state == ESTABLISHED and client.st.counters["tcp_challenge_acks"] == 1

    def test_out_of_window_rst_is_dropped_silently(self, client):
        assert client.send("R", seq=client.seq + 200000, advance=False) == []
        assert conn_of(client).state == ESTABLISHED

    def test_syn_in_established_gets_challenge_ack(self, client):
        """RFC 5961 §4.2: any SYN in a synchronized state -> challenge ACK."""
        (a,) = client.send("S", seq=client.seq, advance=False)
        assert a[TCP].flags == "A" and a[TCP].ack == client.seq
        assert conn_of(client).state == ESTABLISHED

    def test_ack_of_unsent_data_is_answered_and_dropped(self, client):
        """RFC 9293 §3.10.7.4: SEG.ACK > SND.NXT -> send ACK, drop the segment."""
        (a,) = client.send("PA", data=client.request("/"), ack=(client.ack + 5000) & M, advance=False)
        assert a[TCP].flags == "A" and payload_len(a) == 0
        assert client.st.counters["http_replies"] == 0

    def test_too_old_ack_gets_challenge_ack(self, client):
        """RFC 5961 §5.2: SEG.ACK < SND.UNA - MAX.SND.WND -> challenge ACK, drop."""
        (a,) = client.send("PA", data=client.request("/"), ack=(client.ack - 100000000) & M, advance=False)
        assert a[TCP].flags == "A" and client.st.counters["tcp_ack_too_old"] == 1
        assert client.st.counters["http_replies"] == 0

    def test_challenge_acks_are_rate_limited(self, store):
        """RFC 5961 §7: a limit on challenge ACKs."""
        st = make_stack(store, challenge_ack_limit=3)
        c = Client(st)
        c.connect()
        sent = [len(c.send("R", seq=c.seq + 10 + i, advance=False)) for i in range(6)]
        assert sent == [1, 1, 1, 0, 0, 0] and st.counters["tcp_challenge_acks_limited"] == 3


# =========================================================================== closing

class TestClose:
    def test_connection_close_then_fin_wait_and_time_wait(self, client, store):
        """RFC 9293 §3.6: FIN-WAIT-1 -> FIN-WAIT-2 -> TIME-WAIT; 2*MSL expiry; RFC 1337:
        RSTs in TIME-WAIT are ignored; a retransmitted FIN is acknowledged again."""
        out = client.send("PA", data=client.request("/", b"Connection: close\r\n"))
        segs = tcp(out)
        assert "F" in segs[-1][TCP].flags
        data, _ = client.fetch([p for p in segs])
        assert data == expected(store, "/", close=True)
        conn = conn_of(client)
        assert conn.state == FIN_WAIT_2
        client.send("FA")
        assert not client.st.conns and len(client.st.tw) == 1
        (a,) = client.send("FA", seq=client.seq - 1, advance=False)
        assert a[TCP].flags == "A" and a[TCP].ack == client.seq
        assert client.send("R", seq=client.seq, advance=False) == []
        assert len(client.st.tw) == 1
        client.run_until(client.now + 61)
        assert not client.st.tw

    def test_repeated_close_request_from_the_reply_cache(self, store):
        """A fresh connection whose first segment is a whole request seen before
        (Connection: close) is answered from the shared reply cache without an
        HTTP connection object: the same bytes on the wire, the same FIN, and data
        after it is ignored and acknowledged, as on the first connection."""
        st = make_stack(store)
        seen = []
        for port in (40001, 40002):
            c = Client(st, port=port)
            c.connect()
            out = c.send("PA", data=c.request("/", b"Connection: close\r\n"))
            data, _ = c.fetch(list(out))
            assert data == expected(store, "/", close=True)
            assert "F" in tcp(out)[-1][TCP].flags and conn_of(c).state == FIN_WAIT_2
            before = st.counters["tcp_rx_data_ignored"]
            out = c.send("PA", data=c.request("/"))
            (a,) = tcp(out + c.run_until(c.now + 0.1))            # a delayed ACK
            assert a[TCP].flags == "A" and a[TCP].ack == c.seq
            assert st.counters["tcp_rx_data_ignored"] == before + 1
            seen.append(data)
        assert seen[0] == seen[1] and st.counters["http_replies"] == 2

    def test_keepalive_connection_whose_first_request_is_cached_serves_more(self, store):
        """A fresh connection's first request answered from the shared cache still
        gets an HTTP connection for the requests that follow it."""
        st = make_stack(store)
        for port in (40011, 40012):                 # the second one's first request is cached
            c = Client(st, port=port)
            c.connect()
            for path in ("/", "/odd.txt", "/"):
                data, _ = c.fetch(list(c.send("PA", data=c.request(path))))
                assert data == expected(store, path)
            assert conn_of(c).state == ESTABLISHED
        assert st.counters["http_replies"] == 6

    def test_client_closes_first_close_wait_last_ack(self, client):
        """RFC 9293 §3.6: CLOSE-WAIT -> LAST-ACK -> CLOSED, no TIME-WAIT for us."""
        out = tcp(client.send("FA"))
        (f,) = out
        assert f[TCP].flags == "FA" and f[TCP].ack == client.seq
        assert conn_of(client).state == LAST_ACK
        assert client.st.counters["tcp_conns_open"] == 1
        client.ack = (client.ack + 1) & M
        client.send("A")
        assert not client.st.conns and not client.st.tw
        assert client.st.counters["tcp_closed"] == 1 and client.st.counters["tcp_conns_open"] == 0

    def test_half_close_after_request_still_answers(self, client, store):
        """RFC 9112 §9.6: a client may half-close after its request; the reply is sent, then FIN."""
        out = client.send("PA", data=client.request("/"))
        out += client.send("FA")
        data, _ = client.fetch(out)
        assert data == expected(store, "/")
        assert any("F" in p[TCP].flags for p in tcp(client.frames))

    def test_simultaneous_close_closing_state(self, client):
        """RFC 9293 §3.6: FIN received in FIN-WAIT-1 before our FIN is acked -> CLOSING."""
        out = client.send("PA", data=client.request("/", b"Connection: close\r\n"))
        assert conn_of(client).state == FIN_WAIT_1
        fin_end = max((p[TCP].seq + payload_len(p) + 1) & M for p in tcp(out))
        client.send("FA")
        conn = conn_of(client)
        assert conn.state == CLOSING
        client.ack = fin_end
        client.send("A", seq=client.seq)
        assert not client.st.conns and len(client.st.tw) == 1

    def test_bad_request_gets_400_and_close(self, client):
        out = client.send("PA", data=b"BLAH\r\n\r\n")
        data, _ = client.fetch(out)
        assert data.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in data
        assert conn_of(client).state == FIN_WAIT_2

    def test_idle_connection_is_closed_with_fin(self, client):
        """Idle limit: a keep-alive connection without activity for idle_timeout gets a FIN."""
        out = client.run_until(client.now + 61)
        assert str(tcp(out)[0][TCP].flags) == "FA"
        assert conn_of(client).state == FIN_WAIT_1

    def test_incomplete_request_times_out(self, client):
        """Request timeout: a started request that never completes (slowloris) is closed."""
        client.send("PA", data=b"GET / HTTP/1.1\r\n")
        for i in range(5):
            client.run_until(client.now + 5)
            client.send("PA", data=b"X-a: b\r\n")
        out = client.run_until(client.now + 6)
        assert any("F" in p[TCP].flags for p in tcp(out))
        assert client.st.counters["tcp_request_timeout"] == 1

    def test_silent_peer_is_aborted_after_max_retries(self, store):
        """RFC 9293 §3.8.3 (R2): give up after retransmitting for long enough; send a RST."""
        client = Client(make_stack(store, idle_timeout=1000))
        client.connect()
        client.send("PA", data=client.request("/"))
        out = client.run_until(client.now + 400)
        assert str(tcp(out)[-1][TCP].flags) == "RA"
        assert not client.st.conns and client.st.counters["tcp_rtx_giveup"] == 1
        assert client.st.counters["tcp_rto"] == 8


# =========================================================================== SYN cookies

class TestSynCookies:
    def test_cookie_handshake_keeps_no_state_and_serves(self, store):
        """RFC 4987 §3.6: SYN cookies; no Window Scale without timestamps (RFC 7323 §2.2)."""
        st = make_stack(store, syncookies="always")
        c = Client(st)
        (sa,) = c.syn()
        assert not st.conns and [o[0] for o in sa[TCP].options] == ["MSS"]
        c.server_isn = sa[TCP].seq
        c.ack = (sa[TCP].seq + 1) & M
        out = c.send("PA", data=c.request("/odd.txt"))
        assert st.counters["tcp_syncookies_accepted"] == 1
        data, _ = c.fetch(out)
        assert data == expected(store, "/odd.txt")

    def test_forged_cookie_gets_reset(self, store):
        st = make_stack(store, syncookies="always")
        c = Client(st)
        (sa,) = c.syn()
        (r,) = c.send("A", ack=(sa[TCP].seq + 2) & M, advance=False)
        assert r[TCP].flags == "R" and not st.conns

    def test_syn_flood_does_not_stop_a_legitimate_client(self, store):
        """Issue 3: a SYN flood fills the backlog; cookies let new clients in, established
        ones keep being served."""
        st = make_stack(store, syn_backlog=8)
        old = Client(st, port=50000)
        old.connect()
        for i in range(200):
            Client(st, port=10000 + i, ip=f"198.18.1.{i % 250 + 1}").syn()
        assert st.n_synrcvd == 8 and st.counters["tcp_syncookies_sent"] == 192
        new = Client(st, port=50001)
        new.connect()
        data, _ = new.get("/")
        assert data == expected(store, "/")
        data, _ = old.get("/odd.txt")
        assert data == expected(store, "/odd.txt")

    def test_backlog_full_without_cookies_is_counted_as_such(self, store):
        """With cookies off, SYNs beyond the backlog are dropped under their own counter
        (not as an internal error)."""
        st = make_stack(store, syn_backlog=4, syncookies="never")
        for i in range(10):
            Client(st, port=20000 + i).syn()
        assert st.n_synrcvd == 4
        assert st.counters["drop_tcp_syn_backlog_full"] == 6
        assert st.counters["drop_internal_error"] == 0


class TestTimeWaitReopen:
    def test_new_syn_with_higher_sequence_reopens_time_wait(self, client, store):
        """RFC 9293 §3.10.7.4 / RFC 6191: a SYN above RCV.NXT may reopen a TIME-WAIT connection."""
        out = client.send("PA", data=client.request("/", b"Connection: close\r\n"))
        client.fetch(out)
        client.send("FA")
        assert len(client.st.tw) == 1
        client.now += 1
        client.seq += 100000
        client.connect()
        assert not client.st.tw and conn_of(client).state == ESTABLISHED
        data, _ = client.get("/")
        assert data == expected(store, "/")

    def test_syn_with_lower_sequence_also_reopens_time_wait(self, client, store):
        """Port reuse by a client while we hold TIME-WAIT: served at once (no 1 s stall)."""
        out = client.send("PA", data=client.request("/", b"Connection: close\r\n"))
        client.fetch(out)
        client.send("FA")
        client.seq = (client.seq - 5000) & M
        client.connect()
        assert not client.st.tw and client.st.counters["tcp_time_wait_reopened_lower_seq"] == 1
        data, _ = client.get("/")
        assert data == expected(store, "/")

    def test_syn_refused_at_the_connection_cap_keeps_time_wait(self, store):
        """A SYN that cannot be taken (max_conns) must not throw away TIME-WAIT state:
        a retransmitted FIN is still acknowledged, not reset."""
        st = make_stack(store, max_conns=1)
        c = Client(st)
        c.connect()
        out = c.send("PA", data=c.request("/", b"Connection: close\r\n"))
        c.fetch(out)
        c.send("FA")
        assert len(st.tw) == 1
        other = Client(st, port=40001)
        other.connect()                                   # fills the table (max_conns=1)
        c.now += 1
        c.seq += 100000
        assert not c.syn()                                # dropped at the cap ...
        assert len(st.tw) == 1 and st.counters["drop_tcp_conn_limit"] == 1   # ... TIME-WAIT kept
        c.seq -= 100000
        (a,) = c.send("FA", seq=c.seq - 1, advance=False)
        assert a[TCP].flags == "A"

    def test_ack_in_time_wait_is_answered_with_an_ack(self, client):
        out = client.send("PA", data=client.request("/", b"Connection: close\r\n"))
        client.fetch(out)
        client.send("FA")
        (a,) = client.send("A", seq=client.seq - 1, advance=False)
        assert a[TCP].flags == "A" and a[TCP].ack == client.seq and len(client.st.tw) == 1


class TestLastAck:
    def test_lost_fin_is_retransmitted_in_last_ack(self, client):
        """RFC 9293 §3.10.8: the FIN occupies sequence space and is retransmitted on RTO."""
        (f,) = tcp(client.send("FA"))
        out = tcp(client.advance(0.25))
        assert [str(p[TCP].flags) for p in out] == ["FA"] and out[0][TCP].seq == f[TCP].seq
        client.ack = (f[TCP].seq + 1) & M
        client.send("A")
        assert not client.st.conns


class TestMemoryDevice:
    @pytest.mark.parametrize("mode", sorted(MODES))
    def test_stack_over_the_memory_link(self, store, mode):
        """The Device interface (rings/base.py) with the in-memory pair: a loop like serve's."""
        from scapy.layers.l2 import Ether
        from appliance.stack.rings.memory import MemoryLink
        from tests.stack_support import check_frame
        link = MemoryLink(mac=bytes.fromhex("020000000001"), offload=MODES[mode])
        st = make_stack(store, link.dev.offload)
        c = Client(st)
        # drive the stack through the device instead of Client.deliver
        sent = []

        def loop(now):
            for f in link.dev.rx_batch(64):
                st.receive(f, now)
            st.poll(now)
            link.dev.tx_batch(st.txq)
            st.txq.clear()
            got = [check_frame(r) for r in link.peer.recv()]
            sent.extend(got)
            return got

        link.peer.send(bytes(c.seg("S", options=[("MSS", 1460)])))
        (sa,) = loop(1.0)
        c.seq += 1
        c.ack = (sa[TCP].seq + 1) & M
        link.peer.send(bytes(c.seg("PA", data=c.request("/big.bin"))))
        stream = {}
        start = c.ack
        out = loop(1.0)
        for _ in range(50):
            for p in out:
                if len(p[TCP].payload):
                    stream[p[TCP].seq] = bytes(p[TCP].payload)
            if not out:
                break
            c.ack = max(((p[TCP].seq + len(p[TCP].payload)) & M for p in out), key=lambda s: (s - start) & M)
            link.peer.send(bytes(c.seg("A", seq=c.seq + len(c.request("/big.bin")))))
            out = loop(1.0)
        from tests.stack_support import assemble
        assert assemble(stream, start) == expected(store, "/big.bin")
        if mode == "tso":
            assert any(f[2] is not None and f[2].gso_size for f in link.dev.raw)
            assert all(len(p) <= 1514 for p in sent)


def test_virtio_gso_segmentation_like_linux():
    """rings.memory.virtio_complete: per-segment IP length/id/checksum, TCP seq, PSH/FIN
    only on the last segment (Linux tcp_gso_segment)."""
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether
    from appliance.stack.rings.base import GSO
    from appliance.stack.rings.memory import virtio_complete
    from tests.stack_support import check_frame
    p = Ether() / IP(src="198.18.0.1", dst="198.18.0.2", id=10) / TCP(seq=100, flags="FPA")
    head = bytearray(bytes(p))
    pseudo = (int.from_bytes(bytes(head[26:34]), "big") + 6 + 20 + 3000) % 0xFFFF
    head[50:52] = pseudo.to_bytes(2, "big")
    frames = virtio_complete((bytes(head), bytes(range(256)) * 11 + bytes(184), GSO(34, 16, 1000, 54)))
    segs = [check_frame(f) for f in frames]
    assert [len(s[TCP].payload) for s in segs] == [1000, 1000, 1000]
    assert [s[TCP].seq for s in segs] == [100, 1100, 2100]
    assert [s[IP].id for s in segs] == [10, 11, 12]
    assert [str(s[TCP].flags) for s in segs] == ["A", "A", "FPA"]


def test_timers_touch_only_due_connections(store, monkeypatch):
    """The timer heap: a poll wakes only the connections whose deadline came, not all."""
    from appliance.stack import conn as conn_mod
    st = make_stack(store)
    clients = [Client(st, port=20000 + i) for i in range(200)]
    for c in clients:
        c.connect()
    busy = clients[0]
    busy.send("PA", data=busy.request("/")[:5])          # a partial request: delayed ACK due in 40 ms
    calls = []
    real = conn_mod.Conn.on_timer
    monkeypatch.setattr(conn_mod.Conn, "on_timer", lambda self, now: (calls.append(self), real(self, now)))
    st.poll(busy.now + 0.05)
    assert calls == [conn_of(busy)]
    assert sum(len(b) for b in st._wheel.values()) <= len(st.conns)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_dynamic_reply_range_request(store, mode):
    """A 206 (dynamic header + a slice of the stored body): sums in software where needed."""
    from appliance.http import HTTPConnection, reply_bytes
    st = make_stack(store, MODES[mode])
    c = Client(st)
    c.connect()
    hdrs = b"Range: bytes=100-5099\r\n"
    data, _ = c.get("/big.bin", hdrs)
    h = HTTPConnection(store.site, store.blob)
    h.now(imf_fixdate(1764150000))
    (r,) = h.receive(c.request("/big.bin", hdrs))
    assert r.status == 206
    assert data == reply_bytes(r, store.blob, imf_fixdate(1764150000))
    assert data.endswith(bytes((i * 7 + (i >> 8)) & 0xFF for i in range(100, 5100)))
    if mode == "sw":
        assert st.counters["tcp_tx_sw_csum"] > 0


def test_pipelining_without_reading_is_bounded(store):
    """A client that pipelines requests and never reads (zero window) cannot make the
    server queue replies without limit: beyond max_queued its data is refused."""
    st = make_stack(store, max_queued=4)
    c = Client(st, window=0, wscale=None)
    c.connect(options=[("MSS", 1460)])
    for _ in range(4):
        c.send("PA", data=c.request("/"))
    for _ in range(6):                      # refused: the client keeps resending the 5th
        (a,) = c.send("PA", data=c.request("/"), advance=False)
        assert a[TCP].ack == c.seq
    conn = conn_of(c)
    assert len(conn.q) == 4 and st.counters["tcp_rx_backpressure"] == 6
    assert conn.rcv_nxt == (1001 + 4 * len(c.request("/"))) & M


class TestConnectionPerRequest:
    """The connection-per-request path (`Connection: close`): plain SYNs from the raw
    header, the FIN riding on the last data segment, no timer left behind."""

    LINUX_SYN = [("MSS", 1200), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]

    @pytest.mark.parametrize("mode", sorted(MODES))
    def test_linux_syn_options_are_used(self, store, mode):
        st = make_stack(store, offload=MODES[mode])
        c = Client(st, window=1000)
        sa = c.connect(options=self.LINUX_SYN)
        opts = dict(sa[TCP].options)
        assert opts["MSS"] == st.cfg.mtu - 40 and opts["WScale"] == 0
        assert "SAckOK" not in opts and "Timestamp" not in opts        # never offered back
        conn = conn_of(c)
        assert conn.mss == 1200 and conn.snd_ws == 7
        c.send("A", window=1000)                                       # 1000 << 7: not window limited
        assert conn.snd_wnd == 1000 << 7
        data, frames = c.get("/big.bin")
        assert data == expected(store, "/big.bin")
        if mode == "sw":
            assert max(payload_len(p) for p in frames) == 1200

    def test_syn_without_options_gets_536(self, store):
        st = make_stack(store)
        c = Client(st)
        sa = c.connect(options=[])
        assert dict(sa[TCP].options) == {"MSS": st.cfg.mtu - 40}       # no Window Scale offered
        assert conn_of(c).mss == 536 and conn_of(c).snd_ws == 0

    @pytest.mark.parametrize("mode", sorted(MODES))
    def test_fin_rides_on_the_last_data_segment(self, store, mode):
        st = make_stack(store, offload=MODES[mode])
        c = Client(st)
        c.connect()
        out = c.send("PA", data=c.request("/odd.txt", b"Connection: close\r\n"))
        segs = tcp(out)
        assert segs and all(payload_len(p) for p in segs)              # no bare FIN
        assert str(segs[-1][TCP].flags) == "FPA"
        assert [str(p[TCP].flags) for p in segs[:-1]] == ["A"] * (len(segs) - 1)
        assert conn_of(c).state == FIN_WAIT_1
        c.fetch(out)
        out = c.send("FA")
        assert tcp(out, "A") and not st.conns and len(st.tw) == 1
        assert not any(st._wheel.values())                             # no timer left behind

    def test_many_connections_leave_no_timers(self, store):
        st = make_stack(store)
        for i in range(50):
            c = Client(st, port=30000 + i)
            c.connect(options=self.LINUX_SYN)
            out = c.send("PA", data=c.request("/", b"Connection: close\r\n"))
            c.fetch(out)
            c.send("FA")
        assert not st.conns and len(st.tw) == 50 and st.counters["tcp_syn_received"] == 50
        assert not any(st._wheel.values())
        st.poll(c.now + 1.0)
        assert not st._wheel and not st._slots
