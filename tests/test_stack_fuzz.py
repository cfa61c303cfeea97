"""Fuzz: random and mutated frames into the stack. Never an exception, never an
internal error, every emitted frame valid (scapy-checked), the state consistent.

- scapy's fuzz() over every layer we parse (Ethernet/ARP, IPv4/ICMP, TCP with
  options), valid and invalid addresses mixed;
- hypothesis: arbitrary bytes, and bit flips / truncations / extensions of
  valid frames of a live connection (a stream of mutated segments between
  valid ones), then the connection must still deliver a correct reply.
"""
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st_
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import fuzz

from appliance.stack.conn import CLOSED, MASK, HALF
from appliance.stack.rings.base import Offload
from tests.stack_support import (CLIENT_IP, CLIENT_MAC, SERVER_IP, SERVER_MAC, Client, check_frame, expected,
                                 make_stack, make_store)
from appliance.stack.rings.memory import virtio_complete


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("fuzz"))


def consistent(stack):
    """Invariants of the connection table (RFC 9293 §3.3.1 sequence variables)."""
    n_syn = 0
    for key, c in stack.conns.items():
        assert c.key == key and c.state != CLOSED
        assert ((c.snd_nxt - c.snd_una) & MASK) < HALF, c       # SND.UNA <= SND.NXT
        assert ((c.snd_max - c.snd_nxt) & MASK) < HALF, c       # SND.NXT <= SND.MAX
        assert ((c.data_end + 1 - c.snd_max) & MASK) < HALF, c  # nothing sent beyond the data (+FIN)
        assert c.cc.cwnd >= c.mss and c.snd_wnd >= 0
        for a, b in zip(c.q, c.q[1:]):
            assert a[1] == b[0], "send queue items are contiguous"
        if c.q:
            assert ((c.q[0][1] - c.snd_una) & MASK) < HALF and c.q[0][1] != c.snd_una
        assert 0 <= c.ooo_bytes <= stack.cfg.ooo_limit
        assert all(0 < ((s - c.rcv_nxt) & MASK) < HALF for s in c.ooo), "queued data is beyond RCV.NXT"
        n_syn += c.state == 1
    assert n_syn == stack.n_synrcvd
    assert stack.counters["tcp_conns_open"] == len(stack.conns)
    assert stack.counters["drop_internal_error"] == 0, stack.last_error


def drain_checked(stack):
    for fr in stack.txq:
        for raw in virtio_complete(fr):
            check_frame(raw)
    stack.txq.clear()


TEMPLATES = [
    lambda: Ether(src=CLIENT_MAC, dst=SERVER_MAC) / fuzz(IP(src=CLIENT_IP, dst=SERVER_IP) / TCP(dport=80)),
    lambda: Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP) / fuzz(TCP(dport=80)),
    lambda: Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP) /
    fuzz(TCP(dport=80, flags="S", options=[("MSS", 1460), ("WScale", 7), ("SAckOK", b""), ("Timestamp", (1, 0))])),
    lambda: Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=CLIENT_IP, dst=SERVER_IP) / fuzz(ICMP()),
    lambda: Ether(src=CLIENT_MAC, dst=SERVER_MAC) / fuzz(IP(src=CLIENT_IP, dst=SERVER_IP, proto=1)) / ICMP(),
    lambda: Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / fuzz(ARP(pdst=SERVER_IP)),
    lambda: fuzz(Ether(dst=SERVER_MAC)),
]


@pytest.mark.parametrize("mode", [Offload(), Offload(True, True)], ids=["sw", "tso"])
def test_scapy_fuzz_every_layer(store, mode):
    random.seed(1234)
    stack = make_stack(store, mode)
    live = Client(stack, port=40001)
    live.connect()
    now = 1000.0
    for i in range(1500):
        pkt = TEMPLATES[i % len(TEMPLATES)]()
        stack.receive(memoryview(bytes(pkt)), now)
        drain_checked(stack)
        if i % 100 == 0:
            now += 0.3
            stack.poll(now)
            drain_checked(stack)
            consistent(stack)
    consistent(stack)
    live.now = now
    data, _ = live.get("/")
    assert data == expected(store, "/")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st_.binary(min_size=0, max_size=200))
def test_arbitrary_bytes(store, data):
    stack = make_stack(store)
    stack.receive(data, 1.0)
    stack.receive(bytes.fromhex(SERVER_MAC.replace(":", "")) + data, 1.0)
    stack.receive(bytes.fromhex(SERVER_MAC.replace(":", "")) + bytes(6) + b"\x08\x00\x45" + data, 1.0)
    drain_checked(stack)
    consistent(stack)


mutation = st_.tuples(st_.sampled_from(["flip", "truncate", "extend", "byte"]), st_.integers(0, 10 ** 6),
                      st_.integers(0, 255))


def mutate(raw: bytes, m) -> bytes:
    kind, pos, val = m
    b = bytearray(raw)
    if kind == "flip":
        i = pos % (len(b) * 8)
        b[i // 8] ^= 1 << (i % 8)
    elif kind == "truncate":
        b = b[:pos % len(b)]
    elif kind == "extend":
        b += bytes([val]) * (pos % 64)
    else:
        b[pos % len(b)] = val
    return bytes(b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st_.lists(st_.tuples(st_.sampled_from(["req", "ack", "syn", "rst", "fin", "old"]), mutation,
                            st_.booleans()), min_size=1, max_size=25))
def test_mutated_segments_of_a_live_connection(store, steps):
    """Valid segments, mutated copies (which must be dropped or answered per the RFCs),
    then the client must still get exactly the right reply."""
    stack = make_stack(store)
    c = Client(stack, port=41000)
    c.connect()
    for kind, m, fix_csum in steps:
        flags, data, seq = {"req": ("PA", c.request("/"), c.seq), "ack": ("A", b"", c.seq),
                            "syn": ("S", b"", c.seq), "rst": ("R", b"", c.seq + 1),
                            "fin": ("FA", b"", c.seq), "old": ("A", b"x", c.seq - 5)}[kind]
        pkt = c.seg(flags, data=data, seq=seq & MASK)
        raw = mutate(bytes(pkt), m)
        if fix_csum and len(raw) >= 54:
            try:        # recompute checksums so that the mutation reaches the TCP layer
                p = Ether(raw)
                if IP in p and TCP in p:
                    del p[IP].chksum
                    del p[TCP].chksum
                    raw = bytes(p)
            except Exception:
                pass
        stack.receive(memoryview(raw), c.now)
        drain_checked(stack)
        c.now += 0.01
        stack.poll(c.now)
        drain_checked(stack)
        consistent(stack)
    # whatever happened, a new connection is served correctly
    c2 = Client(stack, port=42000, now=c.now)
    c2.connect()
    data, _ = c2.get("/odd.txt")
    assert data == expected(store, "/odd.txt")
    consistent(stack)


# ---------------------------------------------------------------- bench fuzz, short
# `python -m bench fuzz` (bench/fuzz.py) runs a million frames; here a short run
# of the same fuzzer, in both offload modes, with all its checks.

@pytest.fixture(scope="module", params=[("sw", 10000, 800), ("tso", 3000, 300)], ids=["sw", "tso"])
def short_fuzz(request):
    from bench import fuzz
    offload, frames, requests = request.param
    return fuzz.run(frames=frames, requests=requests, seed=11, offload=offload, check_bounds=True), frames, requests


def test_short_fuzz_run(short_fuzz):
    res, frames, requests = short_fuzz
    assert res["drop_internal_error"] == 0, res["last_error"]
    assert res["garbage_frames"] == frames and res["requests"] >= 0.9 * requests
    assert res["bad_frames_out"] == 0, res["bad_frame_heads"]
    assert res["wrong_bytes_peers"] == 0 and res["clean_peers_verified"] >= 1, res["violations"]
    assert res["bound_exceeded"] == 0, res["violations"]
    assert res["conns_left"] == 0 and res["time_wait_left"] == 0
    # every layer was reached and refused what it should
    for reason in ("eth_unknown_type", "arp_unsupported", "ip_bad_version", "ip_options", "ip_fragment",
                   "ip_bad_length", "icmp_short", "tcp_bad_offset", "tcp_bad_options", "tcp_closed_port",
                   "tcp_syn_fin"):
        assert res["drops"].get("drop_" + reason), reason
    c = res["counters"]
    assert c["http_replies"] > 0.5 * requests
    if res["offload"] == "sw":          # the longer run: pipelines hit backpressure, segments came out of order
        assert c.get("tcp_rx_backpressure") and c.get("tcp_rx_out_of_order_queued"), c


def test_short_fuzz_run_respects_the_window(short_fuzz):
    res = short_fuzz[0]
    assert res["window_violations"] == 0, res["violations"]


def test_fuzz_window_check_counts_data_beyond_the_edge(tmp_path):
    """The fuzzer's window check itself: a segment past the latest edge counts, one
    within does not, a 1-byte probe into a zero window does not."""
    from bench import fuzz
    fz = fuzz.Fuzzer(fuzz.make_site(str(tmp_path)))
    p = fuzz.Peer(fz, *fuzz.client_addr(1), 40000, "clean", [], fz.now)
    p.edge, p.max_edge = 5000, 9000
    fz.check_window(p, 4000, 1000)
    fz.check_window(p, 5000, 1)
    assert fz.counts["window_violations"] == 0 and fz.counts["zero_window_probes"] == 1
    fz.check_window(p, 4500, 1000)
    assert fz.counts["window_violations"] == 1 and fz.counts["window_excess_max"] == 500
    assert fz.counts["window_violations_max"] == 0
    fz.check_window(p, 8500, 1000)
    assert fz.counts["window_violations"] == 2 and fz.counts["window_violations_max"] == 1
