"""HTTPS over IPv6 beside IPv4 from one `python -m appliance serve --ip6 auto --tls-cert
... --http redirect --metrics-port 9100` on a veth pair, its IPv6 address from a
real router advertiser (dnsmasq --enable-ra, as in test_netns_tcp6.py), checked
with real clients: curl -6 https://[addr]/ byte for byte (and curl -4 on the same
run), openssl s_client -6 resumption (-sess_out / -sess_in: "Reused", and a ticket
issued over IPv4 reused over IPv6), the 308 on port 80 over IPv6 followed by
curl -L to https over IPv6, /healthz and /metrics over IPv6. The certificate
names the SLAAC address: it is stable (RFC 7217, from the MAC, the interface
and /etc/machine-id, serve.ip6_secret), so the test computes it before the
server starts and checks the server took it. Namespaces, dnsmasq and the server
are removed by the fixture (processes stopped by pid)."""
import ipaddress
import os
import shutil
import time

import pytest

from appliance.stack.counters import Counters
from appliance.stack.ipv6 import Ipv6Host
from appliance.stack.serve import ip6_secret
from tests.test_netns_ipv6 import MAC, _stop, ra_server
from tests.test_netns_serve import running_server, site_files
from tests.test_netns_tls import store  # noqa: F401  (the module-scoped store fixture)
from tests.tls_support import make_ca, make_cert
from vm import netns

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq (.ci/install.sh) missing")]

SUBNET = 151
PREFIX = "2001:2:0:151::"


def slaac_address(iface: str) -> str:
    """The address the server's SLAAC makes in PREFIX/64 (its first DAD try, RFC 7217)."""
    mac = bytes.fromhex(MAC.replace(":", ""))
    net8 = ipaddress.IPv6Address(PREFIX).packed[:8]
    h = Ipv6Host(mac, Counters(), ip6_secret(mac, iface), None)
    return str(ipaddress.IPv6Address(net8 + h._iid(net8, 0)))


@pytest.fixture(scope="module")
def dual(store, tmp_path_factory):
    """(link, server, SLAAC address, pki): one server for every check of this module."""
    d = str(tmp_path_factory.mktemp("pki6"))
    with netns.pair(subnet=SUBNET) as link:
        ga = slaac_address(link.server_if)
        ca = make_ca(d)
        leaf = make_cert(d, "www6", ca=ca, names=("www.test", link.server_ip, ga))
        chain = os.path.join(d, "fullchain.pem")
        with open(chain, "w") as f:
            f.write(open(leaf[0]).read() + open(ca[0]).read())
        link.client.sysctl(f"net.ipv6.conf.{link.client_if}.disable_ipv6", "0")
        link.client.run(["ip", "-6", "addr", "add", PREFIX + "2/64", "dev", link.client_if, "nodad"])
        ra = ra_server(link, f"{PREFIX},ra-only,64,10m", os.path.join(d, "dnsmasq.pid"))
        try:
            with running_server(link.server, link.server_if, link.server_ip, store, "--ip6", "auto", "--mac", MAC,
                                "--tls-cert", chain, "--tls-key", leaf[1], "--http", "redirect",
                                "--metrics-port", "9100") as srv:
                # SLAAC after the RA and DAD: the first answer over IPv6 says the address is ours
                deadline = time.monotonic() + 40
                while True:
                    p = link.client.run(["curl", "-6", "-g", "-sS", "--max-time", "3", "-o", "/dev/null", "-w",
                                         "%{http_code}", f"http://[{ga}]/"], check=False)
                    if p.stdout == "308" or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                assert p.stdout == "308", (ga, p.stderr)
                yield link, srv, ga, {"ca": ca[0]}
            c = srv.counters
            assert c is not None, srv.stderr
            assert c.get("drop_internal_error", 0) == 0 and c.get("loop_stack_errors", 0) == 0, c
            assert c.get("drop_tcp_bad_checksum", 0) == 0, c
            assert c.get("tls_handshakes_full", 0) >= 1, c
        finally:
            _stop(ra)


def curl(link, *args, **kw):
    return link.client.run(["curl", "-g", "-sS", "--max-time", "20", *args], text=False, **kw)


@pytest.mark.parametrize("path", ["index.html", "img/logo.png", "downloads/data.txt"])
def test_curl6_https_byte_exact_beside_ipv4(dual, path):
    """Before TlsConn6 the SYN to [addr]:443 got a RST: curl exit 7."""
    link, srv, ga, pki = dual
    want = site_files()[path]
    for fam, host in (("-6", f"[{ga}]"), ("-4", link.server_ip)):
        r = curl(link, fam, "-v", "--cacert", pki["ca"], "-w", "\n%{remote_ip}", f"https://{host}/{path}",
                 check=False)
        assert r.returncode == 0, (fam, r.returncode, r.stderr[-2000:])
        body, _, remote = r.stdout.rpartition(b"\n")
        assert body == want, (fam, len(body), len(want))
        assert remote.decode() == host.strip("[]")
        err = r.stderr.decode()
        assert "SSL connection using TLSv1.3" in err, err
        assert "ALPN: server accepted http/1.1" in err or "ALPN, server accepted to use http/1.1" in err, err


def test_openssl_s_client_6_resumption_and_a_ticket_from_ipv4(dual, tmp_path):
    link, srv, ga, pki = dual
    req = b"GET /about.html HTTP/1.1\r\nHost: www.test\r\nConnection: close\r\n\r\n"
    about = site_files()["about.html"]

    def s_client(fam, target, *extra):
        r = link.client.run(["openssl", "s_client", fam, "-connect", target, "-servername", "www.test", "-alpn",
                             "http/1.1", "-CAfile", pki["ca"], "-ign_eof", *extra], input=req, text=False,
                            timeout=30, check=False)
        return r.stdout.decode(errors="replace"), r.stdout
    s6 = str(tmp_path / "s6.pem")
    out, raw = s_client("-6", f"[{ga}]:443", "-sess_out", s6)
    assert "New, TLSv1.3" in out and "ALPN protocol: http/1.1" in out and "Verify return code: 0 (ok)" in out, out
    assert about in raw
    out, raw = s_client("-6", f"[{ga}]:443", "-sess_in", s6)
    assert "Reused, TLSv1.3" in out, out[:2000]
    assert about in raw
    # one TlsServer for both families: a ticket from an IPv4 handshake resumes over IPv6
    s4 = str(tmp_path / "s4.pem")
    out, _ = s_client("-4", f"{link.server_ip}:443", "-sess_out", s4)
    assert "New, TLSv1.3" in out
    out, raw = s_client("-6", f"[{ga}]:443", "-sess_in", s4)
    assert "Reused, TLSv1.3" in out and about in raw, out[:2000]
    # TLS 1.2 session resumption over IPv6 too
    s12 = str(tmp_path / "s12.pem")
    out, _ = s_client("-6", f"[{ga}]:443", "-tls1_2", "-sess_out", s12)
    assert "New, TLSv1.2" in out
    out, _ = s_client("-6", f"[{ga}]:443", "-tls1_2", "-sess_in", s12)
    assert "Reused, TLSv1.2" in out


def test_redirect_over_ipv6_followed_to_https_over_ipv6(dual):
    link, srv, ga, pki = dual
    r = curl(link, "-6", "-D", "-", "-o", "/dev/null", f"http://[{ga}]/css/site.css?v=1")
    head = r.stdout.decode()
    assert head.startswith("HTTP/1.1 308 ") and f"\r\nLocation: https://[{ga}]/css/site.css?v=1\r\n" in head, head
    r = curl(link, "-6", "-L", "--cacert", pki["ca"], "-w", "\n%{num_redirects} %{url_effective} %{remote_ip}",
             f"http://[{ga}]/css/site.css?v=1", check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    body, _, tail = r.stdout.rpartition(b"\n")
    n, url, remote = tail.decode().split()
    assert body == site_files()["css/site.css"]
    assert n == "1" and url == f"https://[{ga}]/css/site.css?v=1" and remote == ga
    r = curl(link, "-4", "-D", "-", "-o", "/dev/null", f"http://{link.server_ip}/")   # and over IPv4 beside it
    assert f"\r\nLocation: https://{link.server_ip}/\r\n" in r.stdout.decode()


def test_metrics_over_ipv6_counts_both_families(dual):
    link, srv, ga, pki = dual
    curl(link, "-6", "-o", "/dev/null", "--cacert", pki["ca"], f"https://[{ga}]/")
    curl(link, "-4", "-o", "/dev/null", "--cacert", pki["ca"], f"https://{link.server_ip}/")
    time.sleep(1.1)                                     # past the metrics text cache (1 s)
    r = curl(link, "-6", f"http://[{ga}]:9100/metrics")
    text = r.stdout.decode()
    full = [ln for ln in text.splitlines() if ln.startswith("haboob_tls_handshakes_full_total")]
    assert full and int(float(full[0].split()[-1])) >= 2, full
    r = curl(link, "-6", f"http://[{ga}]:9100/healthz")
    assert r.stdout == b"ok\n"
