"""Port 80 beside HTTPS in `--http redirect` mode: every request gets a 308 to its https URL.

Theory of operation. `RedirectConnection` is the HTTPConnection (same framing,
pipelining, limits and error replies: a malformed request still gets its
prebuilt 400/414/431...) with one difference: a well-formed request is
answered by `308 Permanent Redirect` (RFC 9110 §15.4.9: the method and body
are kept, unlike 301) with `Location: https://HOST[:PORT]TARGET`. HOST is
the request's Host field (RFC 9112 §3.2) when it is a plain host name or
address, else the configured default name; TARGET the request-target as
sent (origin-form; the path of an absolute-form target). The 308 is built
per request (dynamic: the Host varies), about 200 bytes; it is never put in
the site's shared reply cache, which maps raw requests to the site's own
replies (each RedirectConnection has a private, unused cache instead).
"""
import re

from .conn import _CONN, HTTPConnection, Reply

__all__ = ["RedirectConnection", "redirect_factory"]

_HOST = re.compile(rb"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")
_ABS = re.compile(rb"^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]*")


class RedirectConnection(HTTPConnection):
    def __init__(self, site, blob, default_host: bytes, https_port: int = 443, limits=None):
        super().__init__(site, blob, limits)
        self._cache = {}                    # not the site's cache (see the theory of operation)
        self.default_host = default_host
        self.port_suffix = b"" if https_port == 443 else b":%d" % https_port

    def _reply_for(self, req, force_close=False):
        close = force_close or not req.keep_alive
        hv = req.fields.get(b"host")
        host = hv[0].strip() if hv and len(hv) == 1 else b""
        if not host or not _HOST.match(host):
            host = self.default_host
        elif host[:1] == b"[":
            host = host[:host.index(b"]") + 1]
        else:
            host = host.split(b":", 1)[0]
        target = req.target
        if target[:1] != b"/":
            m = _ABS.match(target)
            target = (target[m.end():] if m else b"") or b"/"
            if target[:1] != b"/":
                target = b"/" + target
        hdr = (b"HTTP/1.1 308 Permanent Redirect\r\nDate: %s\r\nConnection: %s\r\nServer: %s\r\n"
               b"Location: https://%s%s%s\r\nContent-Length: 0\r\n\r\n"
               % (self._date, _CONN[close], self.site.server, host, self.port_suffix, target))
        return Reply(308, close, None, hdr, self.blob[0:0])


def redirect_factory(site, blob, default_host: str, https_port: int = 443):
    h = default_host.encode("ascii", "replace")
    return lambda: RedirectConnection(site, blob, h, https_port)
