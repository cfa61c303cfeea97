"""DHCPv6 end to end: `python -m appliance serve --ip6 auto` in host mode on a veth
pair, with dnsmasq in the client namespace as router advertiser and DHCPv6
server (a dhcp-range that is not 'slaac': its RAs say M=1 and the prefix has
no A flag, so the only global address is the DHCPv6 one). The appliance
reports the leased address (how "dhcp6"), dnsmasq's lease file has our
DUID-LL, and curl -6 fetches the site over it. The namespaces, dnsmasq and
the server are removed at the end (vm.netns; processes stopped by pid)."""
import json
import shutil
import signal
import time

import pytest

from tests.test_netns_ipv6 import MAC, SITE, _events, _stop, ra_server, serve6
from tests.test_netns_serve import site_files
from vm import netns

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq (.ci/install.sh) missing")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from appliance.content.compiler import Options, compile_site
    path = str(tmp_path_factory.mktemp("store") / "www.store")
    compile_site(SITE, path, Options(mss=1440))
    return path


def test_dhcpv6_address_from_dnsmasq_serves_curl6(store, tmp_path):
    with netns.pair(subnet=144) as link:
        link.client.sysctl(f"net.ipv6.conf.{link.client_if}.disable_ipv6", "0")
        link.client.run(["ip", "-6", "addr", "add", "2001:2:0:144::2/64", "dev", link.client_if, "nodad"])
        leases = tmp_path / "leases"
        dns = ra_server(link, "2001:2:0:144::100,2001:2:0:144::1ff,64,10m", tmp_path / "pid", "--user=root",
                        f"--dhcp-leasefile={leases}")
        srv = None
        try:
            srv = serve6(link, store)
            infos = _events(srv, lambda i: any(x.get("how") == "dhcp6" for x in i), 60)
            by = {x["how"]: x for x in infos if x.get("event") == "acquired"}
            assert "dhcp6" in by, (infos, _stop(srv)[1], _stop(dns)[1])
            a = by["dhcp6"]["ip6"]
            assert a.startswith("2001:2:0:144::1") and by["dhcp6"]["prefix"] == 128 and "slaac" not in by
            lease = leases.read_text()
            assert a in lease and "00:03:00:01:" + MAC in lease, lease     # DUID-LL (RFC 8415 §11.4)
            t0 = time.monotonic()
            p = link.client.run(["curl", "-6", "-g", "-sS", "--max-time", "20", "-o", "-", "-w",
                                 "\n%{http_code} %{remote_ip}", f"http://[{a}]/"], check=False)
            assert p.returncode == 0, (p.stderr, time.monotonic() - t0)
            body, _, tail = p.stdout.rpartition("\n")
            assert tail == f"200 {a}" and body.encode() == site_files()["index.html"]
            srv.send_signal(signal.SIGTERM)
            out, err = _stop(srv)
            c = json.loads([x for x in out.splitlines() if x.startswith("HABOOB-COUNTERS ")][-1].split(" ", 1)[1])
            assert c.get("dhcp6_bound", 0) == 1 and c.get("nd_ra_managed", 0) >= 1, c
            assert c.get("drop_internal_error", 0) == 0 and c.get("ip6_dad_duplicates", 0) == 0, c
        finally:
            if srv is not None:
                _stop(srv)
            _stop(dns)
