"""Prometheus metrics and the health check, answered on the metrics port by the same stack.

Theory of operation. A connection to the metrics port gets a `MetricsHTTP`
instead of the site's HTTPConnection (the Stack's side handler, see
appliance/obs/__init__.py, sets `Conn.http`); it is sans-IO like the site's
(`receive(bytes) -> [Reply]`, `eof()`, `closed`, `now(date)`), reads one
request head (at most 4 KiB) and answers with a dynamic Reply (header + body,
built here, never in the store), always closing:

    GET /metrics   200, text format 0.0.4 (text/plain; version=0.0.4)
    GET /healthz   200 "ok" while serving, 503 "draining" once SIGTERM came
    other paths    404; other methods 405; a head too long or malformed 400

The text is rendered from the live counters at most once per `CACHE_S`
(1 s, Prometheus scrapes every 15 s or so), so a flood of scrapes costs TCP
work and a cached bytes object, never one render each: port 80 keeps its
share of the loop.

What is exported (`render`): every counter the stack keeps as
`haboob_<name>_total`, except drops, which are one family with the reason as
a label (`haboob_drops_total{reason="tcp_bad_checksum"}`), and the response
accounting of the observer (`haboob_http_responses_total{code="2xx"}`,
`haboob_http_response_bytes_total`); gauges for connections by TCP state,
open connections, TIME-WAIT entries, SYN-cookie mode and draining; the
histogram of time to last byte (`haboob_http_response_seconds`, from the
request's arrival to the ACK of the response's last byte); `haboob_build_info`
(store SHA-256, site file count, version, kernel release) with value 1.
With several workers each answers for itself (label `worker`): a scrape
lands on the worker its flow hashes to.
"""
from __future__ import annotations

import re

__all__ = ["MetricsHTTP", "Histogram", "render", "BUCKETS"]

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CACHE_S = 1.0
MAX_HEAD = 4096
_BAD_NAME = re.compile(r"[^a-zA-Z0-9_]")
_GAUGES = {"tcp_conns_open"}                     # Counters' one gauge (counters.py)
_OWN = ("http_responses_", "http_response_bytes")  # rendered as labelled families below
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            503: b"Service Unavailable"}


class Histogram:
    """Cumulative-on-render histogram: per-bucket counts, sum and count."""

    def __init__(self, buckets=BUCKETS):
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        i = 0
        b = self.bounds
        while i < len(b) and v > b[i]:
            i += 1
        self.counts[i] += 1
        self.sum += v
        self.count += 1


def _label(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _num(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(int(v))


def render(counters: dict, gauges: dict, states: dict, hist: Histogram, build: dict, worker=None) -> str:
    """The exposition text (format 0.0.4) of counters, gauges, connection states, histogram, build info."""
    wl = f'worker="{worker}"' if worker is not None else ""
    w1 = "{" + wl + "}" if wl else ""
    wc = wl + "," if wl else ""
    out = []
    add = out.append
    drops = sorted((k[5:], v) for k, v in counters.items() if k.startswith("drop_"))
    add("# HELP haboob_drops_total Frames and segments dropped, by reason.")
    add("# TYPE haboob_drops_total counter")
    for reason, v in drops:
        add(f'haboob_drops_total{{{wc}reason="{_label(reason)}"}} {_num(v)}')
    add("# HELP haboob_http_responses_total Responses finished (last byte acknowledged or connection gone), "
        "by status class.")
    add("# TYPE haboob_http_responses_total counter")
    for cls in ("1xx", "2xx", "3xx", "4xx", "5xx"):
        add(f'haboob_http_responses_total{{{wc}code="{cls}"}} {_num(counters.get("http_responses_" + cls, 0))}')
    add("# HELP haboob_http_response_bytes_total Response bytes acknowledged by clients (header + body).")
    add("# TYPE haboob_http_response_bytes_total counter")
    add(f"haboob_http_response_bytes_total{w1} {_num(counters.get('http_response_bytes', 0))}")
    for k in sorted(counters):
        if k.startswith("drop_") or k.startswith(_OWN):
            continue
        name = "haboob_" + _BAD_NAME.sub("_", k)
        v = counters[k]
        if k in _GAUGES:
            add(f"# TYPE {name} gauge")
            add(f"{name}{w1} {_num(v)}")
        else:
            add(f"# TYPE {name}_total counter")
            add(f"{name}_total{w1} {_num(v)}")
    add("# HELP haboob_tcp_connections Connections in the table by TCP state.")
    add("# TYPE haboob_tcp_connections gauge")
    for s in sorted(states):
        add(f'haboob_tcp_connections{{{wc}state="{_label(s)}"}} {states[s]}')
    for k in sorted(gauges):
        add(f"# TYPE haboob_{k} gauge")
        add(f"haboob_{k}{w1} {_num(gauges[k])}")
    add("# HELP haboob_http_response_seconds Time from a request's arrival to the ACK of its response's "
        "last byte.")
    add("# TYPE haboob_http_response_seconds histogram")
    acc = 0
    for b, n in zip(hist.bounds, hist.counts):
        acc += n
        add(f'haboob_http_response_seconds_bucket{{{wc}le="{b}"}} {acc}')
    acc += hist.counts[-1]
    add(f'haboob_http_response_seconds_bucket{{{wc}le="+Inf"}} {acc}')
    add(f"haboob_http_response_seconds_sum{w1} {hist.sum!r}")
    add(f"haboob_http_response_seconds_count{w1} {hist.count}")
    add("# HELP haboob_build_info What this appliance serves and runs on.")
    add("# TYPE haboob_build_info gauge")
    labels = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(build.items()))
    add(f"haboob_build_info{{{wc}{labels}}} 1")
    return "\n".join(out) + "\n"


class MetricsHTTP:
    """One connection on the metrics port (sans-IO, the HTTPConnection interface)."""

    __slots__ = ("obs", "buf", "closed", "date")

    def __init__(self, obs):
        self.obs = obs
        self.buf = b""
        self.closed = False
        self.date = None

    def now(self, date: bytes) -> None:
        self.date = date

    def eof(self):
        if self.closed or not self.buf:
            self.closed = True
            return []
        return [self._reply(400, b"bad request\n")]

    def receive(self, data: bytes):
        from ..http.conn import Reply  # noqa: F401  (imported lazily: the control path)
        if self.closed:
            return []
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            end = self.buf.find(b"\n\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                return [self._reply(400, b"request head too long\n")]
            return []
        line = self.buf[:self.buf.find(b"\n")].rstrip(b"\r").lstrip()
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return [self._reply(400, b"bad request\n")]
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        head = method == b"HEAD"
        if method not in (b"GET", b"HEAD"):
            return [self._reply(405, b"GET or HEAD\n", extra=b"Allow: GET, HEAD\r\n")]
        obs = self.obs
        if target == b"/metrics":
            obs.counters["metrics_scrapes"] += 1
            return [self._reply(200, obs.metrics_text(), b"text/plain; version=0.0.4; charset=utf-8", head=head)]
        if target == b"/healthz":
            obs.counters["metrics_health_checks"] += 1
            if obs.draining:
                return [self._reply(503, b"draining\n", head=head)]
            return [self._reply(200, b"ok\n", head=head)]
        return [self._reply(404, b"not found: /metrics, /healthz\n", head=head)]

    def _reply(self, status: int, body: bytes, ctype: bytes = b"text/plain; charset=utf-8", head=False,
               extra=b""):
        from ..http.conn import Reply
        self.closed = True
        self.buf = b""
        h = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])]
        if self.date is not None:
            h.append(b"Date: " + self.date + b"\r\n")
        h.append(b"Server: haboob\r\nContent-Type: " + ctype + b"\r\nContent-Length: %d\r\n" % len(body))
        h.append(b"Cache-Control: no-store\r\n" + extra + b"Connection: close\r\n\r\n")
        return Reply(status, True, header=b"".join(h), body=None if head else memoryview(body))
