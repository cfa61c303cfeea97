"""bench/: the `--quick` smoke run end to end (both servers, both modes)
and its cleanup on interruption. These check that the harness works and
that every response was right, never a speed."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.netns]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _namespaces():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _processes_mentioning(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _sigint_default():
    """In the child: SIGINT as at a terminal. A shell starts background jobs
    with SIGINT ignored, and Python then keeps ignoring it: a test suite run
    that way could not play Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_quick_run_serves_every_response_right_and_writes_results(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--sizes", "4k", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert {(r["server"], r["mode"]) for r in runs} == {(s, m) for s in ("nginx", "appliance")
                                                        for m in ("keepalive", "close")}
    for r in runs:
        assert r["correct"] and r["requests"] > 0 and r["non2xx"] == 0, r
        assert r["check"]["ok"] > 0 and r["check"]["bad_status"] == 0 and r["check"]["bad_length"] == 0, r
        assert r["bytes"] >= r["requests"] * 4096
        assert set(r["cpu"]["core_busy"]) == {str(c) for c in range(os.cpu_count())}
    for session in results["sessions"]:
        for srv in session["servers"].values():
            assert all(v["identical"] for v in srv["fetch"].values())
    (row_ka, row_close) = results["summary"]
    assert row_ka["mode"] == "keepalive" and len(row_ka["ratio_rps"]) == 1
    assert results["environment"]["nginx"] and results["command"].startswith("python -m bench --quick")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1 | keep-alive | 4K |" in (out / "table.md").read_text()
    # The appliance printed its counters on SIGINT and they were recorded.
    assert isinstance(results["sessions"][0]["servers"]["appliance"].get("counters"), dict)
    # Nothing left behind: the run's namespaces are gone.
    left = {ns for s in results["sessions"] for srv in s["servers"].values() for ns in srv["namespaces"]}
    assert not left & _namespaces()


def test_interrupted_run_removes_namespaces_processes_and_workdir():
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--quick", "--servers", "nginx", "--sizes", "4k",
                             "--reps", "5", "--out", "/nonexistent-never-written"],
                            stderr=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=_sigint_default)
    workdir = None
    try:
        for line in proc.stderr:
            if line.startswith("work dir "):
                workdir = line.split(" ", 2)[2].strip()
            if " up with " in line:
                break
        assert workdir and _processes_mentioning(workdir), "nginx should be running from the work dir"
        mine = re.compile(rf"hb{proc.pid % 1000000}[a-z]")
        before = {ns for ns in _namespaces() if mine.match(ns)}
        assert len(before) == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not before & _namespaces()
    assert not _processes_mentioning(workdir)
    assert not os.path.exists(workdir)
    assert not os.path.exists("/nonexistent-never-written")


def test_ipv6_and_https_cells_serve_check_and_catch_a_wrong_length(tmp_path):
    """The IPv6 and HTTPS sessions in process, 1 rep of 1 s per cell: nginx and the
    appliance answer every response right over IPv6 (wrk to their IPv6 addresses,
    the appliance's from SLAAC) and over HTTPS (wrk keep-alive and close, s_time
    full and resumed handshakes, each kind confirmed), with the same negotiated
    TLS 1.3 suite; a third server, nginx serving files one byte short, is marked
    incorrect in every cell, by wrk's per-response check and by s_time's byte sum
    against its s_client probe."""
    from bench import run as runmod, servers

    class Short(servers.Nginx):
        name = "short"

        def prepare(self, site_dir, workdir):
            short = os.path.join(workdir, "short-site")
            os.makedirs(short)
            for name in os.listdir(site_dir):
                with open(os.path.join(site_dir, name), "rb") as f, open(os.path.join(short, name), "wb") as g:
                    g.write(f.read()[:-1])
            super().prepare(short, workdir)
            self.workdir = os.path.join(workdir, "short")
            os.makedirs(self.workdir, exist_ok=True)

    plan = runmod.Plan(sizes=[4096], modes=["keepalive", "close"], workers=[1], reps=1, duration=1, warmup=0,
                       check=1, nets=["ipv6", "https"], stime_procs=2)
    res = runmod.run(plan, {"nginx": servers.Nginx(), "appliance": servers.Appliance(), "short": Short()},
                     str(tmp_path))
    cells = {(r["net"], r["mode"], r["server"]): r for r in res["runs"]}
    assert set(cells) == {(n, m, s) for n, ms in (("ipv6", ("keepalive", "close")),
                                                  ("https", ("keepalive", "close", "full", "resumed")))
                          for m in ms for s in ("nginx", "appliance", "short")}
    for (net, mode, server), r in cells.items():
        if server == "short":
            assert not r["correct"], r
            if r["client"] == "wrk":
                assert r["check"]["bad_length"] > 0 and r["check"]["ok"] == 0, r["check"]
            continue
        assert r["correct"] and r["requests"] > 0 and r["check"]["ok"] == r["check"]["requests"] > 0, r
        assert r["check"]["bad_status"] == 0 and r["check"]["bad_length"] == 0
        if mode in ("full", "resumed"):                      # s_time: every connection of the asked kind
            assert r["client"] == "s_time" and r["check"]["handshake_kind_ok"], r["check"]
            assert r["check"]["bytes"] == r["check"]["expected_bytes"] >= r["requests"] * 4096
    ip6, https = res["sessions"]
    assert ip6["net"] == "ipv6" and https["net"] == "https"
    assert ip6["servers"]["nginx"]["base_url"] == "http://[2001:2:0:50::1]"
    assert ip6["servers"]["appliance"]["base_url"].startswith("http://[2001:2:0:51:")
    assert ip6["servers"]["appliance"]["counters"]["ip6_addresses_preferred"] >= 1
    assert https["tls_negotiated"] == ["TLSv1.3 / TLS_AES_128_GCM_SHA256 / X25519, 253 bits"]
    assert not https["servers"]["short"]["tls_probe"]["4k"]["body_identical"]
    c = https["servers"]["appliance"]["counters"]
    s_time = {m: cells[("https", m, "appliance")]["requests"] for m in ("full", "resumed")}
    # wrk resumes on reconnect (close), s_time -reuse always: most handshakes resumed
    assert c["tls_handshakes_resumed"] >= s_time["resumed"] + cells[("https", "close", "appliance")]["requests"]
    assert c["tls_handshakes_full"] >= s_time["full"]
    assert c.get("tls_cipher_TLS_AES_128_GCM_SHA256", 0) >= sum(s_time.values())
    for row in res["summary"]:
        assert row["ratio_rps"][0] > 0 and row["short"]["correct"] is False
