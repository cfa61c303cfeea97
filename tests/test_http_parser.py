"""Request parsing and framing: bad input -> the right error status, bodies read and
discarded without mis-framing (RFC 9112 §2-§7, RFC 9110 §8.6, RFC 6585)."""
import pytest

from appliance.content.store import Store
from appliance.http import HTTPConnection, Limits
from appliance.http.request import ProtocolError, decode_target, parse_head

from .content_support import exchange, h11_parse, httpclient_parse, example_store_path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store.open(example_store_path())
    yield s
    s.close()


def statuses(store, raw, step=0, limits=None):
    conn = HTTPConnection(store.site, store.blob, limits)
    replies = []
    step = step or max(1, len(raw))
    for i in range(0, len(raw), step):
        replies += conn.receive(raw[i:i + step])
    return [r.status for r in replies], conn


def error_of(store, raw):
    sts, conn = statuses(store, raw)
    assert len(sts) == 1 and conn.closed, (raw, sts)
    data, _ = exchange(store, raw)
    status, h, _ = httpclient_parse(data)
    assert status == sts[0] and h["connection"] == "close"
    return status


@pytest.mark.parametrize("raw,status", [
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                  # missing Host (RFC 9112 §3.2)
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),            # two Hosts
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    (b"GET /  HTTP/1.1\r\nHost: t\r\n\r\n", 400),                      # two spaces
    (b"GET / HTTP/1.1 x\r\nHost: t\r\n\r\n", 400),
    (b"GET /\r\n\r\n", 400),                                           # HTTP/0.9
    (b"GET / HTTP/1\r\nHost: t\r\n\r\n", 400),
    (b"GET / http/1.1\r\nHost: t\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    (b"GET / HTTP/3.0\r\nHost: t\r\n\r\n", 505),
    (b"G(T / HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : t\r\n\r\n", 400),                      # space before colon (§5.1)
    (b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n", 400),         # obs-fold (§5.2)
    (b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX: a\rb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nno colon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\n: empty\r\n\r\n", 400),
    (b"GET a HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    (b"GET * HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    (b"GET ftp://t/ HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    (b"GET /%zz HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    (b"GET /a%2 HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    (b"GET /a#b HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    (b"GET /\xff HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1, 2\r\n\r\nab", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 5\r\n\r\nhello", 400),    # a list (§6.3)
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 5,5\r\n\r\nhello", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400),                                # empty Host
    (b"GET / HTTP/1.1\r\nHost: \t \r\n\r\n", 400),
    (b"GET / HTTP/1.0\r\nHost:\r\n\r\n", 400),                                # no host in an http URI
    (b"GET /%00 HTTP/1.1\r\nHost: t\r\n\r\n", 400),                           # NUL in the path
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 0x10\r\n\r\n", 400),
    (b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),   # §6.1
    (b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 400),  # not chunked last
    (b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: foo, chunked\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n100001\r\n", 413),
])
def test_bad_requests(store, raw, status):
    assert error_of(store, raw) == status


def test_414_request_line_too_long(store):
    target = b"/" + b"a" * 9000
    assert error_of(store, b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n") == 414
    # also before the line is complete: no unbounded buffering
    sts, conn = statuses(store, b"GET " + target)
    assert sts == [414] and conn.closed


def test_431_header_too_large(store):
    raw = b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n"
    assert error_of(store, raw) == 431
    raw = b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n"
    assert error_of(store, raw) == 431
    sts, conn = statuses(store, b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X: y\r\n" * 5000)
    assert sts == [431] and conn.closed


def test_limits_are_settable(store):
    lim = Limits(max_request_line=64, max_head=256, max_body=10)
    assert statuses(store, b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: t\r\n\r\n", limits=lim)[0] == [414]
    assert statuses(store, b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 300 + b"\r\n\r\n", limits=lim)[0] == [431]
    assert statuses(store, b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\n", limits=lim)[0] == [413]


@pytest.mark.parametrize("step", [0, 1, 3])
def test_get_with_content_length_body_is_discarded(store, step):
    body = b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"     # a body that looks like a request
    raw = (b"GET /robots.txt HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body
           + b"GET /about.html HTTP/1.1\r\nHost: t\r\n\r\n")
    sts, conn = statuses(store, raw, step)
    assert sts == [200, 200] and not conn.closed
    data, _ = exchange(store, raw, step)
    res = h11_parse([("GET", "/robots.txt"), ("GET", "/about.html")], data)
    assert res[0][2] == b"User-agent: *\nAllow: /\n"


@pytest.mark.parametrize("step", [0, 1, 5])
def test_get_with_chunked_body_is_discarded(store, step):
    raw = (b"GET /robots.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n1A\r\n" + b"GET /nope HTTP/1.1\r\nHost:" + b"\r\n0\r\nTrailer-X: 1\r\n\r\n"
           + b"HEAD /about.html HTTP/1.1\r\nHost: t\r\n\r\n")
    sts, conn = statuses(store, raw, step)
    assert sts == [200, 200] and not conn.closed


def test_empty_host_is_allowed_with_an_absolute_form_target(store):
    """RFC 9112 §3.2.2: the authority of an absolute-form target is used, Host ignored."""
    sts, conn = statuses(store, b"GET http://t/ HTTP/1.1\r\nHost:\r\n\r\n")
    assert sts == [200] and not conn.closed


def test_content_length_single_value_still_frames_the_body(store):
    body = b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"
    raw = b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length:  %d \r\n\r\n" % len(body) + body
    assert statuses(store, raw + b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")[0] == [200, 200]


def test_post_is_refused_and_closed_when_it_has_content(store):
    sts, conn = statuses(store, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
                                b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert sts == [405] and conn.closed
    sts, conn = statuses(store, b"DELETE / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert sts == [405, 200] and not conn.closed


def test_error_for_head_has_no_body(store):
    data, conn = exchange(store, b"HEAD / HTTP/2.0\r\nHost: t\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 505 ") and data.endswith(b"\r\n\r\n") and data.count(b"\r\n\r\n") == 1


def test_incomplete_request_waits(store):
    sts, conn = statuses(store, b"GET / HTTP/1.1\r\nHost: t\r\n")
    assert sts == [] and not conn.closed
    assert [r.status for r in conn.receive(b"\r\n")] == [200]


def test_parse_head_fields():
    req = parse_head(b"GET /x?y HTTP/1.1\r\nHost: t\r\nAccept: a\r\naccept: b\r\nX:  v  \r\n", Limits())
    assert req.method == b"GET" and req.target == b"/x?y" and req.version == (1, 1)
    assert req.get(b"accept") == b"a, b" and req.get(b"x") == b"v" and req.keep_alive
    assert parse_head(b"GET / HTTP/1.9\r\nHost: t", Limits()).version == (1, 1)
    with pytest.raises(ProtocolError) as e:
        parse_head(b"GET / HTTP/9.9", Limits())
    assert e.value.status == 505


@pytest.mark.parametrize("target,path", [
    (b"/", "/"), (b"/a/b", "/a/b"), (b"/a/b/", "/a/b/"), (b"/a/./b", "/a/b"), (b"/a/../b", "/b"),
    (b"/a/b/..", "/a/"), (b"/a/b/.", "/a/b/"), (b"/..", "/"), (b"/../..//x", "/x"), (b"/a//b//", "/a/b/"),
    (b"/%41%2f..%2Fb", "/b"), (b"/caf%C3%A9", "/caf\u00e9"), (b"/a?b/../c", "/a"), (b"/a%20b", "/a b"),
    (b"http://h:8/p?q", "/p"), (b"https://[::1]/", "/"),
])
def test_decode_target(target, path):
    assert decode_target(target) == path


def test_cache_respects_limits(store):
    raw = b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: t\r\n\r\n"
    assert statuses(store, raw)[0] == [404]                     # default limits: cached 404
    assert statuses(store, raw, limits=Limits(max_request_line=64))[0] == [414]


def test_bad_target_on_head_gets_head_form(store):
    data, conn = exchange(store, b"HEAD /%zz HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert conn.closed and data.startswith(b"HTTP/1.1 400 ") and data.endswith(b"\r\n\r\n")
    status, h, body = httpclient_parse(data, method="HEAD")
    assert status == 400 and body == b"" and data.count(b"HTTP/1.1") == 1
