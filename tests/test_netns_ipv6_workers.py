"""IPv6 with several workers: `serve --workers 2 --ip6 auto` (lease.py's parent runs the
IPv6 control plane, the workers serve what it acquired) against dnsmasq's router
advertisements, with IPv4 beside it. Many `curl -6` connections to the SLAAC
address, byte for byte; each worker's own capture (--capture FILE.i) shows that
both took IPv6 connections and that neither sent a router solicitation, a DAD
probe, an MLD report or DHCPv6: the parent did (its counters are in the total).
Before lease.py's IPv6 part, serve refused --workers 2 with --ip6."""
import ipaddress
import json
import shutil
import signal
import subprocess
import sys

import pytest

from tests.test_netns_dhcp import _lines_until
from tests.test_netns_ipv6 import ROOT, _events, _stop, ra_server
from tests.test_netns_serve import site_files
from vm import netns

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq (.ci/install.sh) missing")]

MAC = "02:00:00:00:97:01"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from appliance.content.compiler import Options, compile_site
    from tests.test_netns_ipv6 import SITE
    path = str(tmp_path_factory.mktemp("store") / "www.store")
    compile_site(SITE, path, Options(mss=1440))
    return path


def _worker_frames(path):
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.utils import rdpcap
    return [p for p in rdpcap(path) if Ether in p and IPv6 in p]


@pytest.mark.parametrize("mode", ["auto", "static"])
def test_two_workers_serve_the_parents_ipv6_address_and_ipv4(store, tmp_path, mode):
    """auto: the SLAAC address from dnsmasq's RAs; static: --ip6 ADDR/PREFIX, DAD by the parent."""
    from scapy.layers.inet import TCP
    from scapy.layers.inet6 import IPv6
    want = site_files()["index.html"]
    with netns.pair(subnet=151) as link:
        link.client.sysctl(f"net.ipv6.conf.{link.client_if}.disable_ipv6", "0")
        link.client.run(["ip", "-6", "addr", "add", "2001:2:0:151::2/64", "dev", link.client_if, "nodad"])
        ra = ra_server(link, "2001:2:0:151::,ra-only,64,10m", tmp_path / "pid") if mode == "auto" else None
        cap = str(tmp_path / "w.pcap")
        srv = None
        try:
            srv = link.server.popen([sys.executable, "-m", "appliance", "serve", "--store", store, "--iface",
                                     link.server_if, "--ip", f"{link.server_ip}/24", "--mac", MAC,
                                     "--ip6", "auto" if mode == "auto" else "2001:2:0:151::10/64",
                                     "--workers", "2", "--capture", cap],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, cwd=ROOT)
            lines = _lines_until(srv, "HABOOB-READY ", 40)
            assert lines, _stop(srv)[1]
            ready = json.loads(lines[-1].split(" ", 1)[1])
            assert ready["workers"] == 2
            assert any(a.get("ip") == link.server_ip for a in ready["addresses"]), ready
            by = {a["how"]: a for a in ready["addresses"] if "ip6" in a}
            glob = "slaac" if mode == "auto" else "static"
            assert "link-local" in by, ready
            restarted = glob not in by
            assert mode == "auto" or not restarted, ready        # no RA to wait for: DAD, then the workers
            if restarted:
                # the router advertised after the parent stopped waiting (lease.SETTLE6): the new
                # address is announced and the workers restarted with it
                infos = _events(srv, lambda i: any(x.get("how") == "slaac" for x in i), 40)
                by.update({x["how"]: x for x in infos if x.get("event") == "acquired"})
                assert "slaac" in by, (infos, _stop(srv)[1])
            ga, ll = by[glob]["ip6"], by["link-local"]["ip6"]
            assert ipaddress.IPv6Address(ga) in ipaddress.IPv6Network("2001:2:0:151::/64")
            for i in range(16):             # a new connection (source port) each: the flow hash spreads them
                url, fam = ((f"http://[{ga}]/", "-6") if i % 4 != 3 else
                            (f"http://[{ll}%25{link.client_if}]/", "-6") if i % 8 == 3 else
                            (f"http://{link.server_ip}/", "-4"))
                p = link.client.run(["curl", fam, "-g", "-sS", "--max-time", "20", "-o", "-", "-w",
                                     "\n%{http_code}", url], check=False)
                assert p.returncode == 0, (url, p.stderr)
                body, _, code = p.stdout.rpartition("\n")
                assert code == "200" and body.encode() == want, (url, code)
            p = link.client.run(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", ga], check=False)
            assert p.returncode == 0, p.stdout + p.stderr
            srv.send_signal(signal.SIGTERM)
            out, err = _stop(srv)
            c = json.loads([x for x in out.splitlines() if x.startswith("HABOOB-COUNTERS ")][-1].split(" ", 1)[1])
            assert c["workers"] == 2 and c.get("drop_internal_error", 0) == 0, c
            assert c.get("http_replies", 0) >= 16, c
            # the parent's control plane: its DAD probes (link-local, global), MLD reports, and the RA
            # it took (auto), or its RS that nobody answers (static: no router on this link)
            assert c.get("nd_dad_ns_sent", 0) >= 2, c
            assert c.get("nd_ra_received", 0) >= 1 if mode == "auto" else c.get("nd_rs_sent", 0) >= 1, c
            assert c.get("mld_reports_sent", 0) >= 2 and c.get("ip6_addresses_preferred", 0) == 2, c
            if not restarted:                   # nothing changed, nothing printed
                assert not any(x.startswith("HABOOB-ADDRESS ") for x in out.splitlines()), out
            syns = []
            for i in range(2):
                frames = _worker_frames(f"{cap}.{i}")
                mine = [p for p in frames if p.src == MAC]
                # RS 133, MLDv2 report 143 (behind hop-by-hop), a DAD NS from ::, DHCPv6 to port 547
                assert not [p for p in mine if p[IPv6].src == "::" or p[IPv6].dst in ("ff02::2", "ff02::16")
                            or p[IPv6].dst == "ff02::1:2"], [p.summary() for p in mine]
                syns.append([p for p in frames if TCP in p and p[TCP].flags == "S" and p.src != MAC])
                assert all(p[IPv6].dst in (ga, ll) for p in syns[-1])
            assert syns[0] and syns[1], [len(s) for s in syns]          # IPv6 connections on both workers
            assert len(syns[0]) + len(syns[1]) >= 14
        finally:
            if srv is not None:
                _stop(srv)
            if ra is not None:
                _stop(ra)


def test_two_workers_with_dhcp_and_dhcpv6_from_the_parent(store, tmp_path):
    """--ip dhcp --ip6 auto --workers 2 against dnsmasq handing out an IPv4 lease and, with M=1
    (a range that is not SLAAC), a DHCPv6 address: both leases kept by the parent (only its
    DUID in dnsmasq's lease file, only the parent's client counted), both served by the workers."""
    from scapy.layers.inet import UDP
    want = site_files()["index.html"]
    with netns.pair(subnet=153) as link:
        link.client.sysctl(f"net.ipv6.conf.{link.client_if}.disable_ipv6", "0")
        link.client.run(["ip", "-6", "addr", "add", "2001:2:0:153::2/64", "dev", link.client_if, "nodad"])
        leases = tmp_path / "leases"
        dns = ra_server(link, "2001:2:0:153::100,2001:2:0:153::1ff,64,10m", tmp_path / "pid", "--user=root",
                        "--dhcp-range=198.18.153.50,198.18.153.59,255.255.255.0,2m", "--no-ping",
                        f"--dhcp-leasefile={leases}")
        cap = str(tmp_path / "w.pcap")
        srv = None
        try:
            srv = link.server.popen([sys.executable, "-m", "appliance", "serve", "--store", store, "--iface",
                                     link.server_if, "--ip", "dhcp", "--ip6", "auto", "--mac", MAC,
                                     "--workers", "2", "--capture", cap],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            lines = _lines_until(srv, "HABOOB-READY ", 40)
            assert lines, _stop(srv)[1]
            ready = json.loads(lines[-1].split(" ", 1)[1])
            by = {a["how"]: a for a in ready["addresses"]}
            assert ready["workers"] == 2 and "dhcp" in by and "link-local" in by, ready
            if "dhcp6" not in by:               # leased after the parent stopped waiting: a restart
                infos = _events(srv, lambda i: any(x.get("how") == "dhcp6" for x in i), 40)
                by.update({x["how"]: x for x in infos if x.get("event") == "acquired"})
                assert "dhcp6" in by, (infos, _stop(srv)[1])
            v4, v6 = by["dhcp"]["ip"], by["dhcp6"]["ip6"]
            assert v4.startswith("198.18.153.5") and v6.startswith("2001:2:0:153::1") and "slaac" not in by
            for i in range(12):
                url, fam = (f"http://[{v6}]/", "-6") if i % 3 else (f"http://{v4}/", "-4")
                p = link.client.run(["curl", fam, "-g", "-sS", "--max-time", "20", "-o", "-", "-w",
                                     "\n%{http_code}", url], check=False)
                assert p.returncode == 0, (url, p.stderr)
                body, _, code = p.stdout.rpartition("\n")
                assert code == "200" and body.encode() == want, (url, code)
            lease = leases.read_text()
            assert v6 in lease and v4 in lease and lease.count("00:03:00:01:" + MAC) == 1, lease
            srv.send_signal(signal.SIGTERM)
            out, err = _stop(srv)
            c = json.loads([x for x in out.splitlines() if x.startswith("HABOOB-COUNTERS ")][-1].split(" ", 1)[1])
            assert c.get("dhcp6_bound") == 1 and c.get("dhcp_leases_bound") == 1, c
            assert c.get("drop_internal_error", 0) == 0 and c.get("http_replies", 0) >= 12, c
            for i in range(2):                  # no DHCP of either family from a worker
                from scapy.utils import rdpcap
                mine = [p for p in rdpcap(f"{cap}.{i}") if p.src == MAC and UDP in p]
                assert not [p for p in mine if p[UDP].dport in (67, 547)], [p.summary() for p in mine]
        finally:
            if srv is not None:
                _stop(srv)
            _stop(dns)


def test_a_new_prefix_restarts_the_workers_with_its_address(store, tmp_path):
    """The parent's delegation changes (a second router advertiser, another prefix): a
    HABOOB-ADDRESS line for the new SLAAC address, a new set of workers, and both the old
    and the new address served by them."""
    want = site_files()["index.html"]
    with netns.pair(subnet=154) as link:
        link.client.sysctl(f"net.ipv6.conf.{link.client_if}.disable_ipv6", "0")
        link.client.run(["ip", "-6", "addr", "add", "2001:2:0:154::2/64", "dev", link.client_if, "nodad"])
        ra = ra_server(link, "2001:2:0:154::,ra-only,64,10m", tmp_path / "pid")
        ra2 = srv = None
        try:
            srv = link.server.popen([sys.executable, "-m", "appliance", "serve", "--store", store, "--iface",
                                     link.server_if, "--ip", f"{link.server_ip}/24", "--ip6", "auto", "--mac", MAC,
                                     "--workers", "2"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            lines = _lines_until(srv, "HABOOB-READY ", 40)
            assert lines, _stop(srv)[1]
            infos = json.loads(lines[-1].split(" ", 1)[1])["addresses"]
            if not any(x.get("how") == "slaac" for x in infos):     # late: a restart already
                infos += _events(srv, lambda i: any(x.get("how") == "slaac" for x in i), 40)
            (old,) = [x["ip6"] for x in infos if x.get("how") == "slaac"]
            _stop(ra)
            link.client.run(["ip", "-6", "addr", "add", "2001:2:0:155::2/64", "dev", link.client_if, "nodad"])
            ra2 = ra_server(link, "2001:2:0:155::,ra-only,64,10m", tmp_path / "pid2")
            infos += _events(srv, lambda i: any(x.get("ip6", "").startswith("2001:2:0:155:") for x in i), 40)
            new = [x["ip6"] for x in infos if x.get("event") == "acquired" and x["ip6"].startswith("2001:2:0:155:")]
            assert new, (infos, _stop(srv)[1])
            assert old.startswith("2001:2:0:154:")
            for url in [f"http://[{new[0]}]/", f"http://[{old}]/"] * 3:      # the old one is still valid
                p = link.client.run(["curl", "-6", "-g", "-sS", "--max-time", "20", "-o", "-", "-w",
                                     "\n%{http_code}", url], check=False)
                assert p.returncode == 0, (url, p.stderr)
                body, _, code = p.stdout.rpartition("\n")
                assert code == "200" and body.encode() == want, (url, code)
            srv.send_signal(signal.SIGTERM)
            out, err = _stop(srv)
            c = json.loads([x for x in out.splitlines() if x.startswith("HABOOB-COUNTERS ")][-1].split(" ", 1)[1])
            assert c.get("drain_started", 0) >= 4 and c["workers"] == 2, c     # two sets of two workers
            assert c.get("drop_internal_error", 0) == 0 and c.get("http_replies", 0) >= 6, c
        finally:
            if srv is not None:
                _stop(srv)
            for r in (ra, ra2):
                if r is not None:
                    _stop(r)
