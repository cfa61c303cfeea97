"""`python -m vm fleet`: appliances behind HAProxy, failover and return.

The failover test runs the command as a user would (two appliances under
TCG, the balancer on 127.0.0.1), fetches the whole site through it byte for
byte, then, during a series of downloads on fresh connections, quits one
guest through its QMP socket (the power cut of a cloud instance). HAProxy's
own statistics (its admin socket) say when its health check took the
guest out: from then on no request may fail, and every body must match
the manifest. Two idle keep-alive connections, one to each guest, are held
across the kill: once the guest is out, HAProxy must have closed the one
to it (a dead guest sends no FIN: left open, a client's next request, or
the rest of a download, would hang until a timeout; that is how this test
once stalled), and the other one must still serve byte for byte. The
command restarts the guest; once HAProxy has it UP again, it must take
connections again. Ctrl-C then leaves no namespace,
QEMU or HAProxy behind.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import image_support as sup
from vm import check, fleet, netns
from vm.image import Image, VMError

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and taps"),
              pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy not installed (.ci/install.sh)")]


@pytest.fixture(scope="module")
def image():
    return Image.load(sup.build())


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {l.split()[0] for l in out.splitlines() if l.strip()}


def _fleet_netns(pid: int) -> set[str]:
    """The namespaces of the `vm fleet` process pid (vm.netns.unique names them; other tests on
    the machine make theirs meanwhile)."""
    return {n for n in _netns() if re.fullmatch(rf"hb{pid % 1000000}f\d+", n)}


def test_too_large_a_fleet_is_refused_before_anything_starts(image, monkeypatch):
    proc = subprocess.Popen([sys.executable, "-m", "vm", "fleet", str(image.folder), "-n", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=sup.REPO)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    cores = os.cpu_count()
    assert re.search(rf"-n 64: 64 appliances of 1 vCPU need 64 vCPUs; this machine has {cores} cores .*"
                     rf"at most -n \d+", err), err
    assert not _fleet_netns(proc.pid) and "balancer" not in out and "booting" not in err
    # memory: what the guests and QEMU need against what is free
    monkeypatch.setattr(fleet, "mem_available_mb", lambda: 1000)
    with pytest.raises(VMError, match=r"-n 4: 4 appliances of 256 MB \(\+96 MB for QEMU each\) need 1408 MB; "
                                      r"800 MB are free for them here: at most -n 2"):
        fleet.preflight(image, 4, 1, None)
    with pytest.raises(VMError, match="at least one"):
        fleet.preflight(image, 0)


def test_haproxy_accepts_the_configuration(tmp_path):
    members = [fleet.Member(i, f"198.18.60.{11 + i}", "52:54:00:00:60:01", "t") for i in range(2)]
    cfg = tmp_path / "h.cfg"
    with netns.namespace("h") as ns:                # HAProxy opens the namespace while checking
        cfg.write_text(fleet.haproxy_config(members, ns.name, 8080, tmp_path / "s.sock"))
        proc = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        text = cfg.read_text()
        assert f"server app2 198.18.60.12:80 namespace {ns.name} check" in text
        assert "option httpchk GET /" in text


def _get(port: int, url: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", url, headers={"Accept-Encoding": "identity"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise AssertionError(f"status {resp.status}")
        return body
    finally:
        conn.close()


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _vm_dir(pid: int) -> Path | None:
    """The haboob-vm-* folder of a QEMU process (from its -qmp argument)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    m = next((re.search(rb"unix:(/\S+)/qmp\.sock", a) for a in argv if b"qmp.sock" in a), None)
    return Path(m.group(1).decode()) if m else None


@pytest.mark.vm
def test_sigterm_while_booting_leaves_nothing_behind(image):
    """SIGTERM (what a service manager sends) while the guests still boot, with SIGINT ignored as a
    shell's background job has it: every QEMU, HAProxy, tap, the namespace and the folders go."""
    fleets = set(Path("/tmp").glob("haboob-fleet-*"))
    proc = subprocess.Popen([sys.executable, "-m", "vm", "fleet", str(image.folder), "-n", "2"], cwd=sup.REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 60
        while True:                                           # both QEMU started, not yet ready
            kids = _children(proc.pid)
            dirs = [d for d in map(_vm_dir, kids) if d]
            if len(dirs) == 2 and all((d / "serial.log").exists() for d in dirs):
                break
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.05)
        assert _fleet_netns(proc.pid)
        kids = _children(proc.pid)                            # the QEMUs, and HAProxy if it started
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert "balancer:" not in out, "the fleet was up already: not a stop while booting"
        assert "SIGTERM: stopped: appliances powered off, balancer and namespace removed" in err, err[-2000:]
        assert not _fleet_netns(proc.pid)
        assert set(Path("/tmp").glob("haboob-fleet-*")) <= fleets
        for pid in kids:
            assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} outlived vm fleet"
        for d in dirs:
            assert not d.exists(), d
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _keepalive(port: int, url: str) -> http.client.HTTPConnection:
    """A connection through the balancer that served url and is kept open (HTTP/1.1 keep-alive)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request("GET", url, headers={"Accept-Encoding": "identity"})
    resp = conn.getresponse()
    assert resp.status == 200 and not resp.will_close, (resp.status, resp.getheaders())
    conn.body = resp.read()
    return conn


@pytest.mark.vm
def test_fleet_fails_over_and_takes_the_guest_back(image):
    from qemu.qmp.legacy import QEMUMonitorProtocol
    proc = subprocess.Popen([sys.executable, "-m", "vm", "fleet", str(image.folder), "-n", "2"], cwd=sup.REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    try:
        deadline = time.monotonic() + 600
        while len([l for l in lines if l.startswith("  app")]) < 2:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, f"vm fleet ended early: {''.join(err)[-2000:]}"
            lines.append(line)
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        port = int(re.search(r"balancer: http://127\.0\.0\.1:(\d+)/", "".join(lines)).group(1))
        ns = re.search(r"namespace: (\S+);", "".join(lines)).group(1)
        stats_sock = Path(re.search(r"HAProxy stats: (\S+);", "".join(lines)).group(1))
        qmp1 = re.search(r"  app1 198\.18\.60\.11 qmp (\S+)", "".join(lines)).group(1)
        assert ns in _netns()
        st = fleet.stats(stats_sock)
        assert {k: v["status"] for k, v in st.items()} == {"app1": "UP", "app2": "UP"}

        bad = [r for r in check.fetch_all(image, "127.0.0.1", port, sup.EXAMPLE) if not r.ok]
        assert not bad, bad

        urls = sorted(image.urls)
        want = {u: check.expected(image, u, None)[0] for u in urls}
        # two idle keep-alive connections: round-robin puts one on each guest (nothing else is open)
        idle = [_keepalive(port, "/index.html"), _keepalive(port, "/index.html")]
        assert all(hashlib.sha256(c.body).hexdigest() == want["/index.html"] for c in idle)
        st = fleet.stats(stats_sock)
        assert (st["app1"]["scur"], st["app2"]["scur"]) == ("1", "1"), {k: v["scur"] for k, v in st.items()}
        log: list[tuple[float, str, bool, str, float]] = []     # (start, url, ok, detail, end)
        stop = threading.Event()

        def series():
            i = 0
            while not stop.is_set():
                url = urls[i % len(urls)]
                i += 1
                t = time.monotonic()
                try:
                    ok = hashlib.sha256(_get(port, url)).hexdigest() == want[url]
                    log.append((t, url, ok, "" if ok else "wrong body", time.monotonic()))
                except (OSError, http.client.HTTPException, AssertionError) as e:
                    log.append((t, url, False, f"{type(e).__name__}: {e}", time.monotonic()))
        th = threading.Thread(target=series)
        th.start()
        try:
            time.sleep(2)
            qmp = QEMUMonitorProtocol(qmp1)
            qmp.connect()
            t_kill = time.monotonic()
            try:
                qmp.cmd("quit")
                qmp.close()
            except EOFError:                    # QEMU may exit before its reply
                pass
            t_down = fleet.wait_status(stats_sock, "app1", "DOWN", 30)     # exactly: "UP 1/2" still gets traffic
            # HAProxy closed the connection it had to the dead guest (which sends no FIN or RST:
            # left open, the client's next request would hang); the one to the living guest
            # still serves requests
            ready, _, _ = select.select([c.sock for c in idle], [], [], 10)
            assert len(ready) == 1, f"{len(ready)} of the 2 idle connections ended after app1 went DOWN"
            cut = next(c for c in idle if c.sock in ready)
            try:
                assert cut.sock.recv(1) == b"", "data on the idle connection to the dead guest"
            except ConnectionResetError:
                pass
            live = next(c for c in idle if c is not cut)
            live.request("GET", "/about.html", headers={"Accept-Encoding": "identity"})
            resp = live.getresponse()
            assert resp.status == 200 and hashlib.sha256(resp.read()).hexdigest() == want["/about.html"]
            for c in idle:
                c.close()
            deadline = time.monotonic() + 400                     # the command boots it again
            while fleet.stats(stats_sock)["app1"]["status"] != "UP":
                assert time.monotonic() < deadline, f"app1 never came back: {''.join(err)[-2000:]}"
                time.sleep(0.2)
            back = int(fleet.stats(stats_sock)["app1"]["stot"])
            time.sleep(5)
        finally:
            stop.set()
            th.join(60)
        after_down = [r for r in log if r[0] >= t_down]
        # a series that stalled (a request left hanging on the dead guest) logs too few
        assert len(after_down) >= 20, (len(after_down), [(u, round(e - t, 1), d) for t, u, _, d, e in log[-3:]])
        failed = [r for r in after_down if not r[2]]
        assert not failed, failed[:5]
        # before the kill everything served; a request in flight at the kill or started before
        # HAProxy took the guest out may fail (the issue asks nothing of those)
        assert all(r[2] for r in log if r[4] < t_kill), [r for r in log if not r[2] and r[4] < t_kill][:5]
        assert int(fleet.stats(stats_sock)["app1"]["stot"]) - back >= 3     # it takes traffic again
        assert any("app1 (198.18.60.11) stopped (QEMU exit" in l for l in err)
        # HAProxy's log: the idle connection killed because its server went down (termination "D"),
        # and no normal session (termination "--" and no retry: "+1" is one redispatched off app1)
        hlog = (stats_sock.parent / "haproxy.log").read_text()
        assert re.search(r" site appliances/app1 \S+ \d+ D- ", hlog), hlog[-2000:]
        assert not re.search(r" site appliances/\S+ \S+ \d+ -- \d+/\d+/\d+/\d+/0 ", hlog), hlog[-2000:]

        bad = [r for r in check.fetch_all(image, "127.0.0.1", port, sup.EXAMPLE) if not r.ok]
        assert not bad, bad

        kids = _children(proc.pid)
        assert len(kids) == 3, kids                                # two QEMU, one HAProxy
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, "".join(err)[-2000:]
        assert ns not in _netns()
        assert not stats_sock.parent.exists()
        time.sleep(0.5)
        for pid in kids:
            assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} outlived vm fleet"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
