"""PID 1's choice of HTTPS certificate (appliance/init.py choose_tls), without a VM:
the built-in certificate, a configuration volume's over it, and a volume's bad one
(a key that does not match, unparseable PEM) falling back to the built-in with a
HABOOB-WARN line while that is valid, HABOOB-FATAL when it has expired or there is
none. Certificates are made with the openssl CLI; the whole volume read path
(a FAT image through appliance/configvol.py) feeds settings() and choose_tls()."""
import collections
import os
import ssl
import subprocess

import pytest

from appliance import configvol as cv
from appliance import init
from tests.test_configvol import Devices, fat
from tests.tls_support import make_cert

IP = "198.18.0.1/24"
CONFIG = {"ip": IP, "gateway": None}


def expired_cert(d, name="expired", cn="old.test"):
    """A self-signed certificate valid only in January 2020 (`openssl req` cannot backdate)."""
    crt, key, csr = (os.path.join(d, name + x) for x in (".crt", ".key", ".csr"))
    db = os.path.join(d, name + ".db")
    open(db, "w").close()
    with open(os.path.join(d, name + ".serial"), "w") as f:
        f.write("01\n")
    cnf = os.path.join(d, name + ".cnf")
    with open(cnf, "w") as f:
        f.write(f"[ca]\ndefault_ca = d\n[d]\ndatabase = {db}\nnew_certs_dir = {d}\ndefault_md = sha256\n"
                f"policy = p\nserial = {d}/{name}.serial\n[p]\ncommonName = supplied\n")
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", csr, "-subj", "/CN=" + cn], check=True, capture_output=True)
    subprocess.run(["openssl", "ca", "-batch", "-config", cnf, "-selfsign", "-keyfile", key, "-in", csr,
                    "-out", crt, "-notext", "-startdate", "20200101000000Z", "-enddate", "20200201000000Z"],
                   check=True, capture_output=True)
    return crt, key


def der(path) -> bytes:
    with open(path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def served(tls) -> bytes:
    """The DER certificate the TLS context hands a client (a real handshake over memory BIOs)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ci, co, si, so = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = ctx.wrap_bio(ci, co, server_hostname="www.test")
    tls["server"].bind(collections.defaultdict(int), None)     # (its SNI check counts; a Stack would bind)
    srv = tls["server"].ctx.wrap_bio(si, so, server_side=True)
    for _ in range(10):
        for side in (c, srv):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        si.write(co.read())
        ci.write(so.read())
        try:
            c.do_handshake()
            return c.getpeercert(binary_form=True)
        except ssl.SSLWantReadError:
            continue
    raise AssertionError("no handshake")


@pytest.fixture
def said(monkeypatch):
    lines = []
    monkeypatch.setattr(init, "say", lambda *l: lines.extend(l))
    return lines


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("init-tls"))
    return {"built": make_cert(d, "built", names=("www.test",)),
            "vol": make_cert(d, "vol", cn="renewed.test", names=("renewed.test", "www.test")),
            "other": make_cert(d, "other"),
            "expired": expired_cert(d)}


def built_in(crt_key, **kw):
    return dict({"cert": crt_key[0], "key": crt_key[1], "http": "serve", "hsts": 60}, **kw)


def settings(volume: dict) -> dict:
    return init.settings(CONFIG, cv.merge(CONFIG, volume, {}))


def test_no_volume_serves_the_built_in(certs, said):
    tls = init.choose_tls(built_in(certs["built"]), settings({}))
    assert served(tls) == der(certs["built"][0])
    assert tls["http"] == "serve" and tls["default_host"] == "www.test"
    assert said == []
    assert init.choose_tls(None, settings({})) is None          # an image built without TLS: HTTP only


def test_volume_certificate_overrides_the_built_in(certs, said):
    crt, key = certs["vol"]
    tls = init.choose_tls(built_in(certs["built"]), settings({"tls_cert": crt, "tls_key": key}))
    assert served(tls) == der(crt)
    assert tls["server"].names == ["renewed.test", "www.test"]
    assert tls["http"] == "serve" and tls["server"].hsts.startswith(b"Strict-Transport-Security: max-age=60")
    assert said == ["haboob: HTTPS certificate from the configuration volume (renewed.test, www.test)"]


def test_volume_certificate_without_a_built_in_turns_https_on(certs, said):
    crt, key = certs["vol"]
    tls = init.choose_tls(None, settings({"tls_cert": crt, "tls_key": key}))
    assert served(tls) == der(crt)
    assert tls["http"] == "redirect" and tls["server"].hsts == b""
    assert said == ["haboob: HTTPS certificate from the configuration volume (renewed.test, www.test)"]


def test_mismatched_volume_key_warns_and_keeps_the_built_in(certs, said):
    s = settings({"tls_cert": certs["vol"][0], "tls_key": certs["other"][1]})
    tls = init.choose_tls(built_in(certs["built"]), s)
    assert served(tls) == der(certs["built"][0])
    assert said == [f"HABOOB-WARN configuration volume: HTTPS: key file {certs['other'][1]}: does not match "
                    f"the certificate in {certs['vol'][0]}; using the built-in certificate"]


def test_unparseable_volume_pem_warns_and_keeps_the_built_in(certs, said, tmp_path):
    bad = tmp_path / "fullchain.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    tls = init.choose_tls(built_in(certs["built"]), settings({"tls_cert": str(bad), "tls_key": certs["vol"][1]}))
    assert served(tls) == der(certs["built"][0])
    assert len(said) == 1 and said[0].startswith(f"HABOOB-WARN configuration volume: HTTPS: certificate file {bad}")
    assert said[0].endswith("; using the built-in certificate")


def test_mismatched_volume_key_with_an_expired_built_in_is_fatal(certs, said):
    s = settings({"tls_cert": certs["vol"][0], "tls_key": certs["other"][1]})
    with pytest.raises(init.Fatal, match=r"^configuration volume: HTTPS: key file .*other.key: does not match .*"
                                         r"\(and the built-in certificate has expired\)$"):
        init.choose_tls(built_in(certs["expired"]), s)
    assert not any(l.startswith("HABOOB-WARN") for l in said)


def test_bad_volume_without_a_built_in_is_fatal(certs, said):
    s = settings({"tls_cert": certs["vol"][0], "tls_key": certs["other"][1]})
    with pytest.raises(init.Fatal, match=r"^configuration volume: HTTPS: key file .*other.key: does not match"):
        init.choose_tls(None, s)
    assert said == []


def test_volume_overrides_an_expired_built_in(certs, said):
    crt, key = certs["vol"]
    tls = init.choose_tls(built_in(certs["expired"]), settings({"tls_cert": crt, "tls_key": key}))
    assert served(tls) == der(crt)                   # the renewal path: no warning about the old one
    assert said == ["haboob: HTTPS certificate from the configuration volume (renewed.test, www.test)"]


def test_from_a_fat_volume_through_settings(certs, said, tmp_path, monkeypatch):
    """The path PID 1 takes: a HABOOB FAT volume read by configvol, merged, settings(), choose_tls()."""
    monkeypatch.setattr(cv, "RUN", str(tmp_path / "run"))
    d = Devices(tmp_path)
    crt, key = certs["vol"]
    d.add("vdb", fat(tmp_path / "cfg.img", "HABOOB", {"tls/fullchain.pem": open(crt, "rb").read(),
                                                     "tls/key.pem": open(key, "rb").read()}))
    s = init.settings(CONFIG, d.read(CONFIG, {"ip": IP}))
    assert s["tls_cert"] == f"{cv.RUN}/tls/fullchain.pem" and s["tls_key"] == f"{cv.RUN}/tls/key.pem"
    tls = init.choose_tls(built_in(certs["built"]), s)
    assert served(tls) == der(crt)


def test_expired_volume_certificate_gives_way_to_a_valid_built_in(certs, said):
    crt, key = certs["expired"]
    tls = init.choose_tls(built_in(certs["built"]), settings({"tls_cert": crt, "tls_key": key}))
    assert served(tls) == der(certs["built"][0])
    assert said[-1] == (f"HABOOB-WARN configuration volume: the certificate in {crt} expired on "
                        f"Feb  1 00:00:00 2020 GMT; using the built-in certificate")
    # both expired: the volume's (the operator's latest) is served, with load_tls's warning
    said.clear()
    tls = init.choose_tls(built_in(certs["expired"]), settings({"tls_cert": crt, "tls_key": key}))
    assert served(tls) == der(crt)
    assert said[0] == "haboob: warning: the certificate expired on Feb  1 00:00:00 2020 GMT"
