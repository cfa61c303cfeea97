"""`python -m appliance serve --ip6 auto`: link-local and SLAAC addresses with a
real router advertiser (dnsmasq --enable-ra in the client namespace), and
ping -6 from the Linux client to both (neighbour discovery and ICMPv6 echo
against the kernel's implementation). TCP over IPv6: test_netns_tcp6.py."""
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
MAC = "02:00:00:00:8d:01"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from appliance.content.compiler import compile_site
    path = str(tmp_path_factory.mktemp("store") / "www.store")
    compile_site(SITE, path)
    return path


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def _events(proc, want, timeout):
    """HABOOB-ADDRESS infos until `want(infos)` holds (or timeout)."""
    infos = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not want(infos):
        r, _, _ = select.select([proc.stdout], [], [], 0.5)
        if r:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("HABOOB-ADDRESS "):
                infos.append(json.loads(line.split(" ", 1)[1]))
    return infos


def ra_server(link, dhcp_range: str, pid_file, *extra: str):
    """dnsmasq sending router advertisements (and, with a non-ra-only range,
    answering DHCPv6) on the client end of `link`; stop it with _stop()."""
    return link.client.popen(
        ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0",
         f"--interface={link.client_if}", "--bind-interfaces", "--enable-ra", f"--dhcp-range={dhcp_range}",
         f"--pid-file={pid_file}", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def serve6(link, store):
    """`appliance serve --ip6 auto` on the server end of `link` (IPv4 static beside it)."""
    return link.server.popen([sys.executable, "-m", "appliance", "serve", "--store", store, "--iface",
                              link.server_if, "--ip", f"{link.server_ip}/24", "--ip6", "auto", "--mac", MAC],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_link_local_and_slaac_addresses_answer_ping6(store, tmp_path):
    with netns.pair(subnet=141) as link:
        # vm/netns.py turns IPv6 off in its namespaces: on for the client end only (the kernel on the
        # server end stays out of the way, as it must for a user-space stack)
        link.client.sysctl(f"net.ipv6.conf.{link.client_if}.disable_ipv6", "0")
        link.client.run(["ip", "-6", "addr", "add", "2001:2:0:141::2/64", "dev", link.client_if, "nodad"])
        ra = ra_server(link, "2001:2:0:141::,ra-only,64,10m", tmp_path / "pid")
        srv = None
        try:
            srv = serve6(link, store)
            infos = _events(srv, lambda i: {x.get("how") for x in i} >= {"link-local", "slaac"}, 40)
            by = {x["how"]: x for x in infos if x.get("event") == "acquired"}
            assert {"link-local", "slaac"} <= set(by), (infos, _stop(srv)[1])
            ll, ga = by["link-local"]["ip6"], by["slaac"]["ip6"]
            assert ll.startswith("fe80::") and ga.startswith("2001:2:0:141:")
            # RFC 7217 identifiers: not the MAC's EUI-64 (02:00:00:00:8d:01 -> ::ff:fe00:8d01)
            assert not ll.endswith("ff:fe00:8d01") and not ga.endswith("ff:fe00:8d01")
            for dst in (f"{ll}%{link.client_if}", ga):
                p = link.client.run(["ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", dst], check=False)
                assert p.returncode == 0, p.stdout + p.stderr
            # a closed TCP port over IPv6 is refused at once (a RST), not a timeout (port 80:
            # test_netns_tcp6.py)
            t0 = time.monotonic()
            p = link.client.run(["curl", "-6", "-s", "--max-time", "10", f"http://[{ga}]:81/"], check=False)
            assert p.returncode == 7 and time.monotonic() - t0 < 5, (p.returncode, p.stderr)
            srv.send_signal(signal.SIGTERM)
            out, err = _stop(srv)
            c = json.loads([x for x in out.splitlines() if x.startswith("HABOOB-COUNTERS ")][-1].split(" ", 1)[1])
            assert c.get("icmp6_echo_replies", 0) >= 4 and c.get("nd_na_sent", 0) >= 1, c
            assert c.get("mld_reports_sent", 0) >= 2 and c.get("nd_ra_received", 0) >= 1, c
            assert c.get("tcp_rst_sent", 0) >= 1, c                     # the closed port, by the IPv6 TCP path
            assert c.get("drop_internal_error", 0) == 0 and c.get("ip6_dad_duplicates", 0) == 0, c
        finally:
            if srv is not None:
                _stop(srv)
            _stop(ra)
