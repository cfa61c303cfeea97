"""TCP over IPv6 end to end: `python -m appliance serve --ip6 auto` in host mode on a
veth pair, its addresses from a real router advertiser (dnsmasq --enable-ra in
the client namespace, as in test_netns_ipv6.py), and the Linux client's TCP:
`curl -6 -g http://[addr]/` on the SLAAC and the link-local address, IPv4 on the
same port at the same time, and `wget --mirror` over IPv6 compared byte for
byte with examples/www. The namespaces, dnsmasq and the server are removed
at the end (vm.netns; processes stopped by pid)."""
import json
import shutil
import signal

import pytest

from tests.test_netns_ipv6 import _events, _stop, ra_server, serve6
from tests.test_netns_serve import assert_mirror_exact, mirror, site_files
from vm import netns

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq (.ci/install.sh) missing")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from appliance.content.compiler import Options, compile_site
    from tests.test_netns_ipv6 import SITE
    path = str(tmp_path_factory.mktemp("store") / "www.store")
    compile_site(SITE, path, Options(mss=1440))         # 1500 - 60: the stored sums fit IPv6 segments
    return path


@pytest.mark.parametrize("offloads", ["on", "off"])
def test_curl6_and_wget_mirror_over_ipv6_dual_stack(store, tmp_path, offloads):
    """offloads on: NEEDS_CSUM and GSO TCPV6 super-frames through the kernel; off: every
    checksum from the stored sums (mode 0), checked by the client's kernel."""
    with netns.pair(subnet=142 if offloads == "on" else 143) as link:
        if offloads == "off":
            netns.set_offloads(link.server, link.server_if, tx=False, tso=False, gso=False)
        link.client.sysctl(f"net.ipv6.conf.{link.client_if}.disable_ipv6", "0")
        pfx = "2001:2:0:142::" if offloads == "on" else "2001:2:0:143::"
        link.client.run(["ip", "-6", "addr", "add", pfx + "2/64", "dev", link.client_if, "nodad"])
        ra = ra_server(link, f"{pfx},ra-only,64,10m", tmp_path / "pid")
        srv = None
        try:
            srv = serve6(link, store)
            infos = _events(srv, lambda i: {x.get("how") for x in i} >= {"link-local", "slaac"}, 40)
            by = {x["how"]: x for x in infos if x.get("event") == "acquired"}
            assert {"link-local", "slaac"} <= set(by), (infos, _stop(srv)[1])
            ll, ga = by["link-local"]["ip6"], by["slaac"]["ip6"]
            index = site_files()["index.html"]
            for url, extra in ((f"http://[{ga}]/", []), (f"http://[{ll}%25{link.client_if}]/", []),
                               (f"http://{link.server_ip}/", ["-4"])):
                args = extra or ["-6"]
                p = link.client.run(["curl", *args, "-g", "-sS", "--max-time", "20", "-o", "-", "-w",
                                     "\n%{http_code} %{remote_ip}", url], check=False)
                assert p.returncode == 0, (url, p.stderr)
                body, _, tail = p.stdout.rpartition("\n")
                code, remote = tail.split()
                assert code == "200" and body.encode() == index, (url, tail)
                assert remote.split("%")[0] in (ga, ll, link.server_ip)
            p = link.client.run(["curl", "-6", "-g", "-sS", "--max-time", "20", "-o", "/dev/null", "-w",
                                 "%{http_code}", f"http://[{ga}]/no-such-page"], check=False)
            assert p.stdout == "404", p.stdout + p.stderr
            got = mirror(link, str(tmp_path / "m"), host=f"[{ga}]")
            assert_mirror_exact(got)
            srv.send_signal(signal.SIGTERM)
            out, err = _stop(srv)
            c = json.loads([x for x in out.splitlines() if x.startswith("HABOOB-COUNTERS ")][-1].split(" ", 1)[1])
            assert c.get("drop_internal_error", 0) == 0 and c.get("drop_tcp_bad_checksum", 0) == 0, c
            assert c.get("drop_ip6_tcp_not_served", 0) == 0, c
            if offloads == "off":
                # from the stored sums, but for segments cut elsewhere by recovery or the
                # window (a partial ack, a probe, a window clamp: on a loaded machine these
                # do happen), each with the rest of its stored segment after it
                cut = sum(c.get(k, 0) for k in ("tcp_retransmits", "tcp_window_probes", "tcp_tx_window_clamped",
                                                 "tcp_newreno_partial_ack"))
                assert c.get("tcp_tx_sw_csum", 0) <= 2 * cut, c
            else:                                                   # GSO super-frames, not 1440-byte frames
                assert c["tcp_out_segments"] * 1440 < c["tcp_out_bytes"] // 4, c
        finally:
            if srv is not None:
                _stop(srv)
            _stop(ra)
