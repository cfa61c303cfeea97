"""Property tests (hypothesis): the parser never fails but with its protocol error; any
site tree compiles and every file comes back byte-for-byte through `respond`."""
import os
import tempfile
import urllib.parse

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from appliance.content.checksum import ones_sum_reference
from appliance.content.compiler import Options, compile_site
from appliance.content.store import Store
from appliance.http import HTTPConnection, Limits, reply_bytes
from appliance.http.cli import respond_cmd
from appliance.http.request import ProtocolError, decode_target, parse_head

from .content_support import SDE, h11_parse, example_store_path

_STORE = {}


def example_store():
    if "s" not in _STORE:
        _STORE["s"] = Store.open(example_store_path())
    return _STORE["s"]


@given(st.binary(max_size=600))
@settings(max_examples=500, deadline=None)
def test_parse_head_raises_only_protocol_error(data):
    try:
        req = parse_head(data, Limits())
    except ProtocolError as e:
        assert e.status in (400, 413, 414, 431, 501, 505)
        return
    try:
        path = decode_target(req.target)
    except ProtocolError as e:          # NotFound is one, with status 404
        assert e.status in (400, 404)
        return
    _normal(path)


def _normal(path):
    assert path.startswith("/") and "//" not in path
    assert not {".", ".."} & set(path.split("/"))


@given(st.lists(st.sampled_from(["", ".", "..", "%2e", "%2E%2e", "a", "b%2Fc", "%2f..", "x?y", "%41"]),
                max_size=8))
@settings(max_examples=300, deadline=None)
def test_decode_target_never_rises_above_root(segs):
    target = ("/" + "/".join(segs)).encode()
    try:
        path = decode_target(target)
    except ProtocolError as e:
        assert e.status in (400, 404)
        return
    _normal(path)


_METHODS = st.sampled_from([b"GET", b"HEAD", b"POST", b"get", b"BREW", b"", b"G ET"])
_TARGETS = st.one_of(st.sampled_from([b"/", b"/about.html", b"/docs", b"/docs/", b"/%zz", b"*", b"http://h/x",
                                      b"/downloads/data.txt", b"/../x", b"/a?b#c"]), st.binary(max_size=20))
_FIELDS = st.lists(st.tuples(
    st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Range", b"If-None-Match",
                     b"If-Modified-Since", b"Accept-Encoding", b"If-Range", b"X y", b""]),
    st.one_of(st.sampled_from([b"t", b"0", b"5", b"chunked", b"close", b"bytes=0-5", b"bytes=-3", b"*", b"gzip",
                               b"Sun, 06 Nov 1994 08:49:37 GMT", b"keep-alive"]), st.binary(max_size=12))),
    max_size=6)


@st.composite
def request_streams(draw):
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        line = draw(_METHODS) + b" " + draw(_TARGETS) + b" " + draw(st.sampled_from(
            [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x", b""]))
        fields = b"".join(k + b": " + v + draw(st.sampled_from([b"\r\n", b"\n"])) for k, v in draw(_FIELDS))
        parts.append(line + b"\r\n" + fields + b"\r\n" + draw(st.binary(max_size=12)))
    return b"".join(parts)


@given(st.one_of(request_streams(), st.binary(max_size=400)), st.integers(1, 50))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_connection_never_raises(stream, step):
    s = example_store()
    whole = HTTPConnection(s.site, s.blob)
    replies = whole.receive(stream)
    pieces = HTTPConnection(s.site, s.blob)
    replies2 = []
    for i in range(0, len(stream), step):
        replies2 += pieces.receive(stream[i:i + step])
    # the same decisions regardless of how the bytes are cut into segments
    assert [(r.status, r.close, r.length) for r in replies] == [(r.status, r.close, r.length) for r in replies2]
    assert whole.closed == pieces.closed
    for r in replies:
        assert (r.response is None) != (r.header is None)
        assert len(reply_bytes(r, s.blob)) == r.length
        if r.close:
            assert r is replies[-1]


_NAME = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\0"),
                min_size=1, max_size=10).filter(lambda n: not n.startswith(".") and len(n.encode()) < 200)


@st.composite
def site_trees(draw):
    files = {}
    for _ in range(draw(st.integers(1, 8))):
        segs = tuple(draw(st.lists(_NAME, min_size=1, max_size=3)))
        # a path cannot be both a file and a directory
        if any(segs[:len(k)] == k or k[:len(segs)] == segs for k in files):
            continue
        files[segs] = draw(st.one_of(st.binary(max_size=3000), st.text(max_size=2000).map(str.encode)))
    return files


@given(site_trees(), st.integers(536, 1600))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_site_roundtrips_through_respond(files, mss):
    with tempfile.TemporaryDirectory(prefix="hbprop") as d:
        site = os.path.join(d, "site")
        for segs, data in files.items():
            p = os.path.join(site, *segs)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
        out = os.path.join(d, "s.store")
        compile_site(site, out, Options(source_date_epoch=SDE, mss=mss))
        with Store.open(out) as s:        # segments reassemble, sums match the reference
            for r in s.site.responses:
                for i in range(len(r.sums)):
                    seg = s.blob[r.off + i * mss:r.off + min(r.length, (i + 1) * mss)]
                    assert r.sums[i] == ones_sum_reference(seg)
        targets = ["/" + "/".join(urllib.parse.quote(x, safe="") for x in segs) for segs in files]
        raw = b"".join(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % t.encode() for t in targets)
        r = CliRunner().invoke(respond_cmd, [out, "--date", "Sun, 06 Nov 1994 08:49:37 GMT"], input=raw)
        assert r.exit_code == 0, r.output
        res = h11_parse([("GET", t) for t in targets], r.stdout_bytes)
        for (segs, data), (status, headers, body) in zip(files.items(), res):
            assert status == 200, segs
            assert body == data, segs
