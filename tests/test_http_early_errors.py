"""Invalid requests are answered at once (issue 10 item 4): a 400 at the first byte
no valid request-line can have (RFC 9112 §3: method token, SP, request-target, SP,
HTTP-version), and a 400 when the client half-closes after an incomplete request.
Fed whole and byte by byte; the prefixes of valid requests never get an early answer.
The oracle for "impossible" is a plain state machine written here, not the parser's
regular expression."""
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from appliance.content.store import Store
from appliance.http import HTTPConnection, Limits, reply_bytes

from .content_support import DATE, example_store_path, httpclient_parse

TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_STORE = {}


def store():
    if "s" not in _STORE:
        _STORE["s"] = Store.open(example_store_path())
    return _STORE["s"]


def conn():
    s = store()
    c = HTTPConnection(s.site, s.blob)
    c.now(DATE)
    return c


def first_impossible(data: bytes):
    """Index of the first byte of `data` that no valid request can have there
    (after empty lines, RFC 9112 §2.2), or None while the request-line can
    still become valid or is complete."""
    i = 0
    while i < len(data) and data[i] in b"\r\n":
        i += 1
    state = "method"
    n = 0                                   # bytes of the current part
    for j in range(i, len(data)):
        c = data[j]
        if state == "method":
            if c in TCHAR:
                n += 1
                continue
            if c == 0x20 and n:
                state, n = "target", 0
                continue
            return j
        if state == "target":
            if 0x21 <= c <= 0x7E:
                n += 1
                continue
            if c == 0x20 and n:
                state, n = "version", 0
                continue
            return j
        if state == "version":
            want = b"HTTP/"[n] if n < 5 else None
            if n < 5 and c == want or n in (5, 7) and 0x30 <= c <= 0x39 or n == 6 and c == 0x2E:
                n += 1
                if n == 8:
                    state = "eol"
                continue
            return j
        if state == "eol":
            if c == 0x0A:
                return None                 # the request-line is complete and valid
            if c == 0x0D:
                state = "lf"
                continue
            return j
        if state == "lf":
            return None if c == 0x0A else j
    return None


def feed(data: bytes, step: int):
    """(index of the byte whose arrival produced the first reply or None, replies, conn)."""
    c = conn()
    for i in range(0, len(data), step):
        replies = c.receive(data[i:i + step])
        if replies:
            return i + len(data[i:i + step]) - 1, replies, c
    return None, [], c


def wire(replies):
    return b"".join(reply_bytes(r, store().blob, DATE) for r in replies)


def check_400(replies, c, head=False):
    """One 400, the prebuilt error page (GET or HEAD form), closing; its wire bytes."""
    assert [r.status for r in replies] == [400] and replies[0].close and c.closed
    assert replies[0].response is store().site.errors[400][1 if head else 0]
    data = wire(replies)
    status, h, body = httpclient_parse(data, method="HEAD" if head else "GET")
    assert status == 400 and h["connection"] == "close" and h["date"] == DATE.decode()
    assert (body == b"") == head
    return data


TLS_CLIENT_HELLO = bytes.fromhex("160301020001000000fc0303") + bytes(range(32)) + b"\x20" + bytes(32)


@pytest.mark.parametrize("data,bad", [
    (TLS_CLIENT_HELLO, 0),                          # TLS on port 80
    (b"\x00\x01\x02garbage", 0),
    (b"SSH-2.0-OpenSSH_9.2\r\n", 19),               # all token characters: the CR is the byte
    (b"GET  / HTTP/1.1\r\n", 4),                    # two spaces
    (b" GET / HTTP/1.1\r\n", 0),                    # leading whitespace is not an empty line
    (b"GET /\r\nHost: t\r\n\r\n", 5),               # HTTP/0.9 form
    (b"GET /a b HTTP/1.1\r\n", 7),
    (b"GET / http/1.1\r\n", 6),                     # HTTP-name is case-sensitive (§2.3)
    (b"GET / HTTPS/1.1\r\n", 10),
    (b"GET / HTTP/1.10\r\n", 14),
    (b"GET / HTTP/1.1 \r\n", 14),
    (b"GET / HTTP/1.1\r\r\n", 15),
    (b"GET /\x7f HTTP/1.1\r\n", 5),
    (b"\r\n\r\n\nG\x00T / HTTP/1.1\r\n", 6),        # after empty lines (§2.2)
    (b"GET\t/ HTTP/1.1\r\n", 3),
])
@pytest.mark.parametrize("step", [1, 0])
def test_400_at_the_first_impossible_byte(data, bad, step):
    assert first_impossible(data) == bad
    at, replies, c = feed(data, step or len(data))
    assert at == (bad if step else len(data) - 1)
    check_400(replies, c)


def test_head_gets_the_head_form_of_the_early_400():
    at, replies, c = feed(b"HEAD /\x01", 1)
    assert at == 6
    check_400(replies, c, head=True)


def test_empty_lines_then_a_valid_request_are_not_an_error():
    """RFC 9112 §2.2: at least one empty line before the request-line is ignored."""
    raw = b"\r\n\n\r\nGET /about.html HTTP/1.1\r\nHost: t\r\n\r\n"
    for step in (1, len(raw)):
        at, replies, c = feed(raw, step)
        assert at == len(raw) - 1 and [r.status for r in replies] == [200] and not c.closed


def test_bad_version_number_still_waits_for_the_head_then_505():
    """A well-formed HTTP-version of another major version is not a malformed line:
    505 once the head is complete, not an early 400."""
    raw = b"GET / HTTP/2.0\r\nHost: t\r\n\r\n"
    at, replies, c = feed(raw, 1)
    assert at == len(raw) - 1 and [r.status for r in replies] == [505]


def test_status_does_not_depend_on_segmentation():
    """A bad method byte wins over a bad version also when the head is complete (the
    byte-by-byte client cannot have seen the version yet), and over the size limits."""
    for raw in (b"G(T / HTTP/2.0\r\nHost: t\r\n\r\n", b"G(T / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 20000 + b"\r\n\r\n"):
        for step in (1, 7, len(raw)):
            at, replies, c = feed(raw, step)
            assert [r.status for r in replies] == [400], (raw[:20], step)


def test_long_valid_line_is_still_414_not_400():
    lim = Limits(max_request_line=64)
    s = store()
    c = HTTPConnection(s.site, s.blob, lim)
    assert [r.status for r in c.receive(b"GET /" + b"a" * 100)] == [414]
    c = HTTPConnection(s.site, s.blob, lim)
    assert [r.status for r in c.receive(b"GET /" + b"a" * 50 + b"\x00")] == [400]


def test_garbage_after_a_pipelined_request_is_answered_after_its_reply():
    raw = b"GET /about.html HTTP/1.1\r\nHost: t\r\n\r\n\x16\x03\x01"
    c = conn()
    replies = c.receive(raw)
    assert [r.status for r in replies] == [200, 400] and c.closed


# -- half-close (eof) -----------------------------------------------------------------

@pytest.mark.parametrize("partial", [
    b"G", b"GET / HTTP/1.1", b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: t\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc",                          # body incomplete
    b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",       # no last chunk
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET /x",                                              # after a whole one
])
@pytest.mark.parametrize("step", [1, 0])
def test_half_close_after_an_incomplete_request_is_400(partial, step):
    c = conn()
    before = []
    step = step or len(partial)
    for i in range(0, len(partial), step):
        before += c.receive(partial[i:i + step])
    assert all(r.status == 200 for r in before) and not c.closed
    replies = c.eof()
    check_400(replies, c)
    assert c.eof() == [] and c.receive(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n") == []


def test_half_close_of_a_partial_head_request_gets_the_head_form():
    c = conn()
    assert c.receive(b"HEAD /about.html HTTP/1.1\r\n") == []
    check_400(c.eof(), c, head=True)


@pytest.mark.parametrize("sent", [b"", b"\r\n", b"\r\n\r\n", b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
                                  b"GET / HTTP/1.1\r\nHost: t\r\n\r\n\r\n"])
def test_half_close_between_requests_is_no_error(sent):
    c = conn()
    c.receive(sent)
    assert c.eof() == [] and c.closed


# -- properties ------------------------------------------------------------------------

_tokens = st.binary(min_size=1, max_size=8).map(lambda b: bytes(TCHAR[x % len(TCHAR)] for x in b))
_vchars = st.binary(max_size=24).map(lambda b: bytes(0x21 + x % 94 for x in b))


@st.composite
def valid_requests(draw):
    """Requests that are valid at least up to the end of their head: any method token,
    any visible target, HTTP/D.D, CRLF or LF, well-formed fields, empty lines before."""
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    line = (draw(_tokens) + b" " + draw(st.sampled_from([b"/", b"/about.html", b"http://t/x"])) + draw(_vchars)
            + b" HTTP/" + draw(st.sampled_from(b"0123456789")).to_bytes(1, "big") + b"."
            + draw(st.sampled_from(b"0123456789")).to_bytes(1, "big"))
    fields = [(b"Host", b"t")] + draw(st.lists(st.tuples(_tokens, _vchars), max_size=4))
    head = line + eol + b"".join(k + b": " + v + eol for k, v in draw(st.permutations(fields))) + eol
    return draw(st.sampled_from([b"", b"\r\n", b"\n\n"])) + head


@given(valid_requests(), st.integers(1, 9))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_no_early_answer_for_any_prefix_of_a_valid_request(raw, step):
    assert first_impossible(raw) is None
    for k in range(len(raw)):                       # every prefix, whole
        c = conn()
        assert c.receive(raw[:k]) == [] and not c.closed, raw[:k]
    at, replies, c = feed(raw, step)                # and in pieces: the answer comes with the last byte
    assert at == len(raw) - 1 and len(replies) == 1


_VALID = (b"GET /about.html HTTP/1.1\r\n", b"HEAD / HTTP/1.0\n", b"OPTIONS http://t/ HTTP/1.1\r\n")


@st.composite
def broken_lines(draw):
    """Random binary, or a valid request-line with one byte replaced or inserted."""
    if draw(st.booleans()):
        return draw(st.binary(min_size=1, max_size=64))
    line = bytearray(draw(st.sampled_from(_VALID)))
    i = draw(st.integers(0, len(line) - 1))
    b = draw(st.integers(0, 255))
    if draw(st.booleans()):
        line[i] = b
    else:
        line.insert(i, b)
    return draw(st.sampled_from([b"", b"\r\n"])) + bytes(line) + draw(st.binary(max_size=16))


@given(broken_lines(), st.integers(1, 5))
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_binary_gets_400_at_the_byte_that_makes_it_impossible(data, step):
    bad = first_impossible(data)
    assume(bad is not None)
    at, replies, c = feed(data, 1)                  # byte by byte: exactly at that byte
    assert at == bad and [r.status for r in replies] == [400] and c.closed
    at, replies, c = feed(data, step)               # in pieces: with the piece holding it
    assert at == min(len(data), (bad // step + 1) * step) - 1 and [r.status for r in replies] == [400]
    c = conn()                                      # whole
    assert [r.status for r in c.receive(data)] == [400]
