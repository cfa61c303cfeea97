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
