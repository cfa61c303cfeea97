"""`python -m vm stat`: live rate, bandwidth, connections and errors of a running appliance.

Theory of operation: scrape the appliance's /metrics (appliance/obs) every
`interval` seconds and print one line of differences: responses/s, MB/s of
response bytes acknowledged, open connections, 4xx+5xx/s, drops/s. The
target is a metrics URL or an image folder that `vm boot` is running (it
writes the URL to FOLDER/run.json while the guest runs; with a tap network
the URL is only reachable inside the namespace, so curl runs there). The
text format is parsed here (a sample per line: name, optional labels, value),
which is all this needs.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

__all__ = ["StatError", "resolve", "parse", "summary", "run"]

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')


class StatError(Exception):
    pass


def resolve(target: str):
    """(metrics URL, namespace name or None) for an image folder or a URL."""
    if target.startswith(("http://", "https://")):
        return target, None
    run = Path(target) / "run.json"
    if not Path(target).is_dir():
        raise StatError(f"{target}: neither a metrics URL nor an image folder")
    try:
        info = json.loads(run.read_text())
    except (OSError, ValueError):
        raise StatError(f"{target}: no running `vm boot` with metrics ({run} is missing; "
                        f"boot it with: python -m vm boot {target})") from None
    return info["metrics"], info.get("ns")


def parse(text: str) -> dict:
    """{(name, labels text): value} of every sample."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out[(m.group(1), m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


def _sum(s: dict, name: str, label: str = "") -> float:
    return sum(v for (n, lab), v in s.items() if n == name and label in lab)


def summary(prev: dict, cur: dict, dt: float) -> str:
    def rate(name, label=""):
        return (_sum(cur, name, label) - _sum(prev, name, label)) / dt
    errors = rate("haboob_http_responses_total", 'code="4xx"') + rate("haboob_http_responses_total", 'code="5xx"')
    return (f"{rate('haboob_http_responses_total'):9.1f} req/s  "
            f"{rate('haboob_http_response_bytes_total') / 1e6:8.2f} MB/s  "
            f"{_sum(cur, 'haboob_tcp_conns_open'):6.0f} conns  "
            f"{_sum(cur, 'haboob_tcp_time_wait_entries'):6.0f} time-wait  "
            f"{errors:7.1f} err/s  {rate('haboob_drops_total'):7.1f} drops/s"
            + ("  DRAINING" if _sum(cur, "haboob_draining") else ""))


def fetch(url: str, ns: str | None, timeout: float = 5.0) -> str:
    try:
        if ns:
            r = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sf", "--max-time", str(timeout), url],
                               capture_output=True, text=True, timeout=timeout + 5)
            if r.returncode:
                raise StatError(f"{url}: curl exit {r.returncode} in namespace {ns}")
            return r.stdout
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode()
    except (OSError, subprocess.SubprocessError) as e:
        raise StatError(f"{url}: {e}") from None


def run(url: str, ns, count: int, interval: float, echo) -> None:
    prev = parse(fetch(url, ns))
    t = time.monotonic()
    n = 0
    while not count or n < count:
        time.sleep(max(0.0, t + interval - time.monotonic()))
        cur = parse(fetch(url, ns))
        now = time.monotonic()
        echo(time.strftime("%H:%M:%S ") + summary(prev, cur, now - t))
        prev, t = cur, now
        n += 1
