"""One HTTP/1.1 connection, sans-IO: request bytes in, `Reply` decisions out.

Theory of operation: `HTTPConnection.receive(data)` appends bytes to a
buffer and, for every complete request in it, returns a `Reply` in request
order (pipelining, RFC 9112 §9.3.2). A reply is almost always a prebuilt
`Response` of the store -- the stack sends its bytes and patches only the
Date and Connection fields. Only 206 and 416 build a small header here
(`Reply.header`, Date/Connection filled from `now()`), followed by a
memoryview slice of the prebuilt 200 body in the blob.

The connection is a small state machine over the buffer:
    HEAD    waiting for a complete request head (limits -> 414/431)
    BODY    discarding a Content-Length body of a GET/HEAD (<= max_body, else 413)
    CHUNK   discarding a chunked body (size line, data, CRLF, trailer)
After a reply with close=True (errors, "Connection: close", HTTP/1.0 without
keep-alive) the connection is `closed` and ignores further input. Nothing
here raises on bad input: a `ProtocolError` becomes its error reply.

Bad input is answered as soon as it is certain: a request-line that no
further bytes can make valid gets its 400 at the first impossible byte
(`check_request_line`, run on every incomplete head; on a complete one only
when parsing failed, so that the status does not depend on how the bytes
were cut), and `eof()` (the client half-closed) answers a request begun but
not complete with 400, as nginx does.

Hot path: a shared, bounded cache (on the Site) maps the exact bytes of a
segment that is one whole body-less request to its Reply; replies are a
pure function of those bytes (the Date is the stack's business), so the
common keep-alive GET costs one dict lookup. The one exception, a 200 because
If-Modified-Since lies in the future (it may turn into a 304 later), is not
cached (`_volatile`).

Selection (RFC 9110): path lookup -> 301 for "/dir" -> content coding by
Accept-Encoding (§12.5.3) -> preconditions in the order of §13.2.2:
If-Match / If-Unmodified-Since -> 412, If-None-Match (weak comparison) /
If-Modified-Since -> 304 -> Range with If-Range for GET (§14) -> 206 / 416
-> the full 200 (or its HEAD twin).
"""
from .dates import parse_date, format_date
from .request import Limits, ProtocolError, NotFound, parse_head, decode_target, check_request_line, KNOWN_METHODS

__all__ = ["Reply", "HTTPConnection", "reply_bytes"]

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER = range(6)
_CONN = {False: b"keep-alive", True: b"close     "}


class Reply:
    """What to send for one request (see docs/internals.md)."""

    __slots__ = ("status", "close", "response", "header", "body", "length")

    def __init__(self, status, close, response=None, header=None, body=None):
        self.status = status
        self.close = close
        self.response = response
        self.header = header
        self.body = body
        if response is not None:
            self.length = response.length
        else:
            self.length = len(header) + (len(body) if body is not None else 0)

    def __repr__(self):
        kind = "prebuilt" if self.response is not None else "dynamic"
        return f"Reply({self.status}, {kind}, close={self.close}, length={self.length})"


def reply_bytes(reply: Reply, blob, date: bytes | None = None) -> bytes:
    """The exact bytes the appliance sends for `reply`: the prebuilt response with
    Date (if given) and Connection patched, or the dynamic header plus body."""
    r = reply.response
    if r is None:
        return reply.header + (bytes(reply.body) if reply.body is not None else b"")
    data = bytearray(blob[r.off:r.off + r.length])
    if date is not None and r.date_off >= 0:
        data[r.date_off:r.date_off + 29] = date
    if r.conn_off >= 0:
        data[r.conn_off:r.conn_off + 10] = _CONN[reply.close]
    return bytes(data)


def _accepts_gzip(value: bytes) -> bool:
    """RFC 9110 §12.5.3: gzip (or x-gzip, or *) listed with a non-zero qvalue."""
    best = None
    star = None
    for item in value.split(b","):
        parts = item.split(b";")
        coding = parts[0].strip(b" \t").lower()
        q = 1.0
        for p in parts[1:]:
            k, _, v = p.strip(b" \t").partition(b"=")
            if k.strip(b" \t").lower() == b"q":
                try:
                    q = float(v.strip(b" \t"))
                except ValueError:
                    q = 0.0
        if coding in (b"gzip", b"x-gzip"):
            best = q if best is None else max(best, q)
        elif coding == b"*":
            star = q
    if best is not None:
        return best > 0
    return star is not None and star > 0


def _etag_matches(value: bytes, etags) -> bytes | None:
    """If-None-Match with weak comparison (RFC 9110 §13.1.2): the matching etag or None."""
    v = value.strip(b" \t")
    if v == b"*":
        return etags[0]
    for tag in v.split(b","):
        tag = tag.strip(b" \t")
        if tag[:2] == b"W/":
            tag = tag[2:]
        for e in etags:
            if e is not None and tag == e:
                return e
    return None


def _strong_match(value: bytes, etags) -> bool:
    """If-Match with strong comparison (RFC 9110 §13.1.1): "*" or a listed strong etag."""
    v = value.strip(b" \t")
    if v == b"*":
        return True
    for tag in v.split(b","):
        tag = tag.strip(b" \t")
        if tag[:2] != b"W/" and any(e is not None and tag == e for e in etags):
            return True
    return False


def _parse_range(value: bytes, size: int):
    """One byte range of RFC 9110 §14.1.2 -> (first, last) inclusive; 'unsat' if
    unsatisfiable; None to ignore the field (invalid syntax, not bytes, several ranges)."""
    unit, eq, spec = value.partition(b"=")
    if not eq or unit.strip(b" \t").lower() != b"bytes":
        return None
    specs = [s.strip(b" \t") for s in spec.split(b",") if s.strip(b" \t")]
    if len(specs) != 1:
        return None         # multipart/byteranges is not prebuilt: serving 200 is allowed (§14.2)
    first, dash, last = specs[0].partition(b"-")
    if not dash:
        return None
    if first == b"":
        if not last.isdigit():
            return None
        n = int(last)
        if n == 0 or size == 0:
            return "unsat"
        return max(0, size - n), size - 1
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    a = int(first)
    if last and int(last) < a:
        return None         # invalid range-spec: ignore the field (§14.1.1)
    if a >= size:
        return "unsat"
    b = int(last) if last else size - 1
    return a, min(b, size - 1)


class HTTPConnection:
    """The HTTP state of one TCP connection. No sockets, no clock."""

    def __init__(self, site, blob, limits: Limits | None = None):
        self.site = site
        self.blob = blob
        self.limits = limits or _DEFAULT_LIMITS
        self.closed = False
        self._buf = b""
        self._pos = 0               # parsed up to here; compacted once per receive()
        self._state = _HEAD
        self._remaining = 0
        self._pending = None        # (Request) whose body is being discarded
        self._body_total = 0
        self._date = getattr(site, "date", b"Thu, 01 Jan 1970 00:00:00 GMT")
        self._now_t = None          # self._date as unix time, parsed when first needed
        self._volatile = False      # the reply just selected depends on the time: not cacheable
        # One cache per (site, limits): a reply is a pure function of the bytes only
        # under the same limits.
        caches = getattr(site, "cache", None)
        if caches is None:
            caches = {}
            try:
                site.cache = caches
            except AttributeError:
                pass
        cache = caches.get(self.limits)
        if cache is None:
            cache = caches[self.limits] = {}
        self._cache = cache

    @staticmethod
    def reply_cache(site) -> dict:
        """The shared reply cache of `site` under the default limits: raw bytes of a
        whole body-less request -> its Reply. For a fresh connection whose first
        bytes are a key, receive() returns exactly that Reply, so a connection that
        sends one request and closes needs no HTTPConnection. (Bounded by clearing
        it in place: the dict itself stays the same.)"""
        return HTTPConnection(site, None)._cache

    def now(self, date: bytes):
        """Set the current date (29-byte IMF-fixdate) for dynamic headers."""
        if len(date) != 29:
            raise ValueError("now(): the date must be a 29-byte IMF-fixdate")
        self._date = bytes(date)
        self._now_t = None

    # -- input ---------------------------------------------------------------

    def receive(self, data) -> list:
        """Feed received bytes; the replies for every request completed by them, in order."""
        if self.closed:
            return []
        if type(data) is not bytes:
            data = bytes(data)
        if not self._buf and self._state == _HEAD:
            r = self._cache.get(data)
            if r is not None:
                if r.close:
                    self.closed = True
                return [r]
            self._buf = data
            fresh = True
        else:
            self._buf += data
            fresh = False
        replies = []
        try:
            while not self.closed and self._pos < len(self._buf):
                if self._state == _HEAD:
                    r = self._next_request(fresh)
                else:
                    r = self._discard_body()
                fresh = False
                if r is None:
                    break
                replies.append(r)
                if r.close:
                    self.closed = True
        except ProtocolError as e:
            pending = self._pending
            p = self._pos
            head = pending.method == b"HEAD" if pending is not None else self._buf[p:p + 5] == b"HEAD "
            replies.append(self._error(e.status, head))
            self.closed = True
        if self.closed:
            self._buf = b""
            self._pos = 0
        elif self._pos:
            self._buf = self._buf[self._pos:]
            self._pos = 0
        return replies

    def eof(self) -> list:
        """The client half-closed (its FIN): no more bytes come. A request begun and
        not complete never will be: its 400 (nginx answers so too), else nothing.
        The connection is closed either way."""
        if self.closed:
            return []
        self.closed = True
        pending = self._pending
        buf = self._buf
        self._buf = b""
        self._pos = 0
        if pending is None and not buf:
            return []       # between requests (empty lines before a request were consumed)
        head = pending.method == b"HEAD" if pending is not None else buf[:5] == b"HEAD "
        return [self._error(400, head)]

    def _next_request(self, fresh):
        buf = self._buf
        p = self._pos
        n = len(buf)
        # RFC 9112 §2.2: ignore empty lines before the request-line.
        if buf[p] in (13, 10):
            while p < n and buf[p] in (13, 10):
                p += 1
            self._pos = p
            fresh = False
            if p == n:
                return None
        # The head ends at the first empty line: CRLF CRLF, or a bare LF on either side.
        # Offsets, not slices, so a long pipeline is parsed in linear time.
        pos = buf.find(b"\n\r\n", p)
        lf = buf.find(b"\n\n", p, pos + 1 if pos >= 0 else n)
        if lf >= 0:
            head, end = buf[p:lf], lf + 2
        elif pos >= 0:
            head, end = buf[p:pos], pos + 3
        else:
            self._check_incomplete(buf, p)
            return None
        lim = self.limits
        try:
            if len(head) > lim.max_head:
                nl = head.find(b"\n")
                raise ProtocolError(414 if nl < 0 or nl > lim.max_request_line else 431, "request head too large")
            req = parse_head(head, lim)
        except ProtocolError:
            self._check_line(buf, p)    # a bad request-line byte first: as when it came alone
            raise
        self._pos = end
        if req.chunked or req.content_length:
            if req.method not in (b"GET", b"HEAD"):
                # We answer without reading the content, so the connection cannot continue.
                return self._reply_for(req, force_close=True)
            if req.content_length and req.content_length > lim.max_body:
                raise ProtocolError(413, "request content too large")
            self._pending = req
            self._body_total = 0
            if req.chunked:
                self._state = _CHUNK_SIZE
            else:
                self._state = _BODY
                self._remaining = req.content_length
            return self._discard_body()
        reply = self._reply_for(req)
        if self._volatile:
            self._volatile = False      # (set by _reply_for: this reply depends on the time)
        elif fresh and end == n and reply.response is not None and len(head) <= lim.cache_key_max \
                and lim.cache_entries:
            cache = self._cache
            if len(cache) >= lim.cache_entries:
                cache.clear()       # bounded; junk requests cannot grow it
            cache[buf] = reply
        return reply

    def _check_line(self, buf, p):
        """The request-line starting at `p` (its first max_request_line bytes, at most
        up to its LF) can still become valid; else ProtocolError(400)."""
        nl = buf.find(b"\n", p)
        e = nl + 1 if nl >= 0 else len(buf)
        m = p + self.limits.max_request_line
        check_request_line(buf, p, e if e < m else m)

    def _check_incomplete(self, buf, p):
        """The head starting at `p` is not complete: reject it now if it cannot become
        valid (400) or has outgrown the limits (414, 431)."""
        lim = self.limits
        self._check_line(buf, p)
        nl = buf.find(b"\n", p)
        if nl < 0:
            if len(buf) - p > lim.max_request_line:
                raise ProtocolError(414, "request-line too long")
        elif nl - p > lim.max_request_line + 1:
            raise ProtocolError(414, "request-line too long")
        if len(buf) - p > lim.max_head:
            raise ProtocolError(431, "request head too large")

    def _take_line(self, buf, limit: int, status: int, reason: str):
        """(line without CR LF, bytes used) taken off the front of `buf` (the
        buffer), LF alone accepted (RFC 9112 §2.2); None while no LF came yet.
        Waiting for more than `limit` bytes without one is ProtocolError(status)."""
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > limit:
                raise ProtocolError(status, reason)
            return None
        self._buf = buf[nl + 1:]
        return buf[:nl].rstrip(b"\r"), nl + 1

    def _discard_body(self):
        """Consume body bytes of the pending request; its reply once the body is complete."""
        lim = self.limits
        if self._pos:
            self._buf = self._buf[self._pos:]
            self._pos = 0
        while True:
            st = self._state
            buf = self._buf
            if st == _BODY or st == _CHUNK_DATA:
                n = min(self._remaining, len(buf))
                self._buf = buf[n:]
                self._remaining -= n
                if self._remaining:
                    return None
                if st == _BODY:
                    break
                self._state = _CHUNK_CRLF
            elif st == _CHUNK_CRLF:
                if buf[:2] == b"\r\n":
                    self._buf = buf[2:]
                elif buf[:1] == b"\n":
                    self._buf = buf[1:]
                elif len(buf) < 2 and buf[:1] in (b"", b"\r"):
                    return None
                else:
                    raise ProtocolError(400, "chunk data not followed by CRLF")
                self._state = _CHUNK_SIZE
            elif st == _CHUNK_SIZE:
                r = self._take_line(buf, lim.max_chunk_line, 400, "chunk-size line too long")
                if r is None:
                    return None
                line = r[0]
                if len(line) > lim.max_chunk_line:
                    raise ProtocolError(400, "chunk-size line too long")
                size = line.split(b";", 1)[0].strip(b" \t")
                if not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size):
                    raise ProtocolError(400, "malformed chunk-size")
                n = int(size, 16)
                self._body_total += n
                if self._body_total > lim.max_body:
                    raise ProtocolError(413, "request content too large")
                if n == 0:
                    self._state = _TRAILER
                    self._remaining = 0
                else:
                    self._state = _CHUNK_DATA
                    self._remaining = n
            elif st == _TRAILER:
                r = self._take_line(buf, lim.max_head, 431, "trailer section too large")
                if r is None:
                    return None
                line = r[0]
                self._remaining += r[1]
                if self._remaining > lim.max_head:
                    raise ProtocolError(431, "trailer section too large")
                if not line:
                    break
                if b":" not in line or line[:1] in (b" ", b"\t"):
                    raise ProtocolError(400, "malformed trailer field")
            else:  # pragma: no cover
                raise AssertionError(st)
        req = self._pending
        self._pending = None
        self._state = _HEAD
        return self._reply_for(req)

    # -- selection -----------------------------------------------------------

    def _error(self, status, head, close=True):
        g, h = self.site.errors[status]
        return Reply(status, close, h if head else g)

    def _reply_for(self, req, force_close=False):
        close = force_close or not req.keep_alive
        method = req.method
        head = method == b"HEAD"
        if not head and method != b"GET":
            if method in KNOWN_METHODS:
                return self._error(405, False, close)
            return self._error(501, False, close)
        site = self.site
        try:
            path = decode_target(req.target)
        except NotFound:
            return self._error(404, head, close)
        except ProtocolError as e:
            return self._error(e.status, head)
        res = site.resources.get(path)
        if res is None:
            red = (site.redirects_head if head else site.redirects).get(path)
            if red is not None:
                return Reply(301, close, red)
            return self._error(404, head, close)

        fields = req.fields
        gz = False
        if res.gzip_get is not None:
            ae = fields.get(b"accept-encoding")
            if ae is not None:
                gz = _accepts_gzip(b",".join(ae))
        etag = res.gzip_etag if gz else res.etag

        # RFC 9110 §13.2.2: If-Match, else If-Unmodified-Since, then If-None-Match,
        # else If-Modified-Since, then If-Range.
        im = fields.get(b"if-match")
        if im is not None:
            if not _strong_match(b",".join(im), (etag, res.gzip_etag if not gz else res.etag)):
                return self._error(412, head, close)
        else:
            ius = fields.get(b"if-unmodified-since")
            if ius is not None and len(ius) == 1:
                t = parse_date(ius[0])
                if t is not None and res.last_modified > t:
                    return self._error(412, head, close)
        inm = fields.get(b"if-none-match")
        if inm is not None:
            m = _etag_matches(b",".join(inm), (etag, res.gzip_etag if not gz else res.etag))
            if m is not None:
                nm = res.gzip_not_modified if m == res.gzip_etag and m is not None else res.not_modified
                return Reply(304, close, nm)
        else:
            ims = fields.get(b"if-modified-since")
            if ims is not None and len(ims) == 1:
                t = parse_date(ims[0])
                if t is not None and res.last_modified <= t:
                    now = self._now_t
                    if now is None:
                        now = self._now_t = parse_date(self._date)
                    if now is None or t <= now:
                        return Reply(304, close, res.gzip_not_modified if gz else res.not_modified)
                    # RFC 9110 §13.1.3: a date later than the server's current time is
                    # invalid, and an invalid If-Modified-Since is ignored. Later it may be
                    # valid: the 200 is not cached.
                    self._volatile = True

        if head:
            return Reply(200, close, res.gzip_head if gz else res.head)
        rng = fields.get(b"range")
        if rng is not None and len(rng) == 1:
            if self._if_range_ok(fields.get(b"if-range"), res):
                r = _parse_range(rng[0], res.size)
                if r == "unsat":
                    return self._dynamic(416, close, res, None)
                if r is not None:
                    return self._dynamic(206, close, res, r)
        return Reply(200, close, res.gzip_get if gz else res.get)

    @staticmethod
    def _if_range_ok(values, res) -> bool:
        """RFC 9110 §13.1.5: honour Range only if If-Range (when present) still matches,
        strong comparison for entity-tags, exact equality for dates."""
        if values is None:
            return True
        if len(values) != 1:
            return False
        v = values[0]
        if v[:1] == b'"':
            return v == res.etag
        if v[:2] == b"W/":
            return False
        t = parse_date(v)
        return t is not None and t == res.last_modified

    def _dynamic(self, status, close, res, rng):
        site = self.site
        lines = [b"HTTP/1.1 %d %s\r\nDate: %s\r\nConnection: %s\r\nServer: %s\r\n"
                 % (status, b"Partial Content" if status == 206 else b"Range Not Satisfiable",
                    self._date, _CONN[close], site.server)]
        if status == 206:
            a, b = rng
            body = self.blob[res.body_off + a:res.body_off + b + 1]
            lines.append(b"Content-Type: %s\r\nContent-Length: %d\r\nContent-Range: bytes %d-%d/%d\r\n"
                         b"Last-Modified: %s\r\nETag: %s\r\nCache-Control: %s\r\nAccept-Ranges: bytes\r\n"
                         % (res.content_type, b - a + 1, a, b, res.size, format_date(res.last_modified),
                            res.etag, res.cache_control))
        else:
            body = self.blob[0:0]
            lines.append(b"Content-Range: bytes */%d\r\nContent-Length: 0\r\n" % res.size)
        if res.vary:
            lines.append(b"Vary: Accept-Encoding\r\n")
        lines.append(b"\r\n")
        return Reply(status, close, None, b"".join(lines), body)


_DEFAULT_LIMITS = Limits()
