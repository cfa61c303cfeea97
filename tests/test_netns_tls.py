"""HTTPS from `python -m appliance serve` on a veth pair, checked with real clients:
curl (TLS 1.3, TLS 1.2), openssl s_client (ALPN, SNI, resumption, a refused
renegotiation), testssl.sh (no weak protocol, cipher or renegotiation), Python's
ssl + http.client (keep-alive), wget --mirror of the example site over HTTPS
byte for byte, the 308 redirect on port 80, HSTS, a self-signed run with
port 80 off, headless Chromium rendering the site (CSS and images) with the
test's CA in its NSS database. Namespaces and servers are removed by the fixtures."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.test_netns_serve import assert_mirror_exact, read_tree, running_server, site_files
from tests.tls_support import make_ca, make_cert
from vm import netns

pytestmark = pytest.mark.netns

SUBNET = 112
IP = f"198.18.{SUBNET}.1"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from appliance.content.compiler import compile_site
    from tests.test_netns_serve import SITE
    path = str(tmp_path_factory.mktemp("tls-store") / "www.store")
    compile_site(SITE, path)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    ca = make_ca(d)
    leaf = make_cert(d, "www", ca=ca, names=("www.test", IP))
    chain = os.path.join(d, "fullchain.pem")
    with open(chain, "w") as f:
        f.write(open(leaf[0]).read() + open(ca[0]).read())
    return {"ca": ca[0], "cert": chain, "key": leaf[1], "dir": d}


@pytest.fixture(scope="module")
def https(store, pki):
    with netns.pair(subnet=SUBNET) as link:
        with running_server(link.server, link.server_if, link.server_ip, store, "--tls-cert", pki["cert"],
                            "--tls-key", pki["key"], "--http", "redirect", "--hsts", "600") as srv:
            yield link, srv
        c = srv.counters
        assert c is not None, srv.stderr
        assert c.get("drop_internal_error", 0) == 0, c
        assert c.get("loop_stack_errors", 0) == 0, c
        assert c.get("tls_handshakes_full", 0) >= 1, c      # (what else depends on the tests selected)
        key = "".join(open(pki["key"]).read().splitlines()[1:-1])
        assert key[:32] not in json.dumps(c) and key[:32] not in srv.stderr


def curl(link, *args, **kw):
    return link.client.run(["curl", "-sS", "--max-time", "20", *args], text=False, **kw)


@pytest.mark.parametrize("opts,version", [(["--tlsv1.3"], "TLSv1.3"), (["--tlsv1.2", "--tls-max", "1.2"], "TLSv1.2")])
def test_curl_https_versions(https, pki, opts, version):
    link, srv = https
    assert srv.ready["https"]["port"] == 443 and IP in srv.ready["https"]["names"]
    r = curl(link, "-v", "-D", "-", "--cacert", pki["ca"], *opts, f"https://{IP}/")
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == site_files()["index.html"]
    assert b"\r\nStrict-Transport-Security: max-age=600" in head
    err = r.stderr.decode()
    assert f"SSL connection using {version}" in err, err
    assert "ALPN: server accepted http/1.1" in err or "ALPN, server accepted to use http/1.1" in err, err
    if version == "TLSv1.2":
        suite = err.split(f"SSL connection using {version} / ", 1)[1].split()[0]
        assert suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20" in suite), suite


def test_http_port_80_redirects_with_308(https):
    link, _ = https
    r = curl(link, "-D", "-", "-o", "/dev/null", f"http://{IP}/css/site.css?v=1")
    head = r.stdout.decode()
    assert head.startswith("HTTP/1.1 308 ")
    assert f"\r\nLocation: https://{IP}/css/site.css?v=1\r\n" in head
    assert "Strict-Transport-Security" not in head          # RFC 6797 §7.2: not over plain HTTP


def test_openssl_s_client_alpn_sni_resumption(https, pki, tmp_path):
    link, _ = https
    sess = str(tmp_path / "sess.pem")
    req = b"GET /about.html HTTP/1.1\r\nHost: www.test\r\nConnection: close\r\n\r\n"
    base = ["openssl", "s_client", "-connect", f"{IP}:443", "-servername", "www.test", "-alpn", "http/1.1",
            "-CAfile", pki["ca"], "-ign_eof"]
    r1 = link.client.run(base + ["-sess_out", sess], input=req, text=False, timeout=30, check=False)
    out1 = r1.stdout.decode(errors="replace")
    assert "ALPN protocol: http/1.1" in out1
    assert "Verify return code: 0 (ok)" in out1
    assert "New, TLSv1.3" in out1
    assert site_files()["about.html"] in r1.stdout
    r2 = link.client.run(base + ["-sess_in", sess], input=req, text=False, timeout=30, check=False)
    out2 = r2.stdout.decode(errors="replace")
    assert "Reused, TLSv1.3" in out2, out2[:2000]
    assert site_files()["about.html"] in r2.stdout
    r3 = link.client.run(base[:-1] + ["-tls1_2", "-sess_out", sess], input=b"", timeout=30, check=False,
                         text=False)
    r4 = link.client.run(base[:-1] + ["-tls1_2", "-sess_in", sess], input=b"", timeout=30, check=False,
                         text=False)
    assert b"New, TLSv1.2" in r3.stdout and b"Reused, TLSv1.2" in r4.stdout


CLIENT_KEEPALIVE = r"""
import http.client, json, ssl, sys, hashlib
ctx = ssl.create_default_context(cafile=sys.argv[2])
c = http.client.HTTPSConnection(sys.argv[1], 443, timeout=15, context=ctx)
out = []
for path in sys.argv[3:]:
    c.request("GET", path, headers={"Accept-Encoding": "identity"})
    r = c.getresponse()
    body = r.read()
    out.append([path, r.status, hashlib.sha256(body).hexdigest()])
out.append(["port", c.sock.getsockname()[1], c.sock.version()])
print(json.dumps(out))
"""


def test_python_https_keepalive(https, pki):
    link, _ = https
    files = site_files()
    paths = ["/index.html", "/css/site.css", "/img/logo.png", "/downloads/data.txt", "/about.html"]
    r = link.client.run([sys.executable, "-c", CLIENT_KEEPALIVE, IP, pki["ca"], *paths], timeout=60)
    out = json.loads(r.stdout)
    for path, status, digest in out[:-1]:
        assert status == 200 and digest == hashlib.sha256(files[path[1:]]).hexdigest(), path
    assert out[-1][2] == "TLSv1.3"


def mirror_https(link, dest, ca, ip):
    """wget --mirror over HTTPS, plus every file no link reaches: {relpath: bytes}."""
    files = site_files()
    link.client.run(["wget", "-q", "--mirror", "-nH", "-e", "robots=off", "--tries=5", "--timeout=20",
                     "--ca-certificate", ca, "-P", dest, f"https://{ip}/"], timeout=240, check=False)
    got = read_tree(dest)
    rest = [k for k in files if k not in got and not k.endswith("404.html")]
    if rest:
        lst = dest + ".rest.txt"
        with open(lst, "w") as fh:
            fh.write("".join(f"https://{ip}/{k}\n" for k in rest))
        link.client.run(["wget", "-q", "-x", "-nH", "--tries=5", "--timeout=20", "--ca-certificate", ca,
                         "-P", dest, "-i", lst], timeout=240)
        got = read_tree(dest)
    return got


def test_wget_mirror_over_https_byte_exact(https, pki, tmp_path):
    link, _ = https
    assert_mirror_exact(mirror_https(link, str(tmp_path / "m"), pki["ca"], IP))


def test_mirror_over_https_through_lossy_reordering_link(store, tmp_path):
    """5% loss, 5% reordering, 2% duplication both ways: retransmissions come
    from the ciphertext queue, and every file arrives byte-exact."""
    from tests.test_netns_impair import impaired_link
    d = str(tmp_path)
    ip = f"198.18.{SUBNET + 2}.1"
    ca = make_ca(d)
    leaf = make_cert(d, "lossy", ca=ca, names=("www.test", ip))
    with impaired_link(SUBNET + 2, loss=0.05, reorder=0.05, dup=0.02, seed=11) as (link, stats):
        with running_server(link.server, link.server_if, link.server_ip, store, "--tls-cert", leaf[0],
                            "--tls-key", leaf[1], "--http", "off") as srv:
            got = mirror_https(link, str(tmp_path / "m"), ca[0], ip)
    assert_mirror_exact(got)
    assert stats["dropped"] > 0 and stats["reordered"] > 0, stats
    c = srv.counters
    assert c.get("drop_internal_error", 0) == 0, c
    assert c.get("tcp_retransmits", 0) + c.get("tcp_fast_retransmit", 0) > 0, c
    assert c.get("tls_handshakes_full", 0) >= 1, c


def test_self_signed_with_http_off(store, tmp_path):
    with netns.pair(subnet=SUBNET + 1) as link:
        with running_server(link.server, link.server_if, link.server_ip, store,
                            "--tls-self-signed", f"www.test,{link.server_ip}", "--http", "off") as srv:
            crt = srv.ready["https"]["self_signed_cert"]
            assert srv.ready["port"] == 0
            local = str(tmp_path / "trust.pem")
            with open(crt) as f, open(local, "w") as g:
                g.write(f.read())
            r = curl(link, "--cacert", local, f"https://{link.server_ip}/")
            assert r.stdout == site_files()["index.html"]
            r = curl(link, "--resolve", f"www.test:443:{link.server_ip}", "--cacert", local, "https://www.test/")
            assert r.stdout == site_files()["index.html"]
            r = curl(link, f"http://{link.server_ip}/", check=False)
            assert r.returncode == 7                            # port 80: connection refused (RST)
        assert "not for production" in srv.stderr
        assert srv.counters.get("drop_tcp_closed_port", 0) >= 1
        assert not os.path.exists(crt)                         # the run's key and certificate are gone


RENEG = r"""
import subprocess, sys, time
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
time.sleep(1.0)
for line in (b"R\n", b"GET /about.html HTTP/1.1\r\nHost: www.test\r\nConnection: close\r\n\r\n"):
    try:
        p.stdin.write(line); p.stdin.flush()
    except BrokenPipeError:
        break
    time.sleep(1.0)
try:
    p.stdin.close()
except BrokenPipeError:
    pass
sys.stdout.buffer.write(p.stdout.read())
p.wait(timeout=20)
"""


def test_renegotiation_refused(https, pki):
    link, _ = https
    argv = ["openssl", "s_client", "-connect", f"{IP}:443", "-servername", "www.test", "-tls1_2",
            "-CAfile", pki["ca"]]
    r = link.client.run([sys.executable, "-c", RENEG, *argv], text=False, timeout=60, check=False)
    out = r.stdout.decode(errors="replace")
    assert "New, TLSv1.2" in out and "RENEGOTIATING" in out, (out[-2000:], r.stderr)
    # OP_NO_RENEGOTIATION: the renegotiating ClientHello is answered by a no_renegotiation alert
    # (RFC 5246 §7.2.2), which s_client treats as the end
    assert "no renegotiation" in out, out[-2000:]
    assert b"</html>" not in r.stdout
    r = curl(link, "--cacert", pki["ca"], f"https://{IP}/about.html")
    assert r.stdout == site_files()["about.html"]              # and the server goes on serving


def test_two_workers_share_ticket_keys(store, pki, tmp_path):
    """--workers 2: a TLS 1.3 ticket issued by one worker resumes on every later
    connection, which the flow hash spreads over both workers (all 8 on the
    issuing worker: probability 1/256), since the context is made before the fork."""
    with netns.pair(subnet=SUBNET + 3) as link:
        ip = link.server_ip
        d = str(tmp_path)
        ca = make_ca(d)
        leaf = make_cert(d, "w2", ca=ca, names=("www.test", ip))
        with running_server(link.server, link.server_if, ip, store, "--tls-cert", leaf[0], "--tls-key", leaf[1],
                            "--workers", "2", "--http", "off") as srv:
            sess = str(tmp_path / "s.pem")
            req = b"GET / HTTP/1.1\r\nHost: www.test\r\nConnection: close\r\n\r\n"
            base = ["openssl", "s_client", "-connect", f"{ip}:443", "-servername", "www.test", "-CAfile", ca[0],
                    "-ign_eof"]
            r = link.client.run(base + ["-sess_out", sess], input=req, text=False, timeout=30, check=False)
            assert b"New, TLSv1.3" in r.stdout
            reused = 0
            for _ in range(8):                      # new source ports each time
                r = link.client.run(base + ["-sess_in", sess], input=req, text=False, timeout=30, check=False)
                assert site_files()["index.html"] in r.stdout
                reused += b"Reused, TLSv1.3" in r.stdout
            assert reused == 8
        c = srv.counters
        assert c.get("tls_handshakes_resumed", 0) == 8 and c.get("tls_handshakes_full", 0) == 1, c


@pytest.mark.skipif(shutil.which("testssl") is None, reason="testssl.sh is not installed (.ci/install.sh)")
def test_testssl_finds_no_weak_protocol_cipher_or_renegotiation(https, tmp_path):
    """testssl.sh (Debian's): protocols, cipher categories, forward secrecy,
    renegotiation and CRIME; every finding OK or INFO, and the right ones."""
    link, _ = https
    out = str(tmp_path / "testssl.json")
    link.client.run(["testssl", "--quiet", "--color", "0", "--warnings", "off", "-p", "-s", "-f", "-R", "-C",
                     "--jsonfile", out, f"{IP}:443"], timeout=600, check=False)
    with open(out) as f:
        found = {e["id"]: e for e in json.load(f)}
    bad = {k: e for k, e in found.items() if e["severity"] not in ("OK", "INFO")}
    assert not bad, bad
    for k in ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT",
              "cipherlist_LOW", "cipherlist_3DES_IDEA", "cipherlist_AVERAGE"):
        assert found[k]["finding"] == "not offered", found[k]
    assert found["TLS1_2"]["finding"] == "offered" and found["TLS1_3"]["finding"].startswith("offered")
    assert found["ALPN"]["finding"] == "http/1.1"
    assert found["secure_client_renego"]["finding"] == "not vulnerable"
    assert found["CRIME_TLS"]["finding"] == "not vulnerable"
    assert found["PFS"]["finding"] == "offered"


def png_pixels(path):
    """(width, height, rows of (r, g, b)) of an 8-bit RGB or RGBA PNG, decoded here (zlib + the
    five PNG filters, RFC 2083 §6) so that the check does not depend on an imaging library."""
    import struct
    import zlib
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    off, idat = 8, b""
    while off < len(data):
        n, kind = struct.unpack(">I4s", data[off:off + 8])
        body = data[off + 8:off + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
        elif kind == b"IDAT":
            idat += body
        off += 12 + n
    bpp = 3 if ctype == 2 else 4
    raw, stride, prev, rows = zlib.decompress(idat), w * bpp, bytearray(w * bpp), []
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[x * bpp:x * bpp + 3]) for x in range(w)])
        prev = line
    return w, h, rows


def rgb(hexcolor):
    return tuple(int(hexcolor[i:i + 2], 16) for i in (1, 3, 5))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (.ci/install.sh)")
def test_headless_chromium_renders_the_site_over_https(https, pki, tmp_path):
    """Chromium in the client namespace trusts the test's CA through its NSS database
    ($HOME/.pki/nssdb, certutil) and nothing else; the screenshot shows the header in
    the CSS's --sand, the page in --paper, and the SVG's own colors where the image is.
    Any certificate error would give Chromium's interstitial instead."""
    link, srv = https
    home = tmp_path / "home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(["certutil", "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True, capture_output=True)
    subprocess.run(["certutil", "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", "haboob-test-ca",
                    "-i", pki["ca"]], check=True, capture_output=True)
    shot = tmp_path / "shot.png"
    r = link.client.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--disable-features=HttpsUpgrades", "--hide-scrollbars",
                         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                         "--window-size=1024,768", "--virtual-time-budget=5000", f"https://{IP}/"],
                        env=dict(os.environ, HOME=str(home)), timeout=120, check=False)
    assert shot.exists(), (r.returncode, r.stderr[-3000:])
    w, h, px = png_pixels(shot)
    assert (w, h) == (1024, 768)
    sand, paper = rgb("#c8a165"), rgb("#fdfaf4")
    assert px[5][5] == sand and px[5][w // 2] == sand, px[5][5]            # header { background: var(--sand) }
    assert px[h - 5][5] == paper and px[h - 5][w - 5] == paper, px[h - 5][5]  # body { background: var(--paper) }
    counts = {}
    for row in px:
        for p in row:
            counts[p] = counts.get(p, 0) + 1
    # /img/haboob.svg: a 240x120 #f4e3c1 sky over #c8a165 and #a47b3f dunes (colors the CSS never uses)
    assert counts.get(rgb("#f4e3c1"), 0) > 240 * 120 // 4, sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    assert counts.get(rgb("#a47b3f"), 0) > 240 * 120 // 10
    # /img/logo.png, 32x32 in the header: its centre pixel (152, 118, 80) is not a CSS color either
    assert counts.get((152, 118, 80), 0) >= 1
