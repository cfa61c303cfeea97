"""The example image built with HTTPS (build.py --tls-self-signed, --hsts) boots
under QEMU and is fetched over HTTPS through user networking: curl with the
image's certificate as the only trust anchor, every URL byte-exact; port 80
answers 308; the private key is in the image (0600) and not in the manifest.
Then the same image boots with a configuration volume (vm --config DIR) holding
another certificate and key, and that one is served: the peer certificate's
DER is the volume's, byte for byte."""
import hashlib
import json
import re
import shutil
import socket
import ssl
import subprocess

import pytest

from tests import image_support as sup
from tests.image_support import read_cpio
from tests.tls_support import make_cert
from vm.image import Image
from vm.qemu import Options, free_port
from vm.session import session

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def built():
    return sup.build("tls", tls_self_signed=("www.test",), hsts=60)


def test_image_holds_the_key_and_the_manifest_only_the_fingerprint(built):
    files = read_cpio(built / "initrd.img")
    key = files["/haboob/tls/key.pem"]
    assert key["mode"] & 0o777 == 0o600
    crt = files["/haboob/tls/fullchain.pem"]["data"]
    assert crt == (built / "selfsigned.crt").read_bytes()
    m = json.loads((built / "manifest.json").read_text())
    der = subprocess.run(["openssl", "x509", "-outform", "DER"], input=crt, capture_output=True, check=True).stdout
    assert m["tls"]["fingerprint_sha256"] == hashlib.sha256(der).hexdigest()
    assert m["tls"]["private_key_in_image"] is True and m["tls"]["names"] == ["www.test"]
    body = "".join(key["data"].decode().splitlines()[1:-1])
    assert body[:32] not in (built / "manifest.json").read_text()
    cfg = json.loads(files["/etc/haboob/config.json"]["data"])
    assert cfg["tls"] == {"cert": "/haboob/tls/fullchain.pem", "key": "/haboob/tls/key.pem", "http": "redirect",
                          "hsts": 60}


def test_boots_and_serves_https_over_user_networking(built):
    image = Image.load(built)
    tport = free_port()
    with session(image, Options(net="user", tls_hostport=tport)) as s:
        ready = s.machine.wait_ready(300)
        assert ready["https"]["port"] == 443 and ready["https"]["names"] == ["www.test"]
        ca = str(built / "selfsigned.crt")
        base = ["curl", "-sS", "--max-time", "60", "--cacert", ca, "--resolve", f"www.test:{tport}:127.0.0.1"]
        for url, info in image.urls.items():
            r = subprocess.run(base + [f"https://www.test:{tport}{url}"], capture_output=True, timeout=90)
            assert r.returncode == 0, r.stderr
            assert hashlib.sha256(r.stdout).hexdigest() == info["sha256"], url
        r = subprocess.run(base + ["-D", "-", "-o", "/dev/null", f"https://www.test:{tport}/"],
                           capture_output=True, timeout=90)
        assert b"\r\nStrict-Transport-Security: max-age=60\r\n" in r.stdout
        r = subprocess.run(["curl", "-sS", "--max-time", "60", "-D", "-", "-o", "/dev/null",
                            f"http://127.0.0.1:{s.port}/about.html"], capture_output=True, timeout=90)
        assert r.stdout.startswith(b"HTTP/1.1 308 ")
        assert b"\r\nLocation: https://127.0.0.1/about.html\r\n" in r.stdout
        s.machine.send_console(b"c")
        line = s.machine.wait_for("HABOOB-COUNTERS ", 60)
        # (the console line may be interleaved with kernel messages: take the one field)
        m = re.search(r'"tls_handshakes_full": (\d+)', line)
        assert m and int(m[1]) >= len(image.urls), line
        assert s.machine.powerdown(90), s.machine.tail()


def test_configuration_volume_certificate_replaces_the_built_in_one(built, tmp_path):
    image = Image.load(built)
    crt, key = make_cert(str(tmp_path), "renewed", days=90, names=("www.test", "renewed.test"))
    vol = tmp_path / "cfg"
    (vol / "tls").mkdir(parents=True)
    shutil.copyfile(crt, vol / "tls" / "fullchain.pem")
    shutil.copyfile(key, vol / "tls" / "key.pem")
    want = ssl.PEM_cert_to_DER_cert(open(crt).read())
    old = ssl.PEM_cert_to_DER_cert((built / "selfsigned.crt").read_text())
    assert want != old
    tport = free_port()
    with session(image, Options(net="user", tls_hostport=tport, config=vol)) as s:
        ready = s.machine.wait_ready(300)
        assert ready["https"]["names"] == ["www.test", "renewed.test"], ready
        assert any("haboob: HTTPS certificate from the configuration volume (www.test, renewed.test)" in l
                   for l in s.machine.lines), s.machine.tail()
        ctx = ssl.create_default_context(cafile=crt)          # the volume's certificate is the only anchor
        with socket.create_connection(("127.0.0.1", tport), timeout=60) as raw, \
                ctx.wrap_socket(raw, server_hostname="renewed.test") as c:
            assert c.getpeercert(binary_form=True) == want
            c.sendall(b"GET / HTTP/1.1\r\nHost: renewed.test\r\nConnection: close\r\n\r\n")
            resp = b""
            while chunk := c.recv(65536):
                resp += chunk
        head, _, body = resp.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert hashlib.sha256(body).hexdigest() == image.urls["/"]["sha256"]
        assert s.machine.powerdown(90), s.machine.tail()
