"""Every response kind of the appliance, checked by parsing the bytes with h11 / http.client
(RFC 9110 / RFC 9112)."""
import gzip
import os

import pytest

from appliance.content.store import Store
from appliance.http.dates import format_date

from .content_support import DATE, EXAMPLE, SDE, exchange, h11_parse, httpclient_parse, example_store_path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store.open(example_store_path())
    yield s
    s.close()


def read(rel):
    with open(os.path.join(EXAMPLE, rel), "rb") as f:
        return f.read()


def get(store, target, *fields, method="GET", version="1.1"):
    raw = f"{method} {target} HTTP/{version}\r\nHost: t\r\n".encode()
    for f in fields:
        raw += f.encode() + b"\r\n"
    raw += b"\r\n"
    data, conn = exchange(store, raw)
    return data, conn


def one(store, target, *fields, method="GET"):
    data, conn = get(store, target, *fields, method=method)
    [(status, headers, body)] = h11_parse([(method, target)], data)
    return status, headers, body, conn


def test_get_200_full_headers(store):
    status, h, body, conn = one(store, "/about.html")
    assert status == 200
    assert body == read("about.html")
    assert h["content-type"] == "text/html; charset=utf-8"
    assert h["content-length"] == str(len(body))
    assert h["date"] == DATE.decode()
    assert h["connection"] == "keep-alive"
    assert h["server"] == "haboob"
    assert h["accept-ranges"] == "bytes"
    assert h["cache-control"] == "public, max-age=300"
    assert h["vary"] == "Accept-Encoding"
    assert h["last-modified"] == format_date(min(SDE, int(os.stat(os.path.join(EXAMPLE, "about.html")).st_mtime))).decode()
    assert h["etag"].startswith('"') and h["etag"].endswith('"') and "W/" not in h["etag"]
    assert "content-encoding" not in h
    assert not conn.closed


def test_content_types(store):
    assert one(store, "/css/site.css")[1]["content-type"] == "text/css; charset=utf-8"
    assert one(store, "/img/logo.png")[1]["content-type"] == "image/png"
    assert one(store, "/img/haboob.svg")[1]["content-type"] == "image/svg+xml"
    assert one(store, "/robots.txt")[1]["content-type"] == "text/plain; charset=utf-8"
    assert one(store, "/favicon.ico")[1]["content-type"] == "image/x-icon"


def test_every_file_byte_for_byte(store):
    for dirpath, _dirs, files in os.walk(EXAMPLE):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), EXAMPLE).replace(os.sep, "/")
            status, h, body, _ = one(store, "/" + rel)
            assert status == 200, rel
            assert body == read(rel), rel


def test_head_twin(store):
    status, h, body, _ = one(store, "/about.html", method="HEAD")
    gs, gh, gbody, _ = one(store, "/about.html")
    assert status == 200 and body == b""
    assert h == gh      # same fields, including Content-Length (RFC 9110 §9.3.2)
    data, _ = get(store, "/about.html", method="HEAD")
    assert data.endswith(b"\r\n\r\n") and data.count(b"\r\n\r\n") == 1


def test_gzip_variant(store):
    status, h, body, _ = one(store, "/docs/guide/content.html", "Accept-Encoding: gzip, deflate, br")
    assert status == 200
    assert h["content-encoding"] == "gzip"
    assert h["vary"] == "Accept-Encoding"
    assert gzip.decompress(body) == read("docs/guide/content.html")
    identity = one(store, "/docs/guide/content.html")[1]
    assert h["etag"] != identity["etag"]
    assert int(h["content-length"]) < int(identity["content-length"])


@pytest.mark.parametrize("ae,gz", [("gzip;q=0", False), ("identity", False), ("*", True), ("x-gzip", True),
                                   ("br;q=1, gzip;q=0.5", True), ("*;q=0", False), ("GZIP", True),
                                   ("gzip;q=0.000, *;q=1", False)])
def test_accept_encoding(store, ae, gz):
    h = one(store, "/index.html", f"Accept-Encoding: {ae}")[1]
    assert ("content-encoding" in h) == gz


def test_no_gzip_for_png(store):
    h = one(store, "/img/logo.png", "Accept-Encoding: gzip")[1]
    assert "content-encoding" not in h and "vary" not in h


def test_index_and_redirect(store):
    status, h, body, _ = one(store, "/docs/")
    assert status == 200 and body == read("docs/index.html")
    status, h, body, _ = one(store, "/")
    assert status == 200 and body == read("index.html")
    status, h, body, conn = one(store, "/docs/guide")
    assert status == 301 and h["location"] == "/docs/guide/" and not conn.closed
    assert b"/docs/guide/" in body
    status, h, body, _ = one(store, "/docs/guide", method="HEAD")
    assert status == 301 and body == b"" and h["location"] == "/docs/guide/"


def test_404_from_site_page(store):
    status, h, body, conn = one(store, "/no/such/page")
    assert status == 404 and body == read("404.html")
    assert not conn.closed
    status, h, body, _ = one(store, "/no/such/page", method="HEAD")
    assert status == 404 and body == b"" and int(h["content-length"]) == len(read("404.html"))


def test_default_404_page(tmp_path):
    from .content_support import compile_tree
    s = compile_tree(tmp_path, {"a.txt": b"hello"})
    data, _ = exchange(s, b"GET /b.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    [(status, h, body)] = h11_parse([("GET", "/b.txt")], data)
    assert status == 404 and b"<h1>404 Not Found</h1>" in body and h["content-type"] == "text/html; charset=utf-8"
    s.close()


@pytest.mark.parametrize("target,rel", [
    ("/docs/guide/content.html?x=1&y=2", "docs/guide/content.html"),
    ("/docs/%67uide/content%2Ehtml", "docs/guide/content.html"),
    ("/docs/reference/../guide/./content.html", "docs/guide/content.html"),
    ("/../../../etc/../about.html", "about.html"),
    ("/%2e%2e/%2E%2E/about.html", "about.html"),
    ("//docs//guide/", "docs/guide/index.html"),
    ("/docs/guide/..", "docs/index.html"),
    ("http://t/about.html", "about.html"),
    ("HTTP://t:80/docs/?q", "docs/index.html"),
    ("http://t", "index.html"),
])
def test_target_forms_and_normalization(store, target, rel):
    status, h, body, _ = one(store, target)
    assert status == 200 and body == read(rel)


@pytest.mark.parametrize("target", ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc/passwd",
                                    "/%ff"])
def test_never_escapes_root(store, target):
    assert one(store, target)[0] == 404


@pytest.mark.parametrize("target", ["/%00", "/about.html%00", "/a%00/../about.html", "/x?%00", "http://t/%00"])
def test_nul_in_decoded_path_is_400(store, target):
    """Issue 10 item 5: a NUL in the decoded path is a bad request (400 and close, as
    nginx), not a missing file; in the query it is not part of the path."""
    data, conn = get(store, target)
    status, h, _ = httpclient_parse(data)
    if "?" in target:
        assert status == 404 and not conn.closed
    else:
        assert status == 400 and conn.closed and h["connection"] == "close"


def test_if_none_match_304(store):
    etag = one(store, "/about.html")[1]["etag"]
    for v in (etag, "W/" + etag, f'"nope", {etag}', "*"):
        status, h, body, conn = one(store, "/about.html", f"If-None-Match: {v}")
        assert status == 304 and body == b"" and h["etag"] == etag and not conn.closed
        assert h["date"] == DATE.decode() and "cache-control" in h and h["vary"] == "Accept-Encoding"
    assert one(store, "/about.html", 'If-None-Match: "other"')[0] == 200
    gz = one(store, "/about.html", "Accept-Encoding: gzip")[1]["etag"]
    status, h, _, _ = one(store, "/about.html", "Accept-Encoding: gzip", f"If-None-Match: {gz}")
    assert status == 304 and h["etag"] == gz
    assert one(store, "/about.html", "Accept-Encoding: gzip", f"If-None-Match: {gz}", method="HEAD")[0] == 304


def test_if_modified_since(store):
    lm = one(store, "/about.html")[1]["last-modified"]
    assert one(store, "/about.html", f"If-Modified-Since: {lm}")[0] == 304
    assert one(store, "/about.html", "If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT")[0] == 200
    assert one(store, "/about.html", "If-Modified-Since: Friday, 31-Dec-99 23:59:59 GMT")[0] == 200
    assert one(store, "/about.html", "If-Modified-Since: Tue, 01 Dec 2026 09:59:59 GMT")[0] == 304
    assert one(store, "/about.html", f"If-Modified-Since: {DATE.decode()}")[0] == 304     # = now: valid
    assert one(store, "/about.html", "If-Modified-Since: garbage")[0] == 200
    # If-None-Match takes precedence (RFC 9110 §13.1.3)
    assert one(store, "/about.html", 'If-None-Match: "x"', f"If-Modified-Since: {lm}")[0] == 200


@pytest.mark.parametrize("ims", ["Tue, 01 Dec 2026 10:00:01 GMT", "Fri Dec 31 23:59:59 2100",
                                 "Friday, 31-Dec-60 23:59:59 GMT"])
def test_if_modified_since_in_the_future_is_ignored(store, ims):
    """Issue 10 item 5, RFC 9110 §13.1.3: a date later than the server's current time
    (the Date it sends) is invalid and the field is ignored: the full 200. The reply
    is not cached: once the clock has passed that date, the same bytes get 304."""
    from appliance.http import HTTPConnection
    status, h, body, _ = one(store, "/about.html", f"If-Modified-Since: {ims}")
    assert status == 200 and body == read("about.html") and h["date"] == DATE.decode()
    raw = f"GET /about.html HTTP/1.1\r\nHost: t\r\nIf-Modified-Since: {ims}\r\n\r\n".encode()
    later = HTTPConnection(store.site, store.blob)
    later.now(b"Sat, 01 Jan 2101 00:00:00 GMT")
    assert [r.status for r in later.receive(raw)] == [304]      # (not the first one's 200 from the cache)


def test_range_206(store):
    data = read("downloads/data.txt")
    for spec, (a, b) in {"0-99": (0, 99), "100-": (100, len(data) - 1), "-500": (len(data) - 500, len(data) - 1),
                         f"10-{len(data) + 100}": (10, len(data) - 1), "-99999999": (0, len(data) - 1)}.items():
        status, h, body, conn = one(store, "/downloads/data.txt", f"Range: bytes={spec}", "Accept-Encoding: gzip")
        assert status == 206, spec
        assert body == data[a:b + 1]
        assert h["content-range"] == f"bytes {a}-{b}/{len(data)}"
        assert h["content-length"] == str(b - a + 1)
        assert h["date"] == DATE.decode() and h["connection"] == "keep-alive"
        assert "content-encoding" not in h and not conn.closed


def test_range_body_is_a_slice_of_the_blob(store):
    from appliance.http import HTTPConnection
    c = HTTPConnection(store.site, store.blob)
    [r] = c.receive(b"GET /downloads/data.txt HTTP/1.1\r\nHost: t\r\nRange: bytes=5-9\r\n\r\n")
    assert r.status == 206 and isinstance(r.body, memoryview) and r.body.obj is store.blob.obj
    assert r.length == len(r.header) + 5


def test_range_416_and_ignored(store):
    size = len(read("about.html"))
    for spec in (f"bytes={size}-", "bytes=-0", f"bytes={size + 5}-{size + 10}"):
        status, h, body, conn = one(store, "/about.html", f"Range: {spec}")
        assert status == 416 and h["content-range"] == f"bytes */{size}" and body == b""
        assert not conn.closed
    for spec in ("bytes=5-1", "items=0-1", "bytes=0-1,5-6", "bytes=x-", "bytes 0-1"):
        status, h, body, _ = one(store, "/about.html", f"Range: {spec}")
        assert status == 200 and len(body) == size, spec
    assert one(store, "/about.html", "Range: bytes=0-1", method="HEAD")[0] == 200


def test_if_range(store):
    h = one(store, "/about.html")[1]
    assert one(store, "/about.html", "Range: bytes=0-1", f"If-Range: {h['etag']}")[0] == 206
    assert one(store, "/about.html", "Range: bytes=0-1", f"If-Range: {h['last-modified']}")[0] == 206
    assert one(store, "/about.html", "Range: bytes=0-1", 'If-Range: "stale"')[0] == 200
    assert one(store, "/about.html", "Range: bytes=0-1", f"If-Range: W/{h['etag']}")[0] == 200
    assert one(store, "/about.html", "Range: bytes=0-1", "If-Range: Sun, 06 Nov 1994 08:49:37 GMT")[0] == 200


def test_405_with_allow(store):
    for m in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
        data, conn = get(store, "/about.html", method=m)
        status, h, body = httpclient_parse(data)
        assert status == 405 and h["allow"] == "GET, HEAD" and not conn.closed


def test_501_unknown_method(store):
    data, conn = get(store, "/", method="BREW")
    assert httpclient_parse(data)[0] == 501


def test_connection_close_and_http10(store):
    data, conn = get(store, "/about.html", "Connection: close")
    status, h, body = httpclient_parse(data)
    assert status == 200 and h["connection"] == "close" and conn.closed
    assert body == read("about.html")
    data, conn = get(store, "/about.html", version="1.0")
    assert conn.closed and httpclient_parse(data)[1]["connection"] == "close"
    data, conn = get(store, "/about.html", "Connection: Keep-Alive", version="1.0")
    assert not conn.closed and httpclient_parse(data)[1]["connection"] == "keep-alive"
    data, conn = get(store, "/about.html", "Connection: foo, close", version="1.0")
    assert conn.closed
    # HTTP/1.0 needs no Host
    data, conn = exchange(store, b"GET /robots.txt HTTP/1.0\r\n\r\n")
    assert httpclient_parse(data)[2] == read("robots.txt")


def test_pipelined_in_order_and_byte_at_a_time(store):
    reqs = [("GET", "/about.html"), ("HEAD", "/css/site.css"), ("GET", "/docs"), ("GET", "/nope"),
            ("GET", "/robots.txt")]
    raw = b"".join(f"{m} {t} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for m, t in reqs)
    whole, _ = exchange(store, raw)
    slow, _ = exchange(store, raw, step=1)
    odd, _ = exchange(store, raw, step=7)
    assert whole == slow == odd
    res = h11_parse(reqs, whole)
    assert [r[0] for r in res] == [200, 200, 301, 404, 200]
    assert res[0][2] == read("about.html") and res[1][2] == b"" and res[4][2] == read("robots.txt")


def test_pipeline_stops_after_close(store):
    raw = (b"GET /robots.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
           b"GET /about.html HTTP/1.1\r\nHost: t\r\n\r\n")
    data, conn = exchange(store, raw)
    assert conn.closed
    assert data.count(b"HTTP/1.1 ") == 1
    assert conn.receive(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n") == []


def test_bare_lf_and_leading_empty_lines(store):
    data, conn = exchange(store, b"\r\n\r\nGET /robots.txt HTTP/1.1\nHost: t\n\nGET /robots.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    res = h11_parse([("GET", "/robots.txt")] * 2, data)
    assert [r[2] for r in res] == [read("robots.txt")] * 2


def test_cache_returns_same_answer(store):
    from appliance.http import HTTPConnection
    raw = b"GET /about.html HTTP/1.1\r\nHost: t\r\n\r\n"
    a = HTTPConnection(store.site, store.blob).receive(raw)
    b = HTTPConnection(store.site, store.blob).receive(raw)
    assert a[0].response is b[0].response and a[0].status == 200
    raw = b"GET /about.html HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    c = HTTPConnection(store.site, store.blob)
    assert c.receive(raw)[0].close and c.closed
    c = HTTPConnection(store.site, store.blob)
    assert c.receive(raw)[0].close and c.closed


def test_if_match_and_if_unmodified_since_412(store):
    h = one(store, "/about.html")[1]
    etag, lm = h["etag"], h["last-modified"]
    for v in (etag, "*", f'"x", {etag}'):
        assert one(store, "/about.html", f"If-Match: {v}")[0] == 200
    for v in ('"x"', f"W/{etag}"):                       # strong comparison (RFC 9110 §13.1.1)
        status, h2, body, conn = one(store, "/about.html", f"If-Match: {v}")
        assert status == 412 and not conn.closed and b"412" in body
    status, _, body, _ = one(store, "/about.html", 'If-Match: "x"', method="HEAD")
    assert status == 412 and body == b""
    assert one(store, "/about.html", f"If-Unmodified-Since: {lm}")[0] == 200
    assert one(store, "/about.html", "If-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 GMT")[0] == 412
    # If-Match wins over If-Unmodified-Since; a 412 comes before a 304 (§13.2.2)
    assert one(store, "/about.html", f"If-Match: {etag}", "If-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 GMT")[0] == 200
    assert one(store, "/about.html", 'If-Match: "x"', f"If-None-Match: {etag}")[0] == 412


def test_every_kind_pipelined_byte_at_a_time(store):
    etag = one(store, "/about.html")[1]["etag"]
    reqs = [
        ("GET", "/about.html", ""),
        ("GET", "/about.html", "Accept-Encoding: gzip\r\n"),
        ("HEAD", "/about.html", "Accept-Encoding: gzip\r\n"),
        ("GET", "/about.html", f"If-None-Match: {etag}\r\n"),
        ("GET", "/about.html", 'If-Match: "x"\r\n'),
        ("GET", "/downloads/data.txt", "Range: bytes=100-199\r\n"),
        ("GET", "/about.html", "Range: bytes=999999-\r\n"),
        ("GET", "/docs/guide", ""),
        ("GET", "/missing", ""),
        ("DELETE", "/about.html", ""),
        ("GET", "/robots.txt", "Content-Length: 3\r\n"),
    ]
    raw = b"".join(f"{m} {t} HTTP/1.1\r\nHost: t\r\n{x}\r\n".encode() + (b"abc" if "Content-Length" in x else b"")
                   for m, t, x in reqs)
    raw += b"GET / HTTP/2.0\r\nHost: t\r\n\r\n"
    whole, c1 = exchange(store, raw)
    slow, c2 = exchange(store, raw, step=1)
    assert whole == slow and c1.closed and c2.closed
    res = h11_parse([(m, t) for m, t, _ in reqs], whole)
    assert [r[0] for r in res] == [200, 200, 200, 304, 412, 206, 416, 301, 404, 405, 200]
    assert gzip.decompress(res[1][2]) == read("about.html")
    assert res[5][2] == read("downloads/data.txt")[100:200]
    assert whole.endswith(httpclient_parse_last(whole))


def httpclient_parse_last(data):
    """The final 505 reply, checked with http.client; returns its bytes."""
    i = data.rindex(b"HTTP/1.1 505 ")
    status, h, body = httpclient_parse(data[i:])
    assert status == 505 and h["connection"] == "close"
    return data[i:]
