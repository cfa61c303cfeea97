"""build.py refuses bad input with one clear line, a non-zero exit, and
leaves nothing behind."""
import subprocess
import sys

import pytest

from tests.image_support import EXAMPLE, REPO


def run_build(tmp_path, *args, env=None):
    out = tmp_path / "out" / "img"
    proc = subprocess.run([sys.executable, str(REPO / "build.py"), "-q", "--out", str(out), *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    return proc, out


def assert_refused(proc, out, *words):
    assert proc.returncode != 0
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(err) == 1, proc.stderr
    assert err[0].startswith("Error: ")
    for w in words:
        assert w in err[0], err[0]
    assert not out.exists()
    if out.parent.exists():
        assert list(out.parent.iterdir()) == [], "a half-written image was left behind"
    assert "Traceback" not in proc.stderr


def test_missing_site(tmp_path):
    assert_refused(*run_build(tmp_path, "--site", str(tmp_path / "nope")), "--site", "no such folder")


def test_site_is_a_file(tmp_path):
    f = tmp_path / "f.html"
    f.write_text("x")
    assert_refused(*run_build(tmp_path, "--site", str(f)), "not a folder")


def test_empty_site(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(*run_build(tmp_path, "--site", str(tmp_path / "empty"), "--compress-level", "1"), "--site")


@pytest.mark.parametrize("ip,words", [
    ("198.18.0.1", ["needs a prefix"]),
    ("198.18.0.300/24", ["not an IPv4 address"]),
    ("hello", ["not an IPv4 address"]),
    ("198.18.0.0/24", ["network address"]),
    ("198.18.0.255/24", ["broadcast address"]),
    ("127.0.0.1/8", ["cannot be a host address"]),
])
def test_bad_ip(tmp_path, ip, words):
    assert_refused(*run_build(tmp_path, "--site", str(EXAMPLE), "--ip", ip), "--ip", *words)


def test_gateway_outside_network(tmp_path):
    assert_refused(*run_build(tmp_path, "--site", str(EXAMPLE), "--ip", "198.18.0.1/24", "--gateway", "198.19.0.1"),
                   "--gateway", "not another host")


def test_gateway_with_dhcp(tmp_path):
    # --ip dhcp is the default: a gateway comes from the DHCP server
    assert_refused(*run_build(tmp_path, "--site", str(EXAMPLE), "--gateway", "198.18.0.254"),
                   "--gateway", "needs a static --ip")


def test_bad_mss(tmp_path):
    assert_refused(*run_build(tmp_path, "--site", str(EXAMPLE), "--mss", "100"), "--mss")


def test_bad_name(tmp_path):
    assert_refused(*run_build(tmp_path, "--site", str(EXAMPLE), "--name", "../x"), "--name")


def test_unknown_kernel_path(tmp_path):
    assert_refused(*run_build(tmp_path, "--site", str(EXAMPLE), "--kernel", str(tmp_path / "vmlinuz-none")),
                   "--kernel", "no such file")


def test_kernel_that_is_not_a_kernel(tmp_path):
    k = tmp_path / "vmlinuz-6.1.0-x"
    k.write_bytes(b"\x7fELF" + bytes(4096))
    assert_refused(*run_build(tmp_path, "--site", str(EXAMPLE), "--kernel", str(k)),
                   "not an x86 Linux kernel image")


def test_kernel_without_modules(tmp_path):
    from tests.deploy_support import debian_kernel
    vmlinuz, _ = debian_kernel()
    k = tmp_path / "boot" / "vmlinuz"
    k.parent.mkdir()
    k.write_bytes(vmlinuz.read_bytes())
    assert_refused(*run_build(tmp_path, "--site", str(EXAMPLE), "--kernel", str(k),
                              "--modules", str(tmp_path / "nomods")), "no modules directory")


def test_bad_source_date_epoch(tmp_path):
    import os
    env = dict(os.environ, SOURCE_DATE_EPOCH="yesterday")
    assert_refused(*run_build(tmp_path, "--site", str(EXAMPLE), env=env), "SOURCE_DATE_EPOCH")


@pytest.mark.parametrize("args,words", [
    (["--ip6", "fe80::10/64"], ["--ip6 'fe80::10/64'", "is link-local"]),
    (["--ip6", "2001:2:0:1::10/200"], ["--ip6 '2001:2:0:1::10/200'", "prefix length '200' is out of range"]),
    (["--ip6", "2001:2:0:1::10/64", "--gateway6", "2001:2:0:2::1"], ["--gateway6 '2001:2:0:2::1'", "nor on-link"]),
    (["--ip6", "auto", "--gateway6", "fe80::1"], ["--gateway6 needs a static --ip6"]),
])
def test_bad_ip6(tmp_path, args, words):
    assert_refused(*run_build(tmp_path, "--site", str(EXAMPLE), *args), *words)


def test_static_ip6_goes_to_the_command_line(tmp_path):
    from types import SimpleNamespace

    from haboob_build import steps
    o = SimpleNamespace(ip="198.18.0.1/24", gateway=None, ip6="2001:2:0:1:0::10/64", gateway6="fe80::1")
    steps.cmdline(SimpleNamespace(options=o, work=tmp_path))
    assert (tmp_path / "cmdline").read_text() == ("console=ttyS0 quiet panic=-1 haboob.ip=198.18.0.1/24 "
                                                  "haboob.ip6=2001:2:0:1::10/64 haboob.gw6=fe80::1\n")
    o.ip6, o.gateway6 = "off", None                     # said so: on the command line too
    steps.cmdline(SimpleNamespace(options=o, work=tmp_path))
    assert (tmp_path / "cmdline").read_text().endswith(" haboob.ip=198.18.0.1/24 haboob.ip6=off\n")


def test_default_address_is_dhcp_on_the_command_line_and_in_the_config(tmp_path):
    from types import SimpleNamespace

    import build
    from haboob_build import steps
    import dataclasses

    from haboob_build.context import Options
    defaults = {p.name: p.default for p in build.main.params}
    assert defaults["ip"] == "dhcp" and defaults["ip6"] == "auto"
    assert {f.name: f.default for f in dataclasses.fields(Options)}["ip6"] == "auto"    # build.py's and Options()'s
    ctx = SimpleNamespace(options=SimpleNamespace(ip="dhcp", gateway=None, ip6="auto", gateway6=None), work=tmp_path)
    steps.cmdline(ctx)
    assert (tmp_path / "cmdline").read_text() == "console=ttyS0 quiet panic=-1 haboob.ip=dhcp haboob.ip6=auto\n"
    assert steps.parse_ip("dhcp") is None
