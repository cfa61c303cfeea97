"""`python -m appliance serve --ip dhcp` against a real DHCP server (dnsmasq).

dnsmasq runs in the client namespace of a veth pair (started and stopped by
pid here; no daemon, no configuration file, no DNS), the host-mode appliance
in the server namespace with no address at all. It gets a lease, says so on
the ready line, curl -4 fetches from the leased address byte-for-byte, and a
renewal is observed within seconds: dnsmasq's shortest lease is 2 minutes,
but it sends the T1 we set (option 58), so the client renews after 6 s.
"""
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vm import netns

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq (.ci/install.sh) missing")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.join(ROOT, "examples", "www")
MAC = "02:00:00:00:8c:01"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from appliance.content.compiler import compile_site
    path = str(tmp_path_factory.mktemp("store") / "www.store")
    compile_site(SITE, path)
    return path


def _stop(proc, sig=signal.SIGTERM, timeout=15):
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def _lines_until(proc, prefix, timeout):
    """stdout lines up to the first starting with `prefix` (or None at timeout/exit)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.5)
        if r:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith(prefix):
                return seen
        elif proc.poll() is not None:
            break
    return None


def test_dhcp_lease_curl_and_renewal(store, tmp_path):
    with netns.pair(subnet=140) as link:
        dns = link.client.popen(
            ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0",
             f"--interface={link.client_if}", "--bind-interfaces", "--no-ping", "--log-dhcp",
             "--dhcp-range=198.18.140.50,198.18.140.59,255.255.255.0,2m",
             "--dhcp-option=option:router,198.18.140.2", "--dhcp-option=58,6", "--dhcp-option=59,100",
             f"--dhcp-leasefile={tmp_path / 'leases'}", f"--pid-file={tmp_path / 'pid'}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        srv = None
        try:
            time.sleep(0.5)
            assert dns.poll() is None, _stop(dns)[1]
            srv = link.server.popen([sys.executable, "-m", "appliance", "serve", "--store", store, "--iface",
                                     link.server_if, "--ip", "dhcp", "--mac", MAC, "--hostname", "haboob-t"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            lines = _lines_until(srv, "HABOOB-READY ", 40)
            assert lines, _stop(srv)[1]
            ready = json.loads(lines[-1].split(" ", 1)[1])
            (a,) = ready["addresses"]
            assert a["how"] == "dhcp" and a["prefix"] == 24 and a["gateway"] == "198.18.140.2"
            assert a["server"] == "198.18.140.2" and a["lease"] == 120
            ip = a["ip"]
            assert ready["ip"] == ip and 50 <= int(ip.rsplit(".", 1)[1]) <= 59
            got = link.client.run(["curl", "-4", "-s", "--max-time", "10", f"http://{ip}/"], text=False).stdout
            with open(os.path.join(SITE, "index.html"), "rb") as f:
                assert got == f.read()
            # T1 = 6 s after the REQUEST: a unicast renewal, acknowledged
            deadline = time.monotonic() + 30
            counters = {}
            while time.monotonic() < deadline and not counters.get("dhcp_leases_renewed"):
                time.sleep(1)
                srv.send_signal(signal.SIGUSR1)
                got = _lines_until(srv, "HABOOB-COUNTERS ", 5)
                if got:
                    counters = json.loads(got[-1].split(" ", 1)[1])
            assert counters.get("dhcp_renewals", 0) >= 1 and counters.get("dhcp_leases_renewed", 0) >= 1, counters
            assert counters.get("dhcp_rebinds", 0) == 0
            # still serving on the same address after the renewal
            got = link.client.run(["curl", "-4", "-s", "--max-time", "10", f"http://{ip}/"], text=False).stdout
            with open(os.path.join(SITE, "index.html"), "rb") as f:
                assert got == f.read()
            out, err = _stop(srv)
            final = [json.loads(x.split(" ", 1)[1]) for x in out.splitlines() if x.startswith("HABOOB-COUNTERS ")]
            assert final and final[-1].get("drop_internal_error", 0) == 0
            assert not any(x.startswith("HABOOB-ADDRESS ") for x in out.splitlines())   # no change happened
        finally:
            if srv is not None:
                _stop(srv)
            _, log = _stop(dns)
        # dnsmasq saw the whole exchange and the renewal from our MAC (with our host name)
        assert f"DHCPDISCOVER({link.client_if}) {MAC}" in log, log
        assert log.count(f"DHCPACK({link.client_if}) {ip} {MAC} haboob-t") >= 2, log


def _curl(link, ip):
    return link.client.run(["curl", "-4", "-s", "--max-time", "10", f"http://{ip}/"], text=False).stdout


def test_dhcp_with_two_workers_the_parent_keeps_the_lease_and_restarts_them_on_a_new_one(store, tmp_path):
    with open(os.path.join(SITE, "index.html"), "rb") as f:
        want = f.read()
    with netns.pair(subnet=142) as link:
        srv = None
        try:
            with netns.dhcp_server(link.client, link.client_if, "198.18.142.50", "198.18.142.50",
                                   router="198.18.142.2", extra=("--dhcp-option=58,5", "--dhcp-option=59,100")):
                srv = link.server.popen([sys.executable, "-m", "appliance", "serve", "--store", store, "--iface",
                                         link.server_if, "--ip", "dhcp", "--mac", "02:00:00:00:8e:01",
                                         "--workers", "2"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
                lines = _lines_until(srv, "HABOOB-READY ", 40)
                assert lines, _stop(srv)[1]
                ready = json.loads(lines[-1].split(" ", 1)[1])
                assert ready["workers"] == 2 and ready["ip"] == "198.18.142.50"
                assert ready["addresses"][0]["how"] == "dhcp"
                for _ in range(6):                      # the flow hash spreads them over both workers
                    assert _curl(link, "198.18.142.50") == want
                time.sleep(7)                           # T1 = 5 s: the parent renews, the workers serve on
                assert _curl(link, "198.18.142.50") == want
            # another server that knows nothing of that lease NAKs the next renewal (authoritative):
            # the address is lost, the workers stop, a new lease starts a new set of workers
            with netns.dhcp_server(link.client, link.client_if, "198.18.142.60", "198.18.142.60",
                                   router="198.18.142.2", extra=("--dhcp-authoritative", "--dhcp-option=58,5",
                                                                 "--dhcp-option=59,100")):
                lines = _lines_until(srv, 'HABOOB-ADDRESS {"event": "acquired"', 40)
                assert lines, _stop(srv)[1]
                events = [json.loads(x.split(" ", 1)[1]) for x in lines if x.startswith("HABOOB-ADDRESS ")]
                assert [(e["event"], e["ip"]) for e in events] == [("lost", None), ("acquired", "198.18.142.60")]
                deadline = time.monotonic() + 10
                got = b""
                while time.monotonic() < deadline and got != want:
                    got = _curl(link, "198.18.142.60")
                assert got == want
                out, err = _stop(srv)
            c = json.loads([x for x in out.splitlines() if x.startswith("HABOOB-COUNTERS ")][-1].split(" ", 1)[1])
            assert c.get("dhcp_leases_bound") == 2 and c.get("dhcp_leases_renewed", 0) >= 1, c
            assert c.get("dhcp_naks") == 1 and c.get("workers") == 2 and c.get("drop_internal_error", 0) == 0, c
            assert c.get("http_replies", 0) >= 8, c
        finally:
            if srv is not None:
                _stop(srv)
