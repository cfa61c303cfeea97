"""bench/: the harness's own logic (no namespaces): sizes, the site, the
nginx configuration, CPU arithmetic, wrk output, medians and ratios."""
import hashlib
import os
import subprocess
import sys

import pytest

from bench import cpu, report, servers, site
from bench.run import placement, summarize


def test_parse_size_units_and_errors():
    assert site.parse_size("4k") == ("4k", 4096)
    assert site.parse_size("24KB") == ("24k", 24576)
    assert site.parse_size("1m") == ("1m", 1 << 20)
    assert site.parse_size("1500") == ("1500b", 1500)
    for bad in ("", "4x", "k", "-1k", "0", "1g"):
        with pytest.raises(site.SizeError, match="bad size"):
            site.parse_size(bad)


def test_site_is_deterministic_and_sized(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    files = site.make_site(str(a), [102400, 1024, 4096])
    site.make_site(str(b), [1024, 4096, 102400])
    assert [f.name for f in files] == ["1k.bin", "4k.bin", "100k.bin"]
    for f in files:
        data = (a / f.name).read_bytes()
        assert len(data) == f.size
        assert data == (b / f.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f.sha256
    assert (a / "1k.bin").read_bytes() != (a / "4k.bin").read_bytes()[:1024]


def test_nginx_config_is_tuned_and_valid(tmp_path):
    ng = servers.Nginx()
    ng.prepare(str(tmp_path), str(tmp_path))
    conf = ng.render("198.18.50.1", 2, [0, 1], str(tmp_path))
    for directive in ("sendfile on;", "tcp_nopush on;", "tcp_nodelay on;", "keepalive_requests 1000000;",
                      "open_file_cache max=", "access_log off;", "worker_processes 2;", "daemon off;",
                      f"pid {tmp_path}/nginx.pid;", "reuseport"):
        assert directive in conf
    # Rightmost bit is CPU 0: worker 0 on CPU 0, worker 1 on CPU 1.
    ncpu = os.cpu_count()
    assert f"worker_cpu_affinity {'0' * (ncpu - 1)}1 {'0' * (ncpu - 2)}10;" in conf
    logged = ng.render("198.18.50.1", 1, [0], str(tmp_path), access_log=str(tmp_path / "access.log"))
    assert f"access_log {tmp_path}/access.log combined buffer=64k flush=1s;" in logged
    assert "access_log off;" not in logged
    (tmp_path / "logged.conf").write_text(logged)
    proc = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "logged.conf"),
                           "-e", str(tmp_path / "e.log")], capture_output=True, text=True)
    assert "syntax is ok" in proc.stderr, proc.stderr
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    # nginx -t parses it (the bind test that follows needs the namespace's
    # address, so only the syntax verdict counts here); it writes only under tmp_path.
    proc = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(path), "-e", str(tmp_path / "e.log")],
                          capture_output=True, text=True)
    assert "syntax is ok" in proc.stderr, proc.stderr


def test_busy_share_counts_softirq_and_excludes_idle():
    before = {0: cpu.CoreSample(busy=100, total=1000), 1: cpu.CoreSample(busy=0, total=1000)}
    after = {0: cpu.CoreSample(busy=175, total=1100), 1: cpu.CoreSample(busy=0, total=1100)}
    assert cpu.busy_shares(before, after) == {0: 0.75, 1: 0.0}
    now = cpu.read_cores()
    assert set(now) == set(range(os.cpu_count()))
    assert all(s.busy <= s.total for s in now.values())


def test_process_cpu_sees_own_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = cpu.process_tree(os.getpid())
        assert os.getpid() in tree and child.pid in tree
        assert cpu.process_cpu([os.getpid()]) > 0
        assert cpu.start_time(child.pid) is not None
    finally:
        child.kill()
        child.wait()


def test_placement_pins_or_shares():
    p = placement(1, 2)
    assert p["server_cpus"] == [0] and p["wrk_cpus"] == "1" and not p["shared"]
    p = placement(2, 2)
    assert p["server_cpus"] == [0, 1] and p["wrk_cpus"] is None and p["shared"]


def test_parse_counters_takes_last_json_line():
    text = "starting\nHABOOB-READY {\"ip\": \"198.18.0.1\"}\nHABOOB-COUNTERS {\"rx\": 5, \"tx\": 7}\n"
    assert servers.parse_counters(text) == {"rx": 5, "tx": 7}
    assert servers.parse_counters("{\"a\": 1}\nnot json {\n") == {"a": 1}
    assert servers.parse_counters("nothing here") is None


def _run(server, rep, rps, us, correct=True):
    return {"server": server, "workers": 1, "mode": "keepalive", "size": 4096, "label": "4k", "rep": rep,
            "rps": rps, "gbps": rps * 4096 * 8 / 1e9, "latency_us": {"percentiles": {"50": 100, "99": 900}},
            "non2xx": 0, "socket_errors": 0, "correct": correct, "errors": {},
            "cpu": {"server_busy_share": 1.0, "proc_cores": 1.0, "us_per_req_core": us + 1, "us_per_req_proc": us,
                    "us_per_req_machine": us, "us_per_req": us, "foreign_cores": 0.0}}


def test_summary_medians_and_ratio_per_repetition_pair():
    runs = [_run("nginx", 0, 100, 10), _run("appliance", 0, 50, 20), _run("nginx", 1, 200, 5),
            _run("appliance", 1, 300, 4), _run("nginx", 2, 150, 8), _run("appliance", 2, 150, 8, correct=False)]
    (row,) = summarize(runs)
    assert row["nginx"]["rps"] == 150 and row["appliance"]["rps"] == 150
    assert row["ratio_rps"] == [0.5, 1.5, 1.0]          # paired by repetition, not by rank
    assert row["ratio_rps_median"] == 1.0
    assert row["ratio_cpu_per_req"] == [2.0, 0.8, 1.0]
    assert row["ratio_rps_per_core"] == [0.5, 1.25, 1.0]
    assert row["appliance"]["correct"] is False and row["nginx"]["correct"] is True
    table = report.table({"summary": [row]})
    assert "| 1 | keep-alive | 4K | 150 | 125,000 |" in table and "| 1 | keep-alive | 4K | 100% | 8.0 | 9.0 |" in table
    assert "150 ✗" in table                              # an incorrect cell is flagged


@pytest.mark.parametrize("args, message", [
    (["--sizes", "4x"], "bad size '4x'"),
    (["--servers", "apache"], "unknown server(s) ['apache']"),
    (["--modes", "pipeline"], "unknown mode(s) ['pipeline']"),
    (["--workers", "99"], "worker counts must be"),
    (["--families", "5"], "unknown IP version(s) ['5']"),
    (["--families", "4,6", "--workers", "1,2"], "IPv6 cells need --workers 1"),
    (["--tls", "--tls-modes", "zero-rtt"], "unknown HTTPS mode(s) ['zero-rtt']"),
    (["--no-http"], "nothing to measure"),
])
def test_cli_rejects_bad_options_by_name(args, message):
    proc = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2
    assert message in proc.stderr


def test_render_rejects_a_file_that_is_not_results(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{\"runs\": 1")
    proc = subprocess.run([sys.executable, "-m", "bench", "render", str(bad)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 1 and "not a bench results file" in proc.stderr


def test_profile_parses_raw_stacks_by_function_and_line():
    from bench.profile import parse_raw
    raw = ("process 1:\"python\";main (a.py:3);loop (a.py:10);recv (b.py:5) 6\n"
           "main (a.py:3);loop (a.py:12) 3\n"
           "main (a.py:3);loop (a.py:10);send (b.py:9) 1\n"
           "garbage line\n")
    total, own, incl, lines = parse_raw(raw)
    assert total == 10
    assert own == {"recv (b.py)": 6, "loop (a.py)": 3, "send (b.py)": 1}
    assert incl["main (a.py)"] == 10 and incl["loop (a.py)"] == 10 and incl["recv (b.py)"] == 6
    assert lines["loop (a.py:12)"] == 3 and lines["recv (b.py:5)"] == 6


def test_micro_drives_whole_connections_through_the_stack():
    """bench/micro.py checks every reply and, per connection, the TIME-WAIT end
    (it raises otherwise); the CLI prints the figures."""
    from bench import micro
    r = micro.run("close", 4096, 200)
    assert r["requests"] == 200 and r["us_per_req"] > 0
    assert list(r["phases_us"]) == ["syn", "handshake ack", "request", "ack of reply+fin", "fin"]
    r = micro.run("keepalive", 1024, 200)
    assert r["requests"] == 200 and list(r["phases_us"]) == ["request", "ack of reply"]
    p = subprocess.run([sys.executable, "-m", "bench", "micro", "-n", "100", "--reps", "1"],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stderr
    assert "close" in p.stdout and "keepalive" in p.stdout and "µs/request" in p.stdout
    # over IPv6 (the link-local address): the same checks of every reply and TIME-WAIT
    r = micro.run("close", 4096, 200, family=6)
    assert r["requests"] == 200
    r = micro.run("keepalive", 4096, 200, family=6)
    assert r["requests"] == 200


def test_access_log_line_count_against_responses(tmp_path):
    """Running.log_lines counts Combined Log Format lines only (not the appliance's
    HABOOB-* lines, not a line still being written), incrementally."""
    path = tmp_path / "out"
    line = b'198.18.51.2 - - [01/Dec/2026:10:00:00 +0000] "GET /4k.bin HTTP/1.1" 200 4096 "-" "-" port=1\n'
    path.write_bytes(b"HABOOB-READY {\"ip\": \"198.18.51.1\"}\n" + line * 3 + line[:20])
    r = servers.Running("appliance", None, "http://x", "", access_log=str(path))
    assert r.log_lines() == 3
    with open(path, "ab") as f:
        f.write(line[20:] + line + b"HABOOB-COUNTERS {}\n")
    assert r.log_lines() == 5
    with open(path, "ab") as f:
        f.write(line * 40)
    from bench.run import access_log_check
    assert access_log_check(r, 5, 40, 32, timeout=0) == {"lines": 40, "responses": 40, "margin": 32, "ok": True}
    assert access_log_check(r, 5, 8, 32, timeout=0)["ok"]               # 32 answered after wrk stopped
    assert not access_log_check(r, 5, 7, 32, timeout=0)["ok"]           # 33: more than were in flight
    assert not access_log_check(r, 5, 41, 32, timeout=0)["ok"]          # a response not logged (yet)
    assert not access_log_check(r, 45, 100, 32, timeout=0)["ok"]        # nothing logged


@pytest.mark.bench
@pytest.mark.netns
def test_access_log_option_logs_both_servers_and_catches_one_that_does_not(tmp_path):
    """bench --access-log in process, one short keep-alive cell: nginx and the
    appliance each write one line per response wrk counted; a third server, the
    appliance told to log but started without its log (it writes nothing), is
    caught by the line-count check and its measurement marked incorrect."""
    from bench import run as runmod

    class Silent(servers.Appliance):
        name = "silent"

        def prepare(self, site_dir, workdir):     # the appliance's store, compiled once
            self.store, self.workdir = app.store, app.workdir

        def argv(self, link, workers, net="ipv4"):
            return [a for a in super().argv(link, workers, net) if a not in ("--access-log", "console")]

    app = servers.Appliance(access_log=True)
    silent = Silent(access_log=True)
    plan = runmod.Plan(sizes=[4096], modes=["keepalive"], workers=[1], reps=1, duration=1, warmup=0, check=1,
                       access_log=True)
    res = runmod.run(plan, {"nginx": servers.Nginx(access_log=True), "appliance": app, "silent": silent},
                     str(tmp_path))
    by = {r["server"]: r for r in res["runs"]}
    for name in ("nginx", "appliance"):
        r, log = by[name], by[name]["access_log"]
        assert r["mode"] == "keepalive+log" and r["correct"], r
        assert log["ok"] and log["responses"] > 1000 and 0 <= log["lines"] - log["responses"] <= 2 * 32, log
    assert (tmp_path / "nginx" / "w1" / "access.log").stat().st_size > 0
    assert by["silent"]["access_log"]["lines"] == 0 and not by["silent"]["access_log"]["ok"]
    assert not by["silent"]["correct"]
    (row,) = res["summary"]
    assert row["nginx"]["access_log_ok"] and row["appliance"]["access_log_ok"] and not row["silent"]["access_log_ok"]


def test_nginx_config_for_ipv6_and_https(tmp_path):
    """IPv6: [::]:80 only; HTTPS: 443 with the bench certificate, the appliance's TLS
    settings (versions, TLS 1.2 suites, server preference, tickets, no session cache);
    both pass nginx -t's syntax check (with a real certificate)."""
    ng = servers.Nginx()
    ng.prepare(str(tmp_path), str(tmp_path))
    conf6 = ng.render("198.18.50.1", 1, [0], str(tmp_path), net="ipv6")
    assert "listen [::]:80 ipv6only=on backlog=4096;" in conf6 and "198.18.50.1:80" not in conf6
    ng.tls = servers.tls_files(str(tmp_path), ["198.18.50.1"])
    conf = ng.render("198.18.50.1", 1, [0], str(tmp_path), net="https")
    from appliance.stack.tls import CIPHERS_12
    for directive in ("listen 198.18.50.1:443 ssl backlog=4096;", f"ssl_certificate {ng.tls[0]};",
                      f"ssl_certificate_key {ng.tls[1]};", "ssl_protocols TLSv1.2 TLSv1.3;",
                      f"ssl_ciphers {CIPHERS_12};", "ssl_prefer_server_ciphers on;", "ssl_session_tickets on;",
                      "ssl_session_cache none;", "access_log off;"):
        assert directive in conf, directive
    assert ":80" not in conf
    cert = subprocess.run(["openssl", "x509", "-in", ng.tls[0], "-noout", "-text"], capture_output=True, text=True)
    assert "prime256v1" in cert.stdout and "IP Address:198.18.50.1" in cert.stdout
    for name, text in (("v6.conf", conf6), ("tls.conf", conf)):
        (tmp_path / name).write_text(text)
        proc = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / name),
                               "-e", str(tmp_path / "e.log")], capture_output=True, text=True)
        assert "syntax is ok" in proc.stderr, proc.stderr


def test_stime_sums_and_checks_lengths_and_handshake_kinds():
    """bench/stime.collect on s_time's real output form: connections and bytes summed
    over the parallel clients; a byte total that is not connections x one response,
    or a resumed handshake in a -new run, makes the pass incorrect; a failed client
    is an error naming the command."""
    from bench import stime

    def fake(text, rc=0):
        return subprocess.Popen(["sh", "-c", f"printf '%s' \"$0\"; exit {rc}", text],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def out(marks, n, nbytes):
        return (f"Collecting connection statistics for 1 seconds\n{marks}\n\n"
                f"{n} connections in 0.50s; 800.00 connections/user sec, bytes read {nbytes}\n"
                f"{n} connections in 2 real seconds, 4400 bytes read per connection\n")

    j = stime.job("198.18.50.1", 443, "/4k.bin", 1, 2, 4400, resume=False, cpus=None, env={})
    j.t0 = 0
    r = stime.collect([fake(out("***", 3, 13200)), fake(out("**", 2, 8800))], j)
    assert r["requests"] == 5 and r["bytes"] == 22000 and r["check"]["ok"] == 5 and r["check"]["bad_length"] == 0
    r = stime.collect([fake(out("***", 3, 13199)), fake(out("**", 2, 8800))], j)      # one byte short
    assert r["check"]["ok"] == 0 and r["check"]["bad_length"] == 5
    r = stime.collect([fake(out("*r*", 3, 13200))], j)                                # a resumption in -new
    assert r["check"]["ok"] == 0 and not r["check"]["handshake_kind_ok"]
    j.resume = True
    r = stime.collect([fake("\n\nNow timing with session id reuse.\nstarting\n" + out("rrr", 3, 13200))], j)
    assert r["check"]["ok"] == 3 and r["check"]["handshakes_resumed"] == 3
    with pytest.raises(stime.STimeError, match="s_time failed .1 of 1.: openssl s_time -connect 198.18.50.1:443"):
        stime.collect([fake("connect: Connection refused", rc=1)], j)


def test_report_has_a_table_per_network_with_ratio_ranges():
    runs = []
    for net in ("ipv4", "ipv6", "https"):
        for rep, (a, n) in enumerate(((120, 100), (90, 100), (110, 100))):
            runs += [{**_run("appliance", rep, a, 10), "net": net}, {**_run("nginx", rep, n, 10), "net": net}]
    summary = summarize(runs)
    assert [r["net"] for r in summary] == ["ipv4", "ipv6", "https"]
    text = report.table({"summary": summary})
    heads = [text.index(h) for h in ("**HTTP over IPv4**", "**HTTP over IPv6**", "**HTTPS")]
    assert heads == sorted(heads)
    assert text.count("| 1.10 (0.90–1.20) |") == 3
