"""`python -m appliance serve --ip6 ADDR/PREFIX --gateway6 GW` in host mode on a
veth pair with no router advertiser at all: the Linux client reaches the
static address with `curl -6` and `wget --mirror` (byte for byte), the
gateway (the client's kernel) is resolved by neighbour discovery, and a
static address the client already holds is found by DAD, reported on
stderr and never used, while the link-local address still answers."""
import json
import signal
import subprocess
import sys

import pytest

from tests.test_netns_ipv6 import MAC, ROOT, _events, _stop
from tests.test_netns_serve import assert_mirror_exact, mirror, site_files
from tests.test_netns_tcp6 import store  # noqa: F401  (cut at 1440: the stored sums fit IPv6 segments)
from vm import netns

pytestmark = pytest.mark.netns

PFX = "2001:2:0:145::"


def serve_static(link, store, ip6, *extra):  # noqa: F811
    return link.server.popen([sys.executable, "-m", "appliance", "serve", "--store", store, "--iface",
                              link.server_if, "--ip", f"{link.server_ip}/24", "--ip6", ip6, "--mac", MAC, *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_static_address_reached_by_curl6_without_router_advertisements(store, tmp_path):  # noqa: F811
    with netns.pair(subnet=145) as link:
        link.client.sysctl(f"net.ipv6.conf.{link.client_if}.disable_ipv6", "0")
        link.client.run(["ip", "-6", "addr", "add", PFX + "2/64", "dev", link.client_if, "nodad"])
        srv = serve_static(link, store, PFX + "10/64", "--gateway6", PFX + "2")
        try:
            # both addresses (DAD for each): the gateway is solicited once the link-local one is up
            infos = _events(srv, lambda i: {x.get("how") for x in i} >= {"static", "link-local"}, 40)
            (st,) = [x for x in infos if x.get("how") == "static"]
            assert st == {"event": "acquired", "ip6": PFX + "10", "prefix": 64, "how": "static",
                          "gateway": PFX + "2"}, (infos, _stop(srv)[1])
            index = site_files()["index.html"]
            p = link.client.run(["curl", "-6", "-g", "-sS", "--max-time", "20", "-o", "-", "-w",
                                 "\n%{http_code} %{remote_ip}", f"http://[{PFX}10]/"], check=False)
            assert p.returncode == 0, p.stderr
            body, _, tail = p.stdout.rpartition("\n")
            assert tail == f"200 {PFX}10" and body.encode() == index
            assert_mirror_exact(mirror(link, str(tmp_path / "m"), host=f"[{PFX}10]"))
            # the client's kernel learned us by NS/NA, not from any advertisement
            neigh = link.client.run(["ip", "-6", "neigh", "show", PFX + "10", "dev", link.client_if]).stdout
            assert MAC in neigh, neigh
            srv.send_signal(signal.SIGTERM)
            out, err = _stop(srv)
            c = json.loads([x for x in out.splitlines() if x.startswith("HABOOB-COUNTERS ")][-1].split(" ", 1)[1])
            assert c.get("nd_ra_received", 0) == 0 and c.get("ip6_dad_duplicates", 0) == 0, c
            assert c.get("nd_dad_ns_sent", 0) == 2 and c.get("mld_reports_sent", 0) >= 2, c   # link-local + static
            assert 1 <= c.get("nd_gateway_ns_sent", 0) <= 3 and c.get("nd_na_learned", 0) >= 1, c  # the gateway
            assert c.get("drop_internal_error", 0) == 0, c
        finally:
            _stop(srv)


def test_static_address_held_by_another_node_is_a_duplicate_and_unused(store):  # noqa: F811
    with netns.pair(subnet=146) as link:
        link.client.sysctl(f"net.ipv6.conf.{link.client_if}.disable_ipv6", "0")
        link.client.run(["ip", "-6", "addr", "add", "2001:2:0:146::2/64", "dev", link.client_if, "nodad"])
        srv = serve_static(link, store, "2001:2:0:146::2/64")      # the client's own address
        try:
            infos = _events(srv, lambda i: {x.get("how") for x in i} >= {"static", "link-local"}, 40)
            by = {x["how"]: x for x in infos}
            assert by.get("static") == {"event": "duplicate", "ip6": "2001:2:0:146::2", "prefix": 64,
                                        "how": "static"}, (infos, _stop(srv)[1])
            ll = by["link-local"]["ip6"]
            assert by["link-local"]["event"] == "acquired"
            p = link.client.run(["ping", "-6", "-c", "1", "-W", "3", f"{ll}%{link.client_if}"], check=False)
            assert p.returncode == 0, p.stdout + p.stderr
            srv.send_signal(signal.SIGTERM)
            out, err = _stop(srv)
            assert ("error: the static IPv6 address 2001:2:0:146::2 is in use by another node "
                    "(duplicate address detection, RFC 4862 §5.4.5): not used") in err
            c = json.loads([x for x in out.splitlines() if x.startswith("HABOOB-COUNTERS ")][-1].split(" ", 1)[1])
            assert c.get("ip6_static_duplicate") == 1, c
        finally:
            _stop(srv)
