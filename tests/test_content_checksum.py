"""RFC 1071 sums at C speed vs a word-by-word reference; RFC 1624 incremental updates;
the stored segment sums give the TCP checksum scapy computes (RFC 9293 §3.1)."""
import random

import pytest
from hypothesis import given, settings, strategies as st
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from appliance.content.checksum import (checksum, field_delta, fold, ones_sum, ones_sum_reference,
                                        pseudo_header_sum, swap16)
from appliance.content.store import Store

from .content_support import example_store_path


@given(st.binary(max_size=3000))
@settings(max_examples=400, deadline=None)
def test_ones_sum_matches_reference(data):
    assert ones_sum(data) == ones_sum_reference(data)
    assert ones_sum(memoryview(data)) == ones_sum_reference(data)


@pytest.mark.parametrize("data,expect", [
    (b"", 0), (b"\0", 0), (b"\0\0\0\0", 0),                # all zero: +0
    (b"\xff\xff", 0xFFFF), (b"\xff\xff\xff\xff", 0xFFFF),   # sums to a multiple of 0xFFFF: -0
    (b"\x80\x00\x7f\xff", 0xFFFF), (b"\x00\x01\xff\xfe", 0xFFFF),
    (b"\x01", 0x0100), (b"\x00\x01\xff\xff", 0x0001), (b"\x12\x34\x56\x78", 0x68AC),
])
def test_zero_representation_edges(data, expect):
    assert ones_sum(data) == expect == ones_sum_reference(data)


def test_rfc1071_example():
    # RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 -> sum ddf2
    assert ones_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2


@given(st.binary(min_size=2, max_size=400), st.data())
@settings(max_examples=300, deadline=None)
def test_field_delta_rfc1624(data, draw):
    # replace a run of bytes at any offset; the incrementally updated sum equals a fresh sum
    start = draw.draw(st.integers(0, len(data) - 1))
    n = draw.draw(st.integers(1, len(data) - start))
    new = draw.draw(st.binary(min_size=n, max_size=n))
    patched = data[:start] + new + data[start + n:]
    upd = fold(ones_sum(data) + field_delta(data[start:start + n], new, start & 1))
    # RFC 1624 §5: an incremental update cannot tell +0 from -0, so alone the sums agree
    # modulo 0xFFFF; once added to any non-zero sum (a pseudo header always is) they agree exactly.
    assert upd % 0xFFFF == ones_sum(patched) % 0xFFFF
    assert checksum(0x1234, upd) == checksum(0x1234, ones_sum(patched))


def test_swap16_is_odd_offset_sum():
    d = bytes(range(1, 40))
    assert ones_sum(b"\0" + d) == swap16(ones_sum(d))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store.open(example_store_path(mss=1000))
    yield s
    s.close()


def _check(seg: bytes, seg_sum: int, rnd: random.Random):
    """What the stack does: pseudo header + TCP header (checksum 0) + stored payload sum."""
    src, dst = "198.18.0.1", "198.19.%d.%d" % (rnd.randrange(256), rnd.randrange(1, 255))
    pkt = IP(src=src, dst=dst) / TCP(sport=80, dport=rnd.randrange(1024, 65536), seq=rnd.getrandbits(32),
                                      ack=rnd.getrandbits(32), flags="PA", window=rnd.randrange(65536)) / Raw(seg)
    wire = bytes(pkt)
    expect = IP(wire)[TCP].chksum                    # scapy computed it while building
    tcp = bytearray(wire[20:20 + 20])
    tcp[16:18] = b"\0\0"
    ps = pseudo_header_sum(bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))), 6, 20 + len(seg))
    ours = checksum(ps, ones_sum(tcp), seg_sum)
    assert ours == expect


def test_segments_reassemble_and_sums_give_scapy_checksum(store):
    rnd = random.Random(7)
    mss = store.mss
    checked = 0
    for r in store.site.responses:
        data = bytes(store.blob[r.off:r.off + r.length])
        segs = [data[i:i + mss] for i in range(0, len(data), mss)]
        assert b"".join(segs) == data and len(segs) == len(r.sums)
        for i, seg in enumerate(segs):
            assert r.sums[i] == ones_sum_reference(seg)
            if i < 3 or i == len(segs) - 1:       # every response's first and last segments
                _check(seg, r.sums[i], rnd)
                checked += 1
    assert checked > 100


def test_patched_date_and_connection_checksum(store):
    """The stack patches Date and Connection in the first segment and fixes the stored sum
    incrementally; scapy must agree with the result."""
    rnd = random.Random(9)
    new_date = b"Tue, 15 Nov 1994 12:45:26 GMT"
    for r in store.site.responses:
        seg = bytearray(store.blob[r.off:r.off + min(r.length, store.mss)])
        s = r.sums[0]
        d, c = r.date_off, r.conn_off
        assert seg[d - 6:d] == b"Date: " and seg[c - 12:c] == b"Connection: "
        assert bytes(seg[c:c + 10]) == b"keep-alive"
        s = fold(s + field_delta(bytes(seg[d:d + 29]), new_date, d & 1))
        s = fold(s + field_delta(b"keep-alive", b"close     ", c & 1))
        seg[d:d + 29] = new_date
        seg[c:c + 10] = b"close     "
        _check(bytes(seg), s, rnd)
