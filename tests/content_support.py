"""Helpers for the content and HTTP tests: compile small sites, parse replies with h11.

h11 (and http.client) are the independent parsers: every reply the appliance
produces is checked by parsing its bytes with them, never with our own code.
"""
import atexit
import io
import os
import http.client
import shutil
import tempfile

import h11

from appliance.content.compiler import Options, compile_site
from appliance.content.store import Store
from appliance.http import HTTPConnection, reply_bytes

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "www")
# "now" for the HTTP tests: after the example files' mtimes (SDE), as a real clock would be
# (an If-Modified-Since later than now is ignored, RFC 9110 §13.1.3)
DATE = b"Tue, 01 Dec 2026 10:00:00 GMT"
SDE = 1700000000


_EXAMPLE_STORES = {}


def example_store_path(mss=1448) -> str:
    """The example site compiled once per test session (per MSS); removed at exit.
    Tests must not modify it (open it read-only, copy it to corrupt it)."""
    if mss not in _EXAMPLE_STORES:
        d = tempfile.mkdtemp(prefix="hb-example-store-")
        atexit.register(shutil.rmtree, d, True)
        out = os.path.join(d, "www.store")
        compile_site(EXAMPLE, out, Options(source_date_epoch=SDE, mss=mss))
        _EXAMPLE_STORES[mss] = out
    return _EXAMPLE_STORES[mss]


def compile_tree(tmp_path, files, name="site", **opts):
    """Write {relpath: bytes} under tmp_path/name, compile, return the open Store."""
    root = tmp_path / name
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    root.mkdir(exist_ok=True)
    out = tmp_path / (name + ".store")
    opts.setdefault("source_date_epoch", SDE)
    compile_site(str(root), str(out), Options(**opts))
    return Store.open(str(out))


def exchange(store, raw: bytes, step: int = 0):
    """Feed raw request bytes (all at once or `step` bytes at a time); the wire bytes back."""
    conn = HTTPConnection(store.site, store.blob)
    conn.now(DATE)
    out = []
    step = step or max(1, len(raw))
    for i in range(0, len(raw), step):
        for r in conn.receive(raw[i:i + step]):
            out.append(reply_bytes(r, store.blob, DATE))
    return b"".join(out), conn


def h11_parse(requests, data: bytes):
    """Parse `data` as the responses to `requests` [(method, target)] with an h11 client.
    Returns [(status, headers dict (lower-case str -> str), body bytes)]."""
    c = h11.Connection(h11.CLIENT)
    c.receive_data(data)
    results = []
    for method, target in requests:
        if c.our_state is h11.DONE and c.their_state is h11.DONE:
            c.start_next_cycle()
        c.send(h11.Request(method=method, target=target, headers=[("Host", "t")]))
        c.send(h11.EndOfMessage())
        status, headers, body = None, None, b""
        while True:
            ev = c.next_event()
            if ev is h11.NEED_DATA:
                raise AssertionError(f"incomplete response for {method} {target}")
            if isinstance(ev, h11.Response):
                status = ev.status_code
                headers = {}
                for k, v in ev.headers:
                    headers.setdefault(k.decode(), v.decode("latin-1"))
            elif isinstance(ev, h11.InformationalResponse):
                raise AssertionError("unexpected 1xx")
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            elif isinstance(ev, h11.ConnectionClosed):
                raise AssertionError("connection closed early")
        results.append((status, headers, body))
        if c.their_state is h11.MUST_CLOSE:
            break
    return results


class _Sock:
    def __init__(self, data):
        self._f = io.BytesIO(data)

    def makefile(self, mode, *a, **kw):
        return self._f


def httpclient_parse(data: bytes, method="GET"):
    """Parse one response with the standard library's http.client: (status, headers, body)."""
    r = http.client.HTTPResponse(_Sock(data), method=method)
    r.begin()
    body = r.read()
    # RFC 9110 §5.5: a field value excludes leading and trailing whitespace (OWS)
    return r.status, {k.lower(): v.strip(" \t") for k, v in r.getheaders()}, body
