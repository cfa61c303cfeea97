"""HTTP/1.1 request heads: parsing and validation (RFC 9112 §2-§7, RFC 9110).

Theory of operation: `parse_head` takes one complete request head (the
request-line and field lines, up to but excluding the empty line) and
returns a `Request`, or raises `ProtocolError` carrying the status code to
answer with. It is strict where leniency would let two parsers disagree
about framing (the request-smuggling rules of RFC 9112 §6.3 and §11.2):
whitespace before a field's colon, obs-fold, CR or NUL in values, both
Content-Length and Transfer-Encoding, Transfer-Encoding in HTTP/1.0,
a Content-Length that is a list (even "5, 5"), an empty Host on an
origin-form request are all 400. It is lenient where RFC 9112 §2.2 allows
it: a bare LF ends a line, empty lines before a request are skipped (by the
caller).

`check_request_line` looks at the start of a request-line that is still
arriving and raises ProtocolError(400) at the first byte no valid
request-line can have there (method token, SP, request-target, SP,
"HTTP/" DIGIT "." DIGIT, CRLF), so garbage, binary or a TLS ClientHello
is answered at once rather than at the request timeout (nginx does the
same). It accepts exactly the lines `parse_head` accepts, and their prefixes.

`decode_target` maps the request-target (origin-form or absolute-form,
RFC 9112 §3.2) to the normalized, percent-decoded path used as the lookup
key of `Site.resources`: query dropped, "//" collapsed, dot-segments
removed (RFC 3986 §5.2.4) after decoding, never rising above "/".
"""
import re

__all__ = ["ProtocolError", "Limits", "Request", "parse_head", "decode_target", "NotFound",
           "KNOWN_METHODS", "check_request_line"]


class ProtocolError(Exception):
    """The request cannot be answered normally; `.status` is the status to reply with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class NotFound(ProtocolError):
    """The target is well-formed but names nothing a site can have (not UTF-8): 404."""

    def __init__(self, message: str):
        super().__init__(404, message)


class Limits:
    """Request size limits (bytes); over them the request gets 414/431/413."""

    __slots__ = ("max_request_line", "max_head", "max_fields", "max_body", "max_chunk_line", "cache_entries",
                 "cache_key_max")

    def __init__(self, max_request_line=8192, max_head=16384, max_fields=100, max_body=1 << 20,
                 max_chunk_line=1024, cache_entries=4096, cache_key_max=4096):
        self.max_request_line = max_request_line    # request-line, else 414 (RFC 9112 §3)
        self.max_head = max_head                    # whole head, else 431 (RFC 6585 §5)
        self.max_fields = max_fields                # number of field lines, else 431
        self.max_body = max_body                    # content of a GET/HEAD we read and discard, else 413
        self.max_chunk_line = max_chunk_line        # chunk-size line incl. extensions, else 400
        self.cache_entries = cache_entries          # the shared raw-request -> Reply cache
        self.cache_key_max = cache_key_max          # requests longer than this are not cached


# RFC 9110 §9: registered methods other than GET/HEAD get 405; unknown ones 501.
KNOWN_METHODS = frozenset((b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
                           b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK",
                           b"SEARCH", b"QUERY"))

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(:[0-9]*)?\Z")
_HEX = b"0123456789abcdefABCDEF"
# The prefixes of a request-line (RFC 9112 §3): every optional group is the rest
# of the line, and no two parts share a byte, so the match ends at the first byte
# that cannot belong to any valid line (the same grammar as parse_head's checks).
_LINE_PREFIX = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?: (?:[\x21-\x7e]+(?: (?:H(?:T(?:T(?:P(?:/(?:[0-9]"
                          rb"(?:\.(?:[0-9]\r?\n?)?)?)?)?)?)?)?)?)?)?)?")


class Request:
    """A parsed request head. Field names are lower-cased bytes; values OWS-stripped."""

    __slots__ = ("method", "target", "version", "fields", "keep_alive", "content_length", "chunked")

    def __init__(self, method, target, version, fields, keep_alive, content_length, chunked):
        self.method = method
        self.target = target
        self.version = version            # (1, 0) or (1, 1)
        self.fields = fields              # dict: name -> list of values
        self.keep_alive = keep_alive
        self.content_length = content_length   # None when absent
        self.chunked = chunked

    def get(self, name: bytes):
        """The combined value of a field (list-based fields joined with ", "), or None."""
        v = self.fields.get(name)
        return None if v is None else b", ".join(v)

    def __repr__(self):
        return f"Request({self.method!r}, {self.target!r}, HTTP/{self.version[0]}.{self.version[1]})"


def check_request_line(buf: bytes, start: int, end: int) -> None:
    """ProtocolError(400) if buf[start:end], the first bytes of a request-line (up
    to its LF at most, after any empty lines), can begin no valid request-line."""
    m = _LINE_PREFIX.match(buf, start, end)
    bad = start if m is None else m.end()
    if bad < end:
        raise ProtocolError(400, f"invalid request-line: byte {buf[bad]:#04x} at offset {bad - start}")


def _tokens(value: bytes):
    return [t.strip(b" \t").lower() for t in value.split(b",") if t.strip(b" \t")]


def parse_head(head: bytes, limits: Limits) -> Request:
    """Parse a request head (without the terminating empty line)."""
    lines = head.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise ProtocolError(400, "empty request")
    line = lines[0]
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) > limits.max_request_line:
        raise ProtocolError(414, "request-line too long")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise ProtocolError(400, "malformed request-line")
    method, target, version = parts
    m = _VERSION.match(version)
    if m is None:
        raise ProtocolError(400, "malformed HTTP-version")
    if m.group(1) != b"1":
        raise ProtocolError(505, "HTTP major version not supported")
    ver = (1, 0) if m.group(2) == b"0" else (1, 1)
    if not _TOKEN.match(method):
        raise ProtocolError(400, "malformed method")
    if not _TARGET.match(target):
        raise ProtocolError(400, "malformed request-target")
    if len(lines) - 1 > limits.max_fields:
        raise ProtocolError(431, "too many header fields")
    fields = {}
    for raw in lines[1:]:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if raw[:1] in (b" ", b"\t"):
            raise ProtocolError(400, "obsolete line folding")   # RFC 9112 §5.2
        name, colon, value = raw.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise ProtocolError(400, "malformed header field")   # incl. whitespace before ':' (§5.1)
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value) or b"\r" in value:
            raise ProtocolError(400, "invalid character in header field value")
        fields.setdefault(name.lower(), []).append(value)

    hosts = fields.get(b"host")
    if hosts is None:
        if ver == (1, 1):
            raise ProtocolError(400, "missing Host header field")   # RFC 9112 §3.2
    elif len(hosts) > 1 or not _HOST.match(hosts[0]):
        raise ProtocolError(400, "invalid Host header field")
    elif not hosts[0] and target[:1] == b"/":
        # The target URI of an origin-form request takes its authority from Host
        # (RFC 9112 §3.3), and an "http" URI with an empty host is invalid (RFC 9110
        # §4.2.1). An absolute-form request carries its own; Host is ignored (§3.2.2).
        raise ProtocolError(400, "empty Host header field")

    conn = fields.get(b"connection")
    tokens = _tokens(b",".join(conn)) if conn else ()
    if b"close" in tokens:
        keep_alive = False
    elif ver == (1, 0):
        keep_alive = b"keep-alive" in tokens
    else:
        keep_alive = True

    content_length = None
    chunked = False
    te = fields.get(b"transfer-encoding")
    cl = fields.get(b"content-length")
    if te is not None:
        if ver == (1, 0):
            raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")   # RFC 9112 §6.1
        if cl is not None:
            raise ProtocolError(400, "both Transfer-Encoding and Content-Length")   # RFC 9112 §6.3
        codings = _tokens(b",".join(te))
        if not codings or codings[-1] != b"chunked":
            raise ProtocolError(400, "Transfer-Encoding does not end with chunked")
        if codings.count(b"chunked") != 1:
            raise ProtocolError(400, "chunked applied twice")   # RFC 9112 §7
        for c in codings[:-1]:
            if c not in (b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"):
                raise ProtocolError(501, "unknown transfer coding")   # RFC 9112 §6.1
        chunked = True
    elif cl is not None:
        # RFC 9112 §6.3: a list, even of equal values ("5, 5", or the field twice), may
        # be rejected as invalid; we do, as nginx does: one reading of the framing only.
        if len(cl) != 1 or b"," in cl[0]:
            raise ProtocolError(400, "Content-Length is a list")
        v = cl[0]
        if not v.isdigit() or len(v) > 18:
            raise ProtocolError(400, "invalid Content-Length")
        content_length = int(v)
    return Request(method, target, ver, fields, keep_alive, content_length, chunked)


def _unquote(s: bytes) -> bytes:
    if b"%" not in s:
        return s
    out = bytearray()
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == 0x25:
            h = s[i + 1:i + 3]
            if len(h) != 2 or h[0] not in _HEX or h[1] not in _HEX:
                raise ProtocolError(400, "malformed percent-encoding in request-target")
            out.append(int(h, 16))
            i += 3
        else:
            out.append(c)
            i += 1
    return bytes(out)


def decode_target(target: bytes) -> str:
    """The normalized lookup path of a request-target; ProtocolError(400) if malformed
    (a NUL in the decoded path too, as nginx), NotFound if it names something no
    site file can be (not UTF-8)."""
    if target[:1] != b"/":
        low = target[:8].lower()
        if low.startswith(b"http://") or low.startswith(b"https://"):
            rest = target[target.index(b"//") + 2:]
            slash = rest.find(b"/")
            authority = rest if slash < 0 else rest[:slash]
            if b"@" in authority or not _HOST.match(authority.split(b"?")[0]):
                raise ProtocolError(400, "invalid authority in absolute-form target")
            target = b"/" if slash < 0 else rest[slash:]
            if target[:1] != b"/":
                target = b"/" + target
        else:
            raise ProtocolError(400, "request-target is not origin-form or absolute-form")
    q = target.find(b"?")
    if q >= 0:
        target = target[:q]
    if b"#" in target:
        raise ProtocolError(400, "fragment in request-target")
    raw = _unquote(target)
    if b"\0" in raw:
        raise ProtocolError(400, "NUL in the decoded path")
    try:
        path = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NotFound("path is not UTF-8") from None
    if "//" not in path and "/." not in path:
        return path     # already normal: the common case
    out = []
    segs = path.split("/")[1:]
    last = len(segs) - 1
    trailing = False
    for i, seg in enumerate(segs):
        if seg == "..":
            if out:
                out.pop()
            trailing = True
        elif seg == "." or seg == "":
            trailing = True
        else:
            out.append(seg)
            trailing = False
        if i == last and seg not in ("", ".", ".."):
            trailing = False
    p = "/" + "/".join(out)
    if out and trailing:
        p += "/"
    return p
