"""Access log: formatting (Combined Log Format or JSON) and sinks (console, syslog over UDP).

Theory of operation. The observer (appliance/obs/__init__.py) hands over
finished responses as `Entry` tuples, a batch per loop iteration; `AccessLog`
formats the sampled ones (1 in `sample`) and writes the whole batch to its
sink at once, never one write per request. Everything taken from the client
(method, target, protocol, Referer, User-Agent) is escaped byte by byte:
control bytes, bytes >= 0x7f, `"` and `\\` become `\\xHH` (as nginx does), so
a target cannot forge a line or a field.

Combined Log Format, with the fields CLF lacks appended as key=value:

    198.18.0.2 - - [01/Dec/2026:10:00:00 +0000] "GET / HTTP/1.1" 200 1234 "-" "curl/7.88.1" \
port=40112 bytes=1501 ttlb=0.000412 variant=identity cached=1 tls=0

`%b` (here 1234) is the body bytes acknowledged by the client, `bytes` the
whole response as acknowledged (header + body); `ttlb` is the time from the
request's arrival to the acknowledgement of the response's last byte, as seen
by the loop iteration that processed that ACK. The JSON form has the same
fields by name, one object per line.

Sinks never block serving. `ConsoleSink` writes to its own non-blocking open
file description of stdout (a full pipe or a slow serial console drops lines,
counted in `log_lines_dropped`). `SyslogSink` sends one UDP datagram per line
(RFC 5426) in RFC 5424 form (RFC 3164 framing as an option) through the stack
itself: the appliance has no kernel IP address. Its datagrams go out through
the stack's UDP (`Stack.udp_send`, udp.py); the collector's MAC is
resolved through the stack's ARP (or the gateway's, off-link). Lines wait
for ARP in a bounded queue; a collector that is down costs nothing (UDP), so
lines are only dropped (and counted) when ARP gets no answer.
"""
from __future__ import annotations

import ipaddress
import json
import os
import time

__all__ = ["AccessLog", "ConsoleSink", "SyslogSink", "escape", "parse_destination"]

_ESC = {i: f"\\x{i:02x}" for i in range(256) if i < 0x20 or i >= 0x7f or i in (0x22, 0x5c)}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def escape(b) -> str:
    """Client bytes as printable ASCII: control bytes, non-ASCII, `"` and `\\` as \\xHH."""
    if b is None:
        return "-"
    return bytes(b).decode("latin-1").translate(_ESC)


def parse_destination(spec: str):
    """'off' | 'console' | 'syslog://ADDR[:PORT]' -> ('off'|'console'|'syslog', (addr, port) or None).
    ValueError with a clear message otherwise."""
    if spec in ("off", "console"):
        return spec, None
    if spec.startswith("syslog://"):
        rest = spec[len("syslog://"):]
        host, _, port = rest.partition(":")
        try:
            addr = str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"access log {spec!r}: {host!r} is not an IPv4 address") from None
        if port:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"access log {spec!r}: port {port!r} is not 1..65535")
            return "syslog", (addr, int(port))
        return "syslog", (addr, 514)
    raise ValueError(f"access log {spec!r}: want off, console or syslog://ADDR[:PORT]")


class AccessLog:
    """Formats batches of entries and writes them to `sink` (once per batch)."""

    def __init__(self, sink, fmt: str = "combined", sample: int = 1, counters=None):
        if fmt not in ("combined", "json"):
            raise ValueError(f"log format {fmt!r}: want combined or json")
        if sample < 1:
            raise ValueError(f"log sample {sample}: want 1 or more (1 = every response)")
        self.sink = sink
        self.json = fmt == "json"
        self.sample = sample
        self.counters = counters if counters is not None else {}
        self._n = 0
        self._sec = -1
        self._clf = ""
        self._iso = ""

    def _times(self, t: float):
        s = int(t)
        if s != self._sec:
            self._sec = s
            g = time.gmtime(s)
            self._clf = (f"{g.tm_mday:02d}/{_MONTHS[g.tm_mon - 1]}/{g.tm_year}:"
                         f"{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} +0000")
            self._iso = time.strftime("%Y-%m-%dT%H:%M:%S", g)
        return self._clf, self._iso

    def write(self, entries, now: float, wall: float) -> None:
        """`entries`: (t_arrival, ip str, port, method, target, proto, status, body_bytes,
        bytes, ttlb, variant, cached, tls, referer, user_agent) with client fields as bytes."""
        lines = []
        n = self._n
        k = self.sample
        for e in entries:
            n += 1
            if n % k:
                continue
            (t, ip, port, method, target, proto, status, body, total, ttlb, variant, cached, tls,
             ref, ua) = e
            w = wall - (now - t)
            clf, iso = self._times(w)
            if self.json:
                lines.append(json.dumps({
                    "time": f"{iso}.{int((w % 1) * 1e6):06d}Z", "client": ip, "port": port,
                    "method": escape(method), "target": escape(target), "protocol": escape(proto),
                    "status": status, "body_bytes": body, "bytes": total, "ttlb": round(ttlb, 6),
                    "variant": variant, "cached": cached, "tls": tls,
                    "referer": escape(ref), "user_agent": escape(ua)}, separators=(",", ":")))
            else:
                req = "-" if method is None else f"{escape(method)} {escape(target)} {escape(proto)}"
                lines.append(f'{ip} - - [{clf}] "{req}" {status} {body or "-"} "{escape(ref)}" '
                             f'"{escape(ua)}" port={port} bytes={total} ttlb={ttlb:.6f} '
                             f'variant={variant} cached={int(cached)} tls={int(tls)}')
        self._n = n % k
        if lines:
            self.counters["log_lines"] += len(lines)
            self.sink.write(lines, now, wall)


class ConsoleSink:
    """Lines to stdout through a non-blocking file description of its own."""

    def __init__(self, counters, fd: int = 1):
        self.counters = counters
        self.partial = False
        try:      # a new open file description: O_NONBLOCK here does not touch fd 1's users
            self.fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
            self.own = True
        except OSError:
            self.fd, self.own = fd, False

    def write(self, lines, now, wall) -> None:
        data = ("\n" if self.partial else "") + "\n".join(lines) + "\n"
        b = data.encode("ascii", "backslashreplace")
        try:
            n = os.write(self.fd, b)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            n = 0
        if n < len(b):
            rest = b[n:]
            self.partial = n > 0 and not b[:n].endswith(b"\n")
            self.counters["log_lines_dropped"] += rest.count(b"\n")
        else:
            self.partial = False

    def close(self) -> None:
        if self.own:
            os.close(self.fd)
            self.own = False




class SyslogSink:
    """Lines as syslog datagrams (RFC 5424, or RFC 3164 with `bsd=True`) to a collector,
    sent through `stack` (its txq, its ARP cache and gateway)."""

    PRI = 16 * 8 + 6          # facility local0, severity informational (RFC 5424 §6.2.1)
    SPORT = 51400             # our source port: any; the collector does not answer
    MAX_WAIT = 1024           # lines held while the collector's MAC is being resolved

    def __init__(self, stack, addr: str, port: int = 514, hostname: str = "haboob", bsd: bool = False):
        from ..stack.wire import ip_bytes
        self.stack = stack
        self.dst = ip_bytes(addr)
        self.port = port
        self.host = "".join(ch for ch in hostname if 33 <= ord(ch) < 127)[:255] or "-"
        self.bsd = bsd
        self.pid = str(os.getpid())
        self.wait = []
        self.arp_at = 0.0
        self.max_payload = stack.cfg.mtu - 28

    def _mac(self, now):
        st = self.stack
        if st.on_link(self.dst):
            mac = st.arp.lookup(self.dst, now)
            if mac is None and now >= self.arp_at:
                from ..stack.arp import OP_REQUEST
                from ..stack.ethernet import BROADCAST
                st._arp_out(OP_REQUEST, BROADCAST, self.dst, b"\0" * 6)
                st.counters["log_syslog_arp_requests"] += 1
                self.arp_at = now + 1.0
            return mac
        return st.gateway_mac

    def write(self, lines, now, wall) -> None:
        cnt = self.stack.counters
        wait = self.wait
        if self.bsd:      # RFC 3164 §4.1: <PRI>Mmm dd hh:mm:ss HOST TAG: MSG
            g = time.gmtime(wall)
            head = f"<{self.PRI}>{_MONTHS[g.tm_mon - 1]} {g.tm_mday:2d} {g.tm_hour:02d}:{g.tm_min:02d}:" \
                   f"{g.tm_sec:02d} {self.host} haboob[{self.pid}]: "
        else:             # RFC 5424 §6: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int((wall % 1) * 1e6):06d}Z"
            head = f"<{self.PRI}>1 {ts} {self.host} haboob {self.pid} access - "
        for line in lines:
            wait.append((head + line).encode("ascii", "backslashreplace")[:self.max_payload])
        if len(wait) > self.MAX_WAIT:
            cnt["log_lines_dropped"] += len(wait) - self.MAX_WAIT
            del wait[:len(wait) - self.MAX_WAIT]
        self.send(now)

    def send(self, now) -> None:
        if not self.wait:
            return
        mac = self._mac(now)
        if mac is None:
            return
        st = self.stack
        for p in self.wait:
            st.udp_send(mac, self.dst, self.SPORT, self.port, p)        # udp.py (RFC 768)
        st.counters["log_syslog_datagrams"] += len(self.wait)
        self.wait.clear()

    def close(self) -> None:
        pass
