"""Memory under hostile input is bounded (issue 10 item 6; docs/internals.md, "Memory bounds").

A hostile mix (bench/fuzz.py: random and mutated frames, many connections
with mutated and pipelined requests, unique request targets that fill the
caches, out-of-order and duplicated segments, slow and zero windows) runs in
rounds on one in-memory Stack with a fake clock. The caches' bounds are made
small so that the mix fills them many times over. Checked: every table of
`Stack.tables()` stays within its bound at every step; once the clock has
expired every connection, the connection, TIME-WAIT and timer tables are
empty, and the stack's live objects (tracemalloc, allocations made by
appliance/ code) are back near their start: the same after each round (no
growth), and at the start once the bounded caches are emptied.
"""
import gc
import os
import tracemalloc

import pytest

from appliance.http import HTTPConnection
from appliance.stack.conn import ESTABLISHED
from appliance.stack.iface import StackConfig
from appliance.stack.rings.base import Offload
from bench import fuzz
from tests.stack_support import Client, expected, make_stack, make_store

APPLIANCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "appliance", "*")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("mem"))


def stack_kb():
    """Live bytes allocated by appliance/ code, in kB, after a collection."""
    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, APPLIANCE)])
    return sum(s.size for s in snap.statistics("filename")) / 1024


@pytest.fixture
def small_bounds(monkeypatch):
    """Cache bounds small enough for a short mix to fill each of them many times."""
    import appliance.stack.iface as iface
    import appliance.stack.isn as isn
    import appliance.http.conn as hconn
    for name, v in (("TMPL_CACHE_MAX", 16), ("CONN_TMPL_MAX", 32), ("OPTS_CACHE_MAX", 32), ("MSS_CACHE_MAX", 4),
                    ("HDR_CACHE_MAX", 8)):
        monkeypatch.setattr(iface, name, v)
    monkeypatch.setattr(isn, "_FCACHE_MAX", 32)
    lim = hconn._DEFAULT_LIMITS
    monkeypatch.setattr(lim, "cache_entries", 64)
    monkeypatch.setattr(lim, "cache_bytes", 1024)      # binds first: requests are ~40-400 bytes


def test_hostile_mix_memory_returns_to_start(small_bounds, tmp_path):
    fz = fuzz.Fuzzer(fuzz.make_site(str(tmp_path)), seed=7, config=StackConfig(arp_cache_size=16, max_queued=16),
                     check_bounds=True)
    st = fz.st
    cache = st.http_first.__self__
    tracemalloc.start()
    try:
        start = stack_kb()
        after = []
        for rnd in range(3):
            fuzz.drive(fz, frames=1500, requests=150, clean=1, hostile=16, pipeline=(50, 70), patience=2)
            assert st.conns, "the mix holds connections while it runs"
            fz.finish()
            assert not st.conns and not st.tw and st.n_synrcvd == 0
            assert st.tables()["wheel_entries"][0] == 0 and not st._wheel and not st._slots
            after.append(stack_kb())
        c = fz.counts
        assert c["bound_exceeded"] == 0, fz.violations
        assert st.counters["drop_internal_error"] == 0, st.last_error
        assert c["wrong_bytes_peers"] == 0 and c["bad_frames_out"] == 0, fz.violations
        # every bounded cache was filled (and cleared) by the mix, not merely left small
        m = fz.max_tables
        for name in ("tmpl_cache", "conn_tmpl", "opts_cache", "isn_cache", "arp", "reply_cache_bytes"):
            assert m[name] > st.tables()[name][1] // 2, (name, m)
        assert m["ooo_segments"] > 0 and m["send_queue"] >= 16 and st.counters["tcp_rx_backpressure"] > 0
        # no growth from round to round (the caches are full in each: same size)
        assert max(after) - min(after) < 48, after
        # and with the bounded caches emptied, back at the start
        for k in ("_tmpl_cache", "_conn_tmpl", "_opts_cache", "_mss_cache", "_hdr_cache", "syn_trusted"):
            getattr(st, k).clear()
        st.isn._fcache.clear()
        st.arp._e.clear()
        cache.clear()
        end = stack_kb()
        assert end - start < 48, (start, after, end)
    finally:
        tracemalloc.stop()
        cache.clear()


def test_reply_cache_bounded_in_entries_and_bytes(store):
    """Unique long requests cannot make the shared reply cache hold more than
    Limits.cache_entries entries or cache_bytes bytes of keys."""
    site, blob = store.site, store.blob
    cache = HTTPConnection.reply_cache(site)
    cache.clear()
    lim = HTTPConnection(site, blob).limits
    pad = b"X-Pad: " + b"p" * 3000 + b"\r\n"
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        most = fullest = 0
        for i in range(800):
            req = b"GET /?u=%d HTTP/1.1\r\nHost: t\r\n%s\r\n" % (i, pad)
            (r,) = HTTPConnection(site, blob).receive(req)
            assert r.status == 200
            assert len(cache) <= lim.cache_entries and cache.nbytes <= lim.cache_bytes
            if i % 50 == 0:
                assert cache.nbytes == sum(map(len, cache))
            fullest = max(fullest, len(cache))
            most = max(most, tracemalloc.get_traced_memory()[0] - base)
        assert fullest == lim.cache_bytes // len(req)                   # it does cache them, up to the bytes
        assert len(cache) < fullest                                     # and was cleared
        # the keys' bytes plus per-entry overhead (Reply, dict slot), nothing more
        assert most < lim.cache_bytes + len(cache) * 400 + 64 * 1024, most
    finally:
        tracemalloc.stop()
        cache.clear()


def test_out_of_order_queue_bounded_in_segments(store):
    """1-byte out-of-order segments cost far more than a byte each: at most
    cfg.ooo_segments are queued (RFC 9293 §3.10.7.4 allows dropping them); the
    rest are dropped and, once sent again, the request is answered exactly."""
    st = make_stack(store, Offload(), ooo_segments=8)
    c = Client(st, port=40100)
    c.connect()
    req = c.request("/", b"X-Pad: " + b"q" * 40 + b"\r\n")
    for i in range(len(req) - 1, 0, -1):          # every byte but the first, backwards
        c.send("PA", data=req[i:i + 1], seq=(c.seq + i) & 0xFFFFFFFF)
        (conn,) = st.conns.values()
        assert len(conn.ooo) <= 8 and conn.ooo_bytes <= 8
    assert conn.state == ESTABLISHED and len(conn.ooo) == 8
    assert st.counters["tcp_rx_out_of_order_dropped"] == len(req) - 1 - 8
    out = c.send("PA", data=req)                  # the whole request again
    data, _ = c.fetch(out)
    assert data == expected(store, "/")
    assert not conn.ooo and conn.ooo_bytes == 0
