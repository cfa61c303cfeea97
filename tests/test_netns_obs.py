"""Access log, /metrics, /healthz and drain of `python -m appliance serve`, from real clients.

The server is the CLI in its own namespace (tests/test_netns_serve.py's
set-up); curl, wget and Python sockets in the peer namespace. The metrics
text is read with prometheus_client's parser; log lines are parsed back
field by field; a UDP socket in the client namespace is the syslog collector.
"""
import contextlib
import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vm import netns

from .test_netns_serve import ROOT, SITE, mirror, site_files, store  # noqa: F401

pytestmark = pytest.mark.netns

CLF = re.compile(r'^(?P<ip>[\d.]+) - - \[(?P<time>[^\]]+)\] "(?P<req>[^"]*)" (?P<status>\d{3}) (?P<body>\d+|-) '
                 r'"(?P<ref>[^"]*)" "(?P<ua>[^"]*)" port=(?P<port>\d+) bytes=(?P<bytes>\d+) '
                 r'ttlb=(?P<ttlb>[\d.]+) variant=(?P<variant>\S+) cached=(?P<cached>[01]) tls=(?P<tls>[01])$')


@contextlib.contextmanager
def server(ns, iface, ip, store, *extra):
    """The serve CLI in `ns`, after its READY line; yields (proc, ready, result) and at the
    end stops it (SIGTERM) and fills result: stdout lines after READY, counters."""
    argv = [sys.executable, "-m", "appliance", "serve", "--store", store, "--iface", iface,
            "--ip", f"{ip}/24", *extra]
    proc = ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    result = {"lines": [], "counters": None}
    try:
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                line = proc.stdout.readline()
                if line.startswith("HABOOB-READY ") or not line:
                    break
        assert line.startswith("HABOOB-READY "), proc.stderr.read() if proc.poll() is not None else line
        yield proc, json.loads(line.split(" ", 1)[1]), result
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        result["stderr"] = err
        for ln in out.splitlines():
            if ln.startswith("HABOOB-COUNTERS "):
                result["counters"] = json.loads(ln.split(" ", 1)[1])
            else:
                result["lines"].append(ln)


def fetch(link, url, *curl):
    return link.client.run(["curl", "-s", "--max-time", "10", *curl, url], capture_output=True,
                           check=False)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams, name, **labels):
    for f in fams.values():
        for s in f.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError((name, labels))


def store_digest(path) -> str:
    from appliance.content.store import _DIGEST_AT, _HDR
    with open(path, "rb") as f:
        return f.read(_HDR.size)[_DIGEST_AT:_DIGEST_AT + 32].hex()


def test_metrics_parse_count_and_health(store):
    with netns.pair(subnet=140) as link:
        with server(link.server, link.server_if, link.server_ip, store, "--metrics-port", "9100") as (p, ready, res):
            assert ready["metrics_port"] == 9100
            murl = f"http://{link.server_ip}:9100/metrics"
            r = fetch(link, murl, "-i")
            assert r.returncode == 0 and "Content-Type: text/plain; version=0.0.4" in r.stdout
            before = families(fetch(link, murl).stdout)
            for _ in range(3):
                assert fetch(link, f"http://{link.server_ip}/").returncode == 0
            assert fetch(link, f"http://{link.server_ip}/no-such-page").returncode == 0
            time.sleep(1.2)                                 # the rendered text is cached for 1 s
            text = fetch(link, murl).stdout
            after = families(text)
            h = fetch(link, f"http://{link.server_ip}:9100/healthz", "-w", "%{http_code}")
            assert h.stdout.endswith("200") and h.stdout.startswith("ok")
            assert fetch(link, f"http://{link.server_ip}:9100/nope", "-w", "%{http_code}").stdout.endswith("404")
            live = link.client.run([sys.executable, "-m", "vm", "stat", murl, "--count", "1", "--interval", "0.5"],
                                   capture_output=True, cwd=ROOT)
            assert re.search(r"\d req/s .* MB/s .* conns .* err/s", live.stdout), live
    assert res["counters"]["metrics_scrapes"] >= 3, res
    d2 = sample(after, "haboob_http_responses_total", code="2xx") - sample(before, "haboob_http_responses_total",
                                                                            code="2xx")
    d4 = sample(after, "haboob_http_responses_total", code="4xx") - sample(before, "haboob_http_responses_total",
                                                                            code="4xx")
    assert d2 == 3 and d4 == 1, (d2, d4)
    assert sample(after, "haboob_tcp_in_segments_total") > sample(before, "haboob_tcp_in_segments_total")
    assert sample(after, "haboob_http_response_bytes_total") > sample(before, "haboob_http_response_bytes_total")
    # the histogram: cumulative buckets, +Inf equals the count, and counts every finished response
    hist = after["haboob_http_response_seconds"]
    buckets = [(float(s.labels["le"]), s.value) for s in hist.samples if s.name.endswith("_bucket")]
    assert [b for b, _ in buckets] == sorted(b for b, _ in buckets)
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    count = sample(after, "haboob_http_response_seconds_count")
    assert buckets[-1] == (float("inf"), count)
    assert count == sum(sample(after, "haboob_http_responses_total", code=c) for c in ("1xx", "2xx", "3xx", "4xx",
                                                                                        "5xx"))
    info = [s for s in after["haboob_build_info"].samples][0].labels
    assert info["store_sha256"] == store_digest(store) and info["site_files"] == str(len(site_files()))
    assert info["kernel"] == os.uname().release
    assert "haboob_tcp_time_wait_entries" in after and "haboob_tcp_syn_cookies_active" in after
    assert sample(after, "haboob_tcp_conns_open") >= 1                 # the scrape's own connection
    assert sample(after, "haboob_tcp_connections", state="ESTABLISHED") >= 1


def test_disallowed_scrape_gets_rst_and_is_counted(store):
    with netns.pair(subnet=141) as link:
        with server(link.server, link.server_if, link.server_ip, store, "--metrics-port", "9100",
                    "--metrics-allow", "198.19.0.0/16,10.0.0.1") as (p, ready, res):
            for _ in range(2):
                r = fetch(link, f"http://{link.server_ip}:9100/metrics", "-w", "%{http_code}")
                assert r.returncode == 7, r                   # curl: connection refused (a RST)
            assert fetch(link, f"http://{link.server_ip}/").returncode == 0       # port 80 is unaffected
    assert res["counters"]["metrics_denied"] == 2, res["counters"]
    assert not res["counters"].get("metrics_scrapes")


def _log_lines(lines):
    return [ln for ln in lines if not ln.startswith("HABOOB-")]


def test_access_log_one_line_per_response_with_fields(store, tmp_path):
    files = site_files()
    with netns.pair(subnet=142) as link:
        with server(link.server, link.server_if, link.server_ip, store, "--access-log", "console") as (p, r, res):
            got = mirror(link, str(tmp_path / "m"))
            # control bytes and quotes in a target: escaped, no line or field can be forged
            link.client.run([sys.executable, "-c",
                             "import socket;s=socket.create_connection(('%s',80));"
                             "s.sendall(b'GET /a\\x1b[31m\\x0b\\\"b HTTP/1.1\\r\\nHost: x\\r\\n"
                             "User-Agent: ev\\x07il\\\"\\r\\nConnection: close\\r\\n\\r\\n');"
                             "s.recv(65536)" % link.server_ip])
            time.sleep(0.3)
    assert got
    lines = _log_lines(res["lines"])
    assert len(lines) == res["counters"]["http_replies"], (len(lines), res["counters"])
    parsed = []
    for ln in lines:
        m = CLF.match(ln)
        assert m, ln
        parsed.append(m.groupdict())
    assert all(x["ip"] == link.client_ip and x["tls"] == "0" for x in parsed)
    ok = [x for x in parsed if x["status"] == "200" and x["req"].startswith("GET ")]
    assert len(ok) >= len(files) - 1
    for x in ok:
        path = x["req"].split(" ")[1]
        rel = path.lstrip("/") or "index.html"
        if rel.endswith("/"):
            rel += "index.html"
        if x["variant"] == "identity":
            assert int(x["body"]) == len(files[rel]), x
        assert int(x["bytes"]) > int(x["body"]) and float(x["ttlb"]) < 10
    evil = [ln for ln in lines if "/a" in ln and "\\x1b" in ln]
    assert len(evil) == 1, lines[-3:]
    assert '"GET /a\\x1b[31m\\x0b\\x22b HTTP/1.1"' in evil[0] and 'ev\\x07il\\x22' in evil[0]
    assert all(ch >= " " for ln in lines for ch in ln)


def test_json_log_to_syslog_collector_rfc5424(store):
    with netns.pair(subnet=143) as link:
        collector = link.client.popen(
            [sys.executable, "-c",
             "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
             f"s.bind(('{link.client_ip}',5514));s.settimeout(8)\n"
             "n=0\nwhile n<4:\n d=s.recv(4096);sys.stdout.write(d.decode()+'\\n');sys.stdout.flush();n+=1"],
            stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(0.3)
            with server(link.server, link.server_if, link.server_ip, store, "--access-log",
                        f"syslog://{link.client_ip}:5514", "--log-format", "json"):
                for path in ("/", "/?x=1", "/missing", "/"):
                    fetch(link, f"http://{link.server_ip}{path}")
                out, _ = collector.communicate(timeout=15)
        finally:
            if collector.poll() is None:
                collector.kill()
                collector.wait()
    msgs = [m for m in out.split("\n") if m]
    assert len(msgs) == 4, out
    rx = re.compile(r"^<134>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \S+ haboob \d+ access - (\{.*\})$")
    for m in msgs:
        g = rx.match(m)
        assert g, m
        j = json.loads(g.group(1))
        assert j["client"] == link.client_ip and j["method"] == "GET" and j["tls"] is False
    assert [json.loads(rx.match(m).group(1))["status"] for m in msgs] == [200, 200, 404, 200]


def test_sigterm_drains_healthz_503_and_finishes_a_50mb_download(tmp_path):
    from appliance.content.compiler import Options, compile_site
    site = tmp_path / "site"
    site.mkdir()
    big = os.urandom(50 * 1024 * 1024)
    (site / "big.bin").write_bytes(big)
    (site / "index.html").write_text("hi\n")
    st = str(tmp_path / "big.store")
    compile_site(str(site), st, Options(gzip_level=1))
    with netns.pair(subnet=144) as link:
        with server(link.server, link.server_if, link.server_ip, st, "--metrics-port", "9100",
                    "--drain-timeout", "60") as (proc, ready, res):
            dest = str(tmp_path / "got.bin")
            dl = link.client.popen(["curl", "-s", "--limit-rate", "8M", "-o", dest,
                                    f"http://{link.server_ip}/big.bin"])
            try:
                time.sleep(1.0)
                assert fetch(link, f"http://{link.server_ip}:9100/healthz", "-w", "%{http_code}").stdout.endswith("200")
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                h = fetch(link, f"http://{link.server_ip}:9100/healthz", "-w", "%{http_code}")
                assert h.stdout.endswith("503"), h
                refused = fetch(link, f"http://{link.server_ip}/")
                assert refused.returncode == 7                  # new connections: RST
                assert dl.poll() is None, "the download should still be running"
                assert dl.wait(timeout=60) == 0
            finally:
                if dl.poll() is None:
                    dl.kill()
                    dl.wait()
            assert proc.wait(timeout=20) == 0                   # it exits by itself once drained
    with open(dest, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(big).digest()
    c = res["counters"]
    assert c["drain_started"] == 1 and c.get("drain_timeouts", 0) == 0 and c["tcp_drain_refused"] >= 1, c


def test_two_workers_each_answer_scrapes_for_themselves(store):
    with netns.pair(subnet=145) as link:
        with server(link.server, link.server_if, link.server_ip, store, "--workers", "2", "--metrics-port",
                    "9100") as (p, ready, res):
            seen = set()
            for _ in range(6):
                fams = families(fetch(link, f"http://{link.server_ip}:9100/metrics").stdout)
                seen |= {s.labels["worker"] for s in fams["haboob_build_info"].samples}
            assert seen <= {"0", "1"} and seen, seen
            assert fetch(link, f"http://{link.server_ip}/").returncode == 0
    assert res["counters"]["metrics_scrapes"] == 6 and res["counters"]["drain_started"] == 2, res["counters"]
