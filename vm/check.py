"""What `python -m vm test` checks against a running appliance.

Every URL of the manifest is fetched with Python's http.client (a fresh
connection each, plus all of them again over one keep-alive connection)
and its body compared byte for byte with the site: with the sha256 the
manifest recorded for the site's file at build time, and with the file
itself when the site folder is given. Then HEAD (same headers, no body)
and a 404 for a path that does not exist. curl fetches run where given
(tests run curl inside a namespace). Each check is a `Result`; the caller
decides how to report.
"""
from __future__ import annotations

import hashlib
import http.client
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .image import Image

MISSING = "/haboob-no-such-page-7f3a"


@dataclass
class Result:
    name: str
    ok: bool
    detail: str = ""


def expected(image: Image, url: str, site: Path | None) -> tuple[str, bytes | None]:
    """(sha256 the body must have, the site file's bytes if readable)."""
    u = image.urls[url]
    want = u["sha256"]
    rec = image.manifest.get("site_files", {}).get(u.get("file"))
    if rec:
        want = rec["sha256"]                 # what the site held at build time
    data = None
    if site and u.get("file"):
        p = Path(site) / u["file"]
        if p.is_file():
            data = p.read_bytes()
    return want, data


def _get(host: str, port: int, method: str, url: str, conn=None, timeout: float = 30):
    own = conn is None
    conn = conn or http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, url, headers={"Accept-Encoding": "identity"})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), body
    finally:
        if own:
            conn.close()


def fetch_all(image: Image, host: str, port: int, site: Path | None = None) -> list[Result]:
    results = []
    for url in sorted(image.urls):
        want, data = expected(image, url, site)
        try:
            status, headers, body = _get(host, port, "GET", url)
        except (OSError, http.client.HTTPException) as e:
            results.append(Result(f"GET {url}", False, f"{type(e).__name__}: {e}"))
            continue
        got = hashlib.sha256(body).hexdigest()
        ok = status == 200 and got == want and (data is None or body == data)
        results.append(Result(f"GET {url}", ok, f"status {status}, {len(body)} bytes"
                              + ("" if ok else f", sha256 {got[:12]} != {want[:12]}")))
    # all again over one keep-alive connection
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        bad = []
        for url in sorted(image.urls):
            want, _ = expected(image, url, site)
            status, _h, body = _get(host, port, "GET", url, conn=conn)
            if status != 200 or hashlib.sha256(body).hexdigest() != want:
                bad.append(url)
        results.append(Result("keep-alive: every URL on one connection", not bad,
                              f"{len(image.urls)} requests" + (f", wrong: {bad}" if bad else "")))
    except (OSError, http.client.HTTPException) as e:
        results.append(Result("keep-alive: every URL on one connection", False, f"{type(e).__name__}: {e}"))
    finally:
        conn.close()
    results += head_and_404(image, host, port)
    return results


def head_and_404(image: Image, host: str, port: int) -> list[Result]:
    out = []
    url = "/" if "/" in image.urls else sorted(image.urls)[0]
    try:
        gs, gh, gbody = _get(host, port, "GET", url)
        hs, hh, hbody = _get(host, port, "HEAD", url)
        ok = (hs == 200 and hbody == b"" and hh.get("content-length") == str(len(gbody))
              and hh.get("etag") == gh.get("etag") and hh.get("content-type") == gh.get("content-type"))
        out.append(Result(f"HEAD {url}", ok, f"status {hs}, content-length {hh.get('content-length')}"))
    except (OSError, http.client.HTTPException) as e:
        out.append(Result(f"HEAD {url}", False, f"{type(e).__name__}: {e}"))
    try:
        s, _h, body = _get(host, port, "GET", MISSING)
        out.append(Result(f"GET {MISSING} -> 404", s == 404 and len(body) > 0, f"status {s}"))
    except (OSError, http.client.HTTPException) as e:
        out.append(Result(f"GET {MISSING} -> 404", False, f"{type(e).__name__}: {e}"))
    return out


def curl_all(image: Image, base: str, site: Path | None = None, prefix: list[str] | None = None) -> list[Result]:
    """Every URL with curl (run under prefix, e.g. inside a namespace), compared byte for byte."""
    out = []
    for url in sorted(image.urls):
        want, data = expected(image, url, site)
        proc = subprocess.run(list(prefix or []) + ["curl", "-gsS", "--fail", "--max-time", "30",
                                                     "-H", "Accept-Encoding: identity", base + url],
                              capture_output=True)
        got = hashlib.sha256(proc.stdout).hexdigest()
        ok = proc.returncode == 0 and got == want and (data is None or proc.stdout == data)
        out.append(Result(f"curl {url}", ok, f"exit {proc.returncode}, {len(proc.stdout)} bytes"
                          + ("" if ok else f" {proc.stderr.decode(errors='replace').strip()}")))
    return out


def ping(ip: str, prefix: list[str] | None = None, count: int = 3) -> Result:
    proc = subprocess.run(list(prefix or []) + ["ping", "-c", str(count), "-i", "0.2", "-W", "5", ip],
                          capture_output=True, text=True)
    summary = [l for l in proc.stdout.splitlines() if "received" in l]
    return Result(f"ping {ip}", proc.returncode == 0, summary[0] if summary else proc.stderr.strip())
